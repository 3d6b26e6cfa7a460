"""`python -m digital_worker.runtime ...`: the runtime command group alone (the image's entrypoint).

The SGLang image carries only this subpackage of digital-worker, so it cannot go through the
top-level CLI's discovery of every subpackage; this runs the same `runtime` commands directly.
"""
from __future__ import annotations

import argparse
import sys

from digital_worker.cli import run_handler
from digital_worker.runtime.cli import register


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m digital_worker.runtime")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    register(subparsers)
    # `register` adds the `runtime` group; accept both `runtime launch ...` and `launch ...`.
    raw = list(sys.argv[1:] if argv is None else argv)
    if not raw or raw[0] not in ("runtime", "-h", "--help"):
        raw = ["runtime", *raw]
    return run_handler(parser.parse_args(raw))


if __name__ == "__main__":
    sys.exit(main())
