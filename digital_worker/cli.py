"""The one `digital-worker` command.

Each subpackage contributes its subcommands through a light `cli.py` module with a
``register(subparsers)`` function. Those modules import only argparse at module level; the
heavy code (kopf, statsmodels, pulumi, NVML) is imported inside the handlers, so that e.g. the
agent image, which installs only the `agent` extra, can run `digital-worker agent`.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# Order is the order shown in --help.
COMMAND_MODULES = (
    "digital_worker.operator.cli",
    "digital_worker.operator.user_commands",
    "digital_worker.operator.autoscaling.cli",
    "digital_worker.runtime.cli",
    "digital_worker.agents.cli",
    "digital_worker.stacks.cli",
)


class UserError(Exception):
    """A mistake in what the user gave us: printed as one line, exit code 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    from digital_worker import __version__

    parser = argparse.ArgumentParser(
        prog="digital-worker",
        description="Deploy and operate SGLang-served LLM assistants on Kubernetes GPU nodes.",
    )
    parser.add_argument("--version", action="version", version=f"digital-worker {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:  # a subpackage not written yet: skip, never break the CLI
            if exc.name and module_name.startswith(exc.name):
                continue
            raise
        module.register(subparsers)
    return parser


def run_handler(args: argparse.Namespace) -> int:
    """Run a parsed subcommand: a UserError is one line on stderr and exit 2, Ctrl-C is 130.
    Shared by this CLI and the subpackages' own `python -m` entry points."""
    try:
        result = args.handler(args)
    except UserError as exc:
        print(f"digital-worker: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(result or 0)


def main(argv: list[str] | None = None) -> int:
    return run_handler(build_parser().parse_args(argv))
