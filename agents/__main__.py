"""`python -m digital_worker.agents agent ...`: the agent's commands without loading any other
subpackage's CLI (the agent image carries only the `agent` extra)."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from digital_worker.agents import cli

    parser = argparse.ArgumentParser(prog="python -m digital_worker.agents",
                                     description="digital-worker node agent commands")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    cli.register(subparsers)
    args = parser.parse_args(argv)
    try:
        from digital_worker.cli import UserError
    except ImportError:  # pragma: no cover - the core package is always there
        UserError = ValueError
    try:
        return int(args.handler(args) or 0)
    except UserError as exc:
        print(f"digital-worker: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
