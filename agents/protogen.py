"""Regenerate the checked-in gRPC/protobuf modules from agents/protos/api.proto.

    python -m digital_worker.agents.protogen [--out DIR]

Needs grpcio-tools (the dev extra); the agent image does not, because the output is checked in.
The proto is compiled under the virtual path digital_worker/agents/ so that the generated gRPC
module imports ``digital_worker.agents.api_pb2`` instead of a top-level ``api_pb2``.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

AGENTS_DIR = Path(__file__).resolve().parent
PROTO = AGENTS_DIR / "protos" / "api.proto"
GENERATED = ("api_pb2.py", "api_pb2_grpc.py", "api_pb2.pyi")


def generate(out_dir: Path) -> list[Path]:
    """Compile api.proto; write the three generated files into `out_dir` and return their paths."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as scratch:
        argv = [
            "grpc_tools.protoc",
            f"-Idigital_worker/agents={PROTO.parent}",
            f"--python_out={scratch}",
            f"--pyi_out={scratch}",
            f"--grpc_python_out={scratch}",
            str(PROTO),
        ]
        if protoc.main(argv) != 0:
            raise RuntimeError(f"protoc failed on {PROTO}")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name in GENERATED:
            target = out_dir / name
            shutil.copyfile(Path(scratch) / "digital_worker" / "agents" / name, target)
            written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=AGENTS_DIR, help="output folder (default: the agents package)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
