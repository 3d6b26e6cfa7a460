"""`digital-worker test --scenario full-flow`: against a real simulated SGLang server, healthy and faulty,
and the whole embedded flow once."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request

import pytest

from digital_worker.runtime.smoke import metric_families, percentile
from dwtest_support import free_port, wait_http

CLI = shutil.which("digital-worker")


@pytest.fixture
def sim_server():
    """A simulated SGLang replica (the real `runtime sim` CLI) requiring an API key; yields its base URL."""
    port = free_port()
    process = subprocess.Popen(
        [CLI, "runtime", "sim", "--port", str(port), "--model-name", "smoke-model", "--api-key-env", "SMOKE_KEY"],
        env={**os.environ, "SMOKE_KEY": "sk-smoke"}, cwd="/", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=30)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=15)


def run_test(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, "test", "--scenario", "full-flow", *args], capture_output=True, text=True,
                          timeout=timeout, cwd="/", env={**os.environ, "COLUMNS": "200", **(env or {})})


def set_faults(url: str, **faults) -> None:
    request = urllib.request.Request(url + "/admin/faults", data=json.dumps(faults).encode(),
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=5).read()


def test_healthy_server_passes_every_check_with_percentiles(sim_server, tmp_path):
    report_file = tmp_path / "report.json"
    result = run_test("--endpoint", sim_server + "/v1", "--api-key-env", "KEY", "--requests", "6",
                      "--json", str(report_file), env={"KEY": "sk-smoke"})
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(report_file.read_text())
    assert report["ok"] and report["model"] == "smoke-model" and report["endpoint"] == sim_server
    assert [c["name"] for c in report["checks"]] == ["health", "model-info", "chat", "chat-stream", "latency", "metrics"]
    assert {c["status"] for c in report["checks"]} == {"pass"}
    latency = report["latency"]
    assert latency["requests"] == 6 and latency["tokens_per_request"] == 16
    assert 0 < latency["ttft_p50"] <= latency["ttft_p95"] < latency["e2e_p95"]
    assert latency["ttft_p50"] < latency["e2e_p50"]
    assert "PASSED" in result.stdout and "TTFT" in result.stdout and "p95" in result.stdout
    assert "sk-smoke" not in result.stdout + result.stderr + report_file.read_text()


def test_errors_injected_fail_with_the_failing_checks_named(sim_server, tmp_path):
    set_faults(sim_server, error_rate=1.0)
    report_file = tmp_path / "report.json"
    result = run_test("--endpoint", sim_server, "--api-key", "sk-smoke", "--json", str(report_file))
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads(report_file.read_text())
    status = {c["name"]: c["status"] for c in report["checks"]}
    # The server is up and lists its model; every generation fails.
    assert status == {"health": "pass", "model-info": "pass", "chat": "fail", "chat-stream": "fail",
                      "latency": "fail", "metrics": "pass"}
    chat = next(c for c in report["checks"] if c["name"] == "chat")
    assert "HTTP 500" in chat["detail"] and "Injected failure" in chat["detail"]
    assert "FAILED 3 of 6 checks: chat, chat-stream, latency" in " ".join(result.stdout.split())


def test_partial_errors_fail_the_latency_run_naming_the_request(sim_server, tmp_path):
    set_faults(sim_server, error_rate=0.5)
    report_file = tmp_path / "report.json"
    result = run_test("--endpoint", sim_server, "--api-key", "sk-smoke", "--requests", "30",
                      "--max-tokens", "2", "--json", str(report_file))
    assert result.returncode == 1
    latency = next(c for c in json.loads(report_file.read_text())["checks"] if c["name"] == "latency")
    # The latency run streams: a failed request is a 200 stream ending in SGLang's error event.
    assert latency["status"] == "fail" and "of 30" in latency["detail"]
    assert "error 500 in the stream after 0 token(s): Injected failure" in latency["detail"]


def test_missing_api_key_is_reported_by_the_checks_that_need_it(sim_server, tmp_path):
    report_file = tmp_path / "report.json"
    result = run_test("--endpoint", sim_server, "--requests", "1", "--json", str(report_file))
    assert result.returncode == 1
    status = {c["name"]: (c["status"], c["detail"]) for c in json.loads(report_file.read_text())["checks"]}
    assert status["health"][0] == "pass" and status["metrics"][0] == "pass"  # open paths, as in SGLang
    assert status["model-info"][0] == "fail" and "HTTP 401" in status["model-info"][1]


def test_unreachable_endpoint_fails_health_and_skips_the_rest(tmp_path):
    report_file = tmp_path / "report.json"
    result = run_test("--endpoint", f"http://127.0.0.1:{free_port()}", "--json", str(report_file), timeout=60)
    assert result.returncode == 1
    checks = json.loads(report_file.read_text())["checks"]
    assert checks[0]["name"] == "health" and checks[0]["status"] == "fail"
    assert "cannot connect" in checks[0]["detail"]
    assert {c["status"] for c in checks[1:]} == {"skip"}
    assert "FAILED 1 of 6 checks: health" in " ".join(result.stdout.split())


def test_bad_options_are_one_line_errors():
    result = run_test("--endpoint", "http://127.0.0.1:1", "--requests", "-1")
    assert result.returncode == 2 and "--requests" in result.stderr and "Traceback" not in result.stderr
    result = run_test("--endpoint", "http://127.0.0.1:1", "--api-key-env", "DW_SURELY_UNSET_VAR")
    assert result.returncode == 2 and "DW_SURELY_UNSET_VAR" in result.stderr


def test_metric_names_in_both_forms_and_percentiles():
    colon = ("# TYPE sglang:num_requests_total counter\nsglang:num_requests_total{model_name=\"m\"} 3\n"
             "sglang:time_to_first_token_seconds_bucket{le=\"0.1\"} 1\n")
    underscore = ("# HELP sglang_num_queue_reqs waiting\n# TYPE sglang_num_queue_reqs gauge\n"
                  "sglang_num_queue_reqs 0\nsglang_e2e_request_latency_seconds_sum 1.5\n")
    found = metric_families(colon + underscore)
    assert {"sglang:num_requests_total", "sglang:time_to_first_token_seconds", "sglang:num_queue_reqs",
            "sglang:e2e_request_latency_seconds"} <= found
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 95) == 5.0
    assert percentile(list(map(float, range(1, 101))), 95) == pytest.approx(95.05)


def test_full_flow_without_endpoint_stands_up_the_embedded_default(tmp_path):
    """The whole flow: emulated cluster, real operator, the bundled example, a simulated replica tested."""
    report_file = tmp_path / "report.json"
    result = run_test("--requests", "3", "--json", str(report_file), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(report_file.read_text())
    assert [c["name"] for c in report["checks"]] == ["cluster", "operator", "deploy", "replicas", "health",
                                                      "model-info", "chat", "chat-stream", "latency", "metrics"]
    assert {c["status"] for c in report["checks"]} == {"pass"}
    assert report["model"] == "qwen2.5-7b" and report["context"]["worker"] == "ai/support-bot"
    assert len(report["context"]["replicas"]) == 2 and report["endpoint"] in report["context"]["replicas"]
    assert report["latency"]["requests"] == 3
    assert "[ok] deploy: ai/support-bot is Ready" in result.stderr


def test_smoke_client_needs_only_the_standard_library():
    """`test --endpoint` must run where only the runtime extra is installed (no kopf, kubernetes, rich)."""
    code = ("import sys; before = set(sys.modules); import digital_worker.runtime.smoke, "
            "digital_worker.operator.user_commands; import json; print(json.dumps(sorted(set(sys.modules) - before)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd="/")
    new = json.loads(result.stdout)
    heavy = [m for m in new if m.split(".")[0] in ("kopf", "kubernetes", "rich", "aiohttp", "yaml", "statsmodels")]
    assert heavy == [] and not [m for m in new if m.startswith("digital_worker.operator.") and
                                m != "digital_worker.operator.user_commands"]


def test_plain_text_report_without_rich():
    from digital_worker.runtime.smoke import CheckResult, LatencySummary, SmokeReport, report_lines

    report = SmokeReport("http://h:1", "m", (CheckResult("health", "pass", "ok", 0.01),
                                             CheckResult("chat", "fail", "HTTP 500: boom", 0.02)),
                         LatencySummary(3, 0.01, 0.02, 0.1, 0.2, 16.0), {"worker": "ai/w"})
    lines = list(report_lines(report))
    assert lines[0] == "ai/w: smoke test of http://h:1 (model m)"
    assert any("chat" in line and "FAIL" in line and "HTTP 500: boom" in line for line in lines)
    assert "TTFT p50 10.0 ms, p95 20.0 ms" in lines[-2]
    assert lines[-1] == "FAILED 1 of 2 checks: chat. First failure: chat: HTTP 500: boom"
    assert not report.ok and report.to_dict()["checks"][1]["status"] == "fail"


def test_full_flow_says_why_a_worker_never_gets_ready(tmp_path):
    """An `init` manifest asking for GPUs no emulated node has: deploy fails, named, and the smoke is skipped."""
    assert subprocess.run([CLI, "init", "--yes", "--output-dir", str(tmp_path), "--name", "l4-bot",
                           "--gpu-type", "nvidia-l4-24gb"], capture_output=True, timeout=60).returncode == 0
    report_file = tmp_path / "report.json"
    result = run_test("-f", str(tmp_path / "l4-bot.yaml"), "--ready-timeout", "3", "--json", str(report_file))
    assert result.returncode == 1
    checks = {c["name"]: c for c in json.loads(report_file.read_text())["checks"]}
    assert checks["cluster"]["status"] == checks["operator"]["status"] == "pass"
    assert checks["deploy"]["status"] == "fail"
    assert "not scheduled" in checks["deploy"]["detail"] and "gpu-type=nvidia-l4-24gb" in checks["deploy"]["detail"]
    assert {checks[n]["status"] for n in ("replicas", "health", "chat", "metrics")} == {"skip"}
    assert "FAILED 1 of 10 checks: deploy" in " ".join(result.stdout.split())
