#!/usr/bin/env bash
# Create (or reuse) the virtualenv that holds SGLang's real argument parser, for
# tests/runtime/test_runtime_sglang_parser.py. CPU build of torch (a local file on these
# machines), SGLang at the pinned version without its GPU dependencies, and the few small
# packages sglang.srt.server_args imports. Idempotent: a finished venv is reused as is.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
# Same default as tests/runtime/test_runtime_sglang_parser.py, so no variable has to be passed on.
venv="${DW_SGLANG_VENV:-$HOME/.cache/digital-worker/sglang-venv}"
python="${PYTHON:-python3}"
# The pin lives in runtime/contract.py only; read it from there so the two never drift.
sglang_version="$(sed -n 's/^SGLANG_VERSION = "\(.*\)"$/\1/p' "$repo/runtime/contract.py")"
marker="$venv/.digital-worker-sglang-$sglang_version"

# Run from a neutral folder: the repo's top-level operator/ folder would shadow the stdlib module.
cd /

if [ -f "$marker" ]; then
    echo "sglang venv ready at $venv (sglang $sglang_version)"
    exit 0
fi

mkdir -p "$(dirname "$venv")"
"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet)
"${pip[@]}" "torch==2.13.0"
"${pip[@]}" --no-deps "sglang==$sglang_version"
"${pip[@]}" msgspec numpy orjson psutil pybase64 requests packaging pillow starlette \
    pydantic pyzmq tqdm ipython aiohttp fastapi uvloop triton
"$venv/bin/python" -c "from sglang.srt.server_args import prepare_server_args"
touch "$marker"
echo "sglang venv ready at $venv (sglang $sglang_version)"
