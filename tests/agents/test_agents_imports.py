"""The agent stands alone: nothing from the operator, stacks or runtime, no heavy dependencies."""
from __future__ import annotations

import ast
from pathlib import Path

import digital_worker.agents as agents_package

AGENTS_DIR = Path(agents_package.__file__).resolve().parent
FORBIDDEN_TOP_LEVEL = {"kopf", "statsmodels", "pulumi", "pulumi_kubernetes", "kubernetes", "kmock", "aiohttp",
                       "numpy", "pandas", "jinja2"}
FORBIDDEN_INTERNAL = ("digital_worker.operator", "digital_worker.stacks", "digital_worker.runtime")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_no_heavy_or_upward_imports_anywhere_under_agents():
    files = sorted(AGENTS_DIR.glob("*.py"))
    assert len(files) >= 10
    for path in files:
        for module in imported_modules(path):
            assert module.split(".")[0] not in FORBIDDEN_TOP_LEVEL, f"{path.name} imports {module}"
            assert not module.startswith(FORBIDDEN_INTERNAL), f"{path.name} imports {module}"


def test_cli_module_imports_only_argparse_and_stdlib():
    assert imported_modules(AGENTS_DIR / "cli.py") - {"__future__"} <= {"argparse", "os"} | {
        # handlers import these lazily, inside functions
        "digital_worker.agents.agent", "digital_worker.agents.manifests", "digital_worker.cli", "yaml"}
    tree = ast.parse((AGENTS_DIR / "cli.py").read_text())
    top_level = {alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    top_level |= {node.module for node in tree.body if isinstance(node, ast.ImportFrom)}
    assert top_level <= {"__future__", "argparse", "os"}


def test_manifests_module_has_no_dependencies():
    assert imported_modules(AGENTS_DIR / "manifests.py") <= {"__future__", "copy", "re"}
