"""Pulumi's entry point (Pulumi.yaml `main: stacks/program/`).

A folder of its own, not `stacks/__main__.py`: that would make `python -m digital_worker.stacks`
run a Pulumi program outside the engine. All wiring is in `digital_worker.stacks.stack`.
"""
from pathlib import Path

from digital_worker.stacks.stack import run

# Relative paths in stack config (installer scripts) are relative to the project root.
run(base_dir=Path(__file__).resolve().parents[2])
