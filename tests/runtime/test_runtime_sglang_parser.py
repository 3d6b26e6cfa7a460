"""The launch contract against SGLang's real code at the pinned version, on the CPU.

Runs the SGLang virtualenv's python (made by tests/runtime/sglang_venv.sh, at $DW_SGLANG_VENV or
~/.cache/digital-worker/sglang-venv) on tests/runtime/sglang_probe.py: `prepare_server_args` parses the argv
`build_argv` makes; the allow-listed extra args and the typed fields' choices exist in SGLang's
parser; the simulator's metric definitions match SGLang's metrics_collector.py; and the launcher's
API key handover reaches SGLang's ServerArgs through `sglang_entry`.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from digital_worker.runtime import contract
from digital_worker.runtime.contract import ALLOWED_EXTRA_ARGS, SGLANG_VERSION, LaunchConfig, build_argv
from digital_worker.runtime.launcher import prepare_launch, supervise
from digital_worker.runtime.sglang_metrics import HTTP, METRICS, scheduler_labels, tokenizer_labels

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

HERE = Path(__file__).resolve().parent
# The same default as sglang_venv.sh: `bash .ci/setup && python3 -m pytest -q` needs no variable.
VENV = Path(os.environ.get("DW_SGLANG_VENV") or Path.home() / ".cache" / "digital-worker" / "sglang-venv")
VENV_PYTHON = VENV / "bin" / "python"
PROBE = HERE / "sglang_probe.py"


@pytest.fixture(scope="module")
def sglang_python() -> str:
    if not (VENV / f".digital-worker-sglang-{SGLANG_VERSION}").exists():
        message = f"no SGLang {SGLANG_VERSION} virtualenv at {VENV}: run tests/runtime/sglang_venv.sh"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI runs the setup script: a missing venv is a broken pipeline
        pytest.skip(message)
    return str(VENV_PYTHON)


def probe(python: str, mode: str, payload=None):
    result = subprocess.run([python, str(PROBE), mode], input=json.dumps(payload) if payload is not None else "",
                            capture_output=True, text=True, timeout=240, cwd="/")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


CONFIGS = [
    LaunchConfig(model_path="/models/llama-3-8b", served_model_name="assistant"),
    LaunchConfig(
        model_path="/models/qwen", served_model_name="qwen", host="127.0.0.1", port=8080,
        tensor_parallel_size=2, data_parallel_size=2, gpus=4, mem_fraction_static=0.82,
        max_running_requests=96, context_length=16384, quantization="fp8", dtype="bfloat16",
        kv_cache_dtype="fp8_e4m3", chunked_prefill_size=4096, log_level="warning", revision="main",
        extra_args=("--schedule-policy", "lpm", "--disable-radix-cache", "--stream-interval", "2",
                    "--max-prefill-tokens", "8192", "--trust-remote-code"),
    ),
    LaunchConfig(model_path="/models/m", served_model_name="m", chunked_prefill_size=-1, enable_metrics=False,
                 extra_args=("--cuda-graph-max-bs-decode", "64", "--watchdog-timeout=600")),
]


def choice_argvs() -> list[list[str]]:
    """One argv per value our validation accepts for a typed field: each must parse."""
    base = build_argv(CONFIGS[0])[3:]
    argvs = []
    for flag, choices in (("--dtype", contract.DTYPE_CHOICES), ("--kv-cache-dtype", contract.KV_CACHE_DTYPE_CHOICES),
                          ("--quantization", contract.QUANTIZATION_CHOICES), ("--log-level", contract.LOG_LEVEL_CHOICES)):
        argvs += [base + [flag, choice] for choice in choices]
    return argvs


REFUSED = [build_argv(CONFIGS[0])[3:] + ["--no-such-flag"], build_argv(CONFIGS[0])[3:] + ["--dtype", "fp17"]]


@pytest.fixture(scope="module")
def sglang(sglang_python) -> dict:
    """Everything asked of SGLang's code in one interpreter start (importing SGLang takes seconds)."""
    argvs = [build_argv(config)[3:] for config in CONFIGS] + REFUSED + choice_argvs()
    return probe(sglang_python, "all", {"parse": argvs})


def test_generated_argv_parses_with_the_real_parser(sglang):
    for config, result in zip(CONFIGS, sglang["parse"][:len(CONFIGS)]):
        assert result["ok"], result
        assert result["model_path"] == config.model_path
        assert result["served_model_name"] == config.served_model_name
        assert result["host"] == config.host and result["port"] == config.port
        assert result["tp_size"] == config.tensor_parallel_size and result["dp_size"] == config.data_parallel_size
        assert result["dtype"] == config.dtype and result["kv_cache_dtype"] == config.kv_cache_dtype
        assert result["mem_fraction_static"] == config.mem_fraction_static
        assert result["max_running_requests"] == config.max_running_requests
        assert result["context_length"] == config.context_length
        assert result["quantization"] == config.quantization
        assert result["chunked_prefill_size"] == config.chunked_prefill_size
        assert result["enable_metrics"] == config.enable_metrics
        assert result["log_level"] == config.log_level
        assert result["revision"] == config.revision
        assert result["api_key"] is None


def test_the_real_parser_refuses_what_the_contract_refuses(sglang):
    unknown, bad_dtype = sglang["parse"][len(CONFIGS):len(CONFIGS) + 2]
    assert not unknown["ok"] and "--no-such-flag" in unknown["error"]
    assert not bad_dtype["ok"] and "fp17" in bad_dtype["error"]


def test_allow_list_and_choices_match_the_parser(sglang):
    flags = set(sglang["flags"])
    assert set(ALLOWED_EXTRA_ARGS) <= flags, sorted(set(ALLOWED_EXTRA_ARGS) - flags)
    argvs = choice_argvs()
    results = sglang["parse"][len(CONFIGS) + 2:]
    refused = [argv[-2:] for argv, result in zip(argvs, results) if not result["ok"]]
    assert len(results) == len(argvs) and refused == []


def test_simulator_metrics_match_sglang_collector(sglang):
    real = sglang["metrics"]
    for spec in METRICS:
        assert spec.name in real, spec.name
        assert real[spec.name]["type"] == spec.kind, spec.name
        assert real[spec.name]["extra_labels"] == list(spec.extra_labels), spec.name
        if spec.buckets is not None:
            assert [float(b) for b in real[spec.name]["buckets"]] == [float(b) for b in spec.buckets], spec.name
    # The base label names are the ones SGLang's collectors are built with (see metrics_collector.py).
    assert set(scheduler_labels("m")) == {"model_name", "engine_type", "tp_rank", "pp_rank", "moe_ep_rank"}
    assert set(tokenizer_labels("m")) == {"model_name", "engine_type"}
    # The HTTP middleware's metrics (http_request_metrics.py) carry only their own labels.
    assert {spec.name for spec in METRICS if spec.collector == HTTP} == {
        "sglang:http_requests_total", "sglang:http_responses_total", "sglang:http_requests_active"}


def test_launcher_hands_the_key_to_real_server_args(sglang_python, tmp_path):
    """Launcher → pipe → sglang_entry → SGLang's real prepare_server_args, with the key set after parsing."""
    import io

    secret = "sk-real-parser-secret"
    model = tmp_path / "model"
    model.mkdir()
    config = LaunchConfig(model_path=str(model), served_model_name="assistant", api_key_env="TEST_KEY")
    plan = prepare_launch(config, python=sglang_python, environ={"TEST_KEY": secret})
    out, err = io.BytesIO(), io.BytesIO()
    env = {key: value for key, value in os.environ.items() if key != "TEST_KEY"}
    env["DW_SGLANG_ENTRY_CHECK"] = "1"
    code = supervise(plan, stdout=out, stderr=err, env=env)
    assert code == 0, err.getvalue().decode()[-2000:]
    report = json.loads(out.getvalue().decode().strip().splitlines()[-1])
    assert report == {"model_path": str(model), "served_model_name": "assistant", "port": 30000, "tp_size": 1,
                      "api_key_matches": True, "key_in_launch_command": False}
    assert secret.encode() not in out.getvalue() + err.getvalue()


def test_setup_script_reuses_a_finished_venv(sglang_python):
    result = subprocess.run(["bash", str(HERE / "sglang_venv.sh")], env={**os.environ, "DW_SGLANG_VENV": str(VENV)},
                            capture_output=True, text=True, timeout=60, cwd="/")
    assert result.returncode == 0 and f"ready at {VENV}" in result.stdout
