"""Operator subcommands. Module level imports argparse only; handlers import what they need."""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from digital_worker.operator import commands

    commands.register(subparsers)
