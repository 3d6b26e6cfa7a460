"""`runtime` stays light: importable without kopf, statsmodels or pulumi, and its CLI module argparse-only."""
from __future__ import annotations

import json
import subprocess
import sys

MODULES = ["contract", "launcher", "modelfetch", "sim", "sglang_metrics", "image", "cli", "sglang_entry", "perfmodel"]


def test_runtime_imports_nothing_heavy():
    code = (
        "import json, sys\n"
        + "".join(f"import digital_worker.runtime.{name}\n" for name in MODULES)
        + "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
          "('kopf', 'statsmodels', 'pulumi', 'kubernetes', 'docker', 'boto3', 'huggingface_hub', 'openai'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd="/")
    assert result.returncode == 0, result.stderr
    # Clients (docker, boto3, huggingface_hub) load only when a fetch or build actually runs.
    assert json.loads(result.stdout) == []


def test_cli_module_imports_only_argparse():
    code = ("import sys; before = set(sys.modules); import digital_worker.runtime.cli; "
            "print(sorted(set(sys.modules) - before))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd="/")
    new = eval(result.stdout)
    assert not [name for name in new if name.startswith("digital_worker.runtime.") and name != "digital_worker.runtime.cli"]
    assert "aiohttp" not in new and "jinja2" not in new


def test_help_works_on_every_level():
    for argv in (["runtime"], ["runtime", "launch"], ["runtime", "fetch"], ["runtime", "sim"],
                 ["runtime", "image"], ["runtime", "image", "build"]):
        result = subprocess.run(["digital-worker", *argv, "--help"], capture_output=True, text=True, timeout=60, cwd="/")
        assert result.returncode == 0 and "usage:" in result.stdout, argv
