"""SGLang's own entrypoint plus one thing: the API key handed over out of band.

The launcher runs ``python <this file> <SGLang argv>`` when the replica has an API key, instead of
``python -m sglang.launch_server <SGLang argv>``: the argv is the very
one `contract.build_argv` made, parsed by SGLang's `prepare_server_args`, and then this module sets
`server_args.api_key` from a pipe the launcher passed as an inherited file descriptor
(``DW_API_KEY_FD``). So the key is never in any process's argv or environment, and SGLang's
recorded ``launch_command`` (shown by ``/server_info``) does not contain it either. SGLang logs
its resolved arguments, key included, at start-up: the launcher scrubs the key from the output it
relays, so it never reaches the pod's logs.

Standard library and sglang only: this file also runs as a plain script in the SGLang test
virtualenv, where digital_worker is not installed.
"""
from __future__ import annotations

import json
import os
import sys

# Run as a script, Python puts this file's folder first on sys.path; its sibling modules must not
# shadow anything SGLang imports.
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

API_KEY_FD_ENV = "DW_API_KEY_FD"
# Parse and report instead of serving: how the real-parser test exercises the handover on a CPU.
CHECK_ONLY_ENV = "DW_SGLANG_ENTRY_CHECK"


def read_handed_over_key() -> str | None:
    fd_text = os.environ.pop(API_KEY_FD_ENV, None)
    if not fd_text:
        return None
    with os.fdopen(int(fd_text), "r", encoding="utf-8") as pipe:
        key = pipe.read().strip()
    return key or None


def main(argv: list[str]) -> int:
    api_key = read_handed_over_key()
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args

    # Same order as `python -m sglang.launch_server` (SGLang 0.5.23): plugins may add flags.
    load_plugins()
    server_args = prepare_server_args(argv)
    if api_key is not None:
        server_args.api_key = api_key
    if os.environ.get(CHECK_ONLY_ENV):
        print(json.dumps({
            "model_path": server_args.model_path,
            "served_model_name": server_args.served_model_name,
            "port": server_args.port,
            "tp_size": server_args.tp_size,
            "api_key_matches": api_key is not None and server_args.api_key == api_key,
            "key_in_launch_command": bool(api_key) and api_key in str(server_args.launch_command or ""),
        }))
        return 0

    # What `python -m sglang.launch_server` does after parsing (SGLang 0.5.23).
    from sglang.launch_server import run_server
    from sglang.srt.utils import kill_process_tree

    try:
        run_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
