"""`python -m digital_worker.agents agent ...`: the agent's commands without loading any other
subpackage's CLI (the agent image carries only the `agent` extra)."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from digital_worker.agents import cli
    from digital_worker.cli import run_handler

    parser = argparse.ArgumentParser(prog="python -m digital_worker.agents",
                                     description="digital-worker node agent commands")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    cli.register(subparsers)
    return run_handler(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
