"""The alerting rules through Debian's promtool: `check rules`, and `test rules` unit tests in which
each alert fires on the series it is for and stays quiet on healthy ones (and on its look-alikes)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from digital_worker.stacks.observability import RULES_FILE, prometheus_rules, rules_yaml

WORKER = {"namespace": "team", "digitalworker_io_instance": "bot"}
OTHER = {"namespace": "team", "digitalworker_io_instance": "healthy"}


def promtool() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is missing: Debian's prometheus package provides it (.ci/setup installs it)")
    return binary


def series(name: str, labels: dict[str, str], values: str) -> dict:
    inner = ", ".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{inner}}}", "values": values}


def rule_labels(alert: str) -> dict[str, str]:
    rule = next(r for r in prometheus_rules()["groups"][0]["rules"] if r["alert"] == alert)
    return dict(rule["labels"])


def firing(alert: str, **labels: str) -> dict:
    return {"exp_labels": {**labels, **rule_labels(alert)}}


def case(alert: str, eval_time: str, inputs: list[dict], expected: list[dict], interval: str = "15s") -> dict:
    return {"interval": interval, "input_series": inputs,
            "alert_rule_test": [{"eval_time": eval_time, "alertname": alert, "exp_alerts": expected}]}


def error_rate_cases() -> list[dict]:
    aborting = {**WORKER, "digitalworker_io_instance": "all-aborted"}
    inputs = [
        # bot: 6 finished and 2 aborted per 15 s -> 25% errors (SGLang's own `sglang:` names)
        series("sglang:num_requests_total", {**WORKER, "is_streaming": "false"}, "0+6x40"),
        series("sglang:num_aborted_requests_total", WORKER, "0+2x40"),
        # healthy: no aborts at all (prometheus_client's OpenMetrics `sglang_` names)
        series("sglang_num_requests_total", {**OTHER, "is_streaming": "true"}, "0+6x40"),
        series("sglang_num_aborted_requests_total", OTHER, "0+0x40"),
        # a revision that aborts everything has no finished-requests series at all: still 100%
        series("sglang_num_aborted_requests_total", aborting, "0+3x40"),
    ]
    alert = "DigitalWorkerHighErrorRate"
    return [
        case(alert, "1m", inputs, []),  # not for 2 minutes yet
        case(alert, "5m", inputs, [firing(alert, **WORKER), firing(alert, **aborting)]),
    ]


def timeout_cases() -> list[dict]:
    streaming = {**WORKER, "is_streaming": "true"}
    plain = {**WORKER, "digitalworker_io_instance": "batch", "is_streaming": "false"}
    fine = {**OTHER, "is_streaming": "true"}
    inputs = [
        # bot streams; 1 in 10 first tokens come after 60 s (bound written "60.0", as prometheus_client does)
        series("sglang_time_to_first_token_seconds_count", streaming, "0+10x60"),
        series("sglang_time_to_first_token_seconds_bucket", {**streaming, "le": "60.0"}, "0+9x60"),
        series("sglang_e2e_request_latency_seconds_count", streaming, "0+10x60"),
        # batch does not stream: 2 in 10 answers after 60 s end to end (bound written "60")
        series("sglang:e2e_request_latency_seconds_count", plain, "0+10x60"),
        series("sglang:e2e_request_latency_seconds_bucket", {**plain, "le": "60"}, "0+8x60"),
        # healthy: 1 in 100 -> 1%, under 5%
        series("sglang_time_to_first_token_seconds_count", fine, "0+100x60"),
        series("sglang_time_to_first_token_seconds_bucket", {**fine, "le": "60.0"}, "0+99x60"),
        series("sglang_e2e_request_latency_seconds_count", fine, "0+100x60"),
    ]
    alert = "DigitalWorkerRequestTimeouts"
    return [
        case(alert, "4m", inputs, []),
        case(alert, "12m", inputs, [firing(alert, **WORKER),
                                     firing(alert, namespace="team", digitalworker_io_instance="batch")]),
    ]


def cpu_cases() -> list[dict]:
    pods = {
        "hot": {"namespace": "team", "pod": "bot-1", "container": "sglang"},  # 0.9 cores of a 1-core request
        "limited": {"namespace": "team", "pod": "bot-2", "container": "sglang"},  # 0.9 of a 2-core limit
        "cool": {"namespace": "team", "pod": "bot-3", "container": "sglang"},  # 0.4 of 1
        "foreign": {"namespace": "team", "pod": "db-0", "container": "postgres"},  # not ours
    }
    ksm = {"job": "kube-state-metrics", "node": "n1", "resource": "cpu", "unit": "core"}
    usage = {"hot": "0+13.5x60", "limited": "0+13.5x60", "cool": "0+6x60", "foreign": "0+15x60"}
    inputs = []
    for key, labels in pods.items():
        inputs.append(series("container_cpu_usage_seconds_total", {**labels, "id": f"/{key}", "cpu": "total"}, usage[key]))
        inputs.append(series("kube_pod_container_resource_requests", {**labels, **ksm}, "1x60"))
    inputs.append(series("kube_pod_container_resource_limits", {**pods["limited"], **ksm}, "2x60"))
    alert = "DigitalWorkerHighCPU"
    return [
        case(alert, "4m", inputs, []),
        case(alert, "12m", inputs, [firing(alert, **pods["hot"])]),
    ]


def gpu_cases() -> list[dict]:
    gpu0 = {"Hostname": "n1", "gpu": "0", "UUID": "GPU-0"}
    gpu1 = {"Hostname": "n1", "gpu": "1", "UUID": "GPU-1"}
    gpu2 = {"Hostname": "n1", "gpu": "2", "UUID": "GPU-2"}
    owner = {"namespace": "team", "pod": "bot-1", "container": "sglang"}
    xid_inputs = [
        # an application XID (13) at 5 minutes on GPU 0, a fatal one (79) at 5 minutes on GPU 1
        series("digital_worker_gpu_xid_errors_total", {**gpu0, **owner, "xid": "13"}, "_x20 1x60"),
        series("digital_worker_gpu_xid_errors_total", {**gpu1, "xid": "79"}, "_x20 1x60"),
        series("DCGM_FI_DEV_XID_ERRORS", {**gpu2}, "0x80"),  # a quiet GPU
    ]
    ecc_inputs = [
        series("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", gpu0, "0x80"),
        series("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", gpu1, "0x10 1x70"),
        series("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", gpu2, "0x80"),
        series("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", gpu0, "0+5x80"),  # correctable: no alert
        series("DCGM_FI_DEV_ROW_REMAP_FAILURE", gpu0, "0x80"),
        series("DCGM_FI_DEV_ROW_REMAP_FAILURE", gpu2, "0x10 1x70"),
    ]
    return [
        case("DigitalWorkerGPUXidError", "4m", xid_inputs, []),
        case("DigitalWorkerGPUXidError", "6m", xid_inputs, [
            firing("DigitalWorkerGPUXidError", **gpu0, xid="13"), firing("DigitalWorkerGPUXidError", **gpu1, xid="79")]),
        case("DigitalWorkerGPUXidError", "20m", xid_inputs, []),  # nothing new for 10 minutes
        case("DigitalWorkerGPUFatalXid", "6m", xid_inputs, [firing("DigitalWorkerGPUFatalXid", **gpu1, xid="79")]),
        case("DigitalWorkerGPUFatalXid", "20m", xid_inputs, [firing("DigitalWorkerGPUFatalXid", **gpu1, xid="79")]),
        case("DigitalWorkerGPUUncorrectableECC", "2m", ecc_inputs, []),
        case("DigitalWorkerGPUUncorrectableECC", "5m", ecc_inputs, [
            firing("DigitalWorkerGPUUncorrectableECC", **gpu1), firing("DigitalWorkerGPUUncorrectableECC", **gpu2)]),
    ]


def operator_cases() -> list[dict]:
    stale = {"namespace": "team", "name": "bot"}
    gone = {"namespace": "team", "name": "switched-off"}  # holding, but the autoscaler no longer ticks it
    fine = {"namespace": "team", "name": "healthy"}
    decisions = {"action": "Hold", "mode": "Auto"}
    hold_inputs = [
        series("digitalworker_autoscaler_holding", {**stale, "condition": "MetricsStale"}, "1x80"),
        series("digitalworker_autoscaler_holding", {**stale, "condition": "MetricsMissing"}, "0x80"),
        series("digitalworker_autoscaler_decisions_total", {**stale, **decisions}, "0+1x80"),
        series("digitalworker_autoscaler_holding", {**gone, "condition": "MetricsStale"}, "1x80"),
        series("digitalworker_autoscaler_decisions_total", {**gone, **decisions}, "5x80"),
        series("digitalworker_autoscaler_holding", {**fine, "condition": "MetricsStale"}, "0x80"),
        series("digitalworker_autoscaler_decisions_total", {**fine, **decisions}, "0+1x80"),
    ]
    rollouts = [
        # created at 0 by the operator at start; one canary aborted at 5 minutes, one blue-green completes
        series("digitalworker_operator_rollouts_total", {"strategy": "Canary", "result": "Aborted"}, "0x19 1x100"),
        series("digitalworker_operator_rollouts_total", {"strategy": "Canary", "result": "Completed"}, "0x120"),
        series("digitalworker_operator_rollouts_total", {"strategy": "BlueGreen", "result": "Completed"}, "0x10 1x110"),
        series("digitalworker_operator_rollouts_total", {"strategy": "BlueGreen", "result": "Aborted"}, "0x120"),
    ]
    errors = [
        series("digitalworker_operator_reconcile_errors_total", {"kind": "transient"}, "0+1x100"),
        series("digitalworker_operator_reconcile_errors_total", {"kind": "unexpected"}, "0x100"),
    ]
    saturated = {**WORKER}
    busy_but_flowing = {**OTHER}
    saturation = [
        series("sglang_token_usage", {**saturated, "pod": "bot-1"}, "0.97x60"),
        series("sglang_token_usage", {**saturated, "pod": "bot-2"}, "0.93x60"),
        series("sglang_num_queue_reqs", {**saturated, "pod": "bot-1"}, "4x60"),
        series("sglang_num_queue_reqs", {**saturated, "pod": "bot-2"}, "0x60"),
        series("sglang_token_usage", {**busy_but_flowing, "pod": "h-1"}, "0.97x60"),
        series("sglang_num_queue_reqs", {**busy_but_flowing, "pod": "h-1"}, "0x60"),
    ]
    nvml = [
        series("digital_worker_nvml_up", {"Hostname": "cpu-node"}, "0x80"),
        series("digital_worker_nvml_up", {"Hostname": "gpu-node"}, "1x80"),
    ]
    return [
        case("DigitalWorkerAutoscalerHolding", "3m", hold_inputs, []),
        case("DigitalWorkerAutoscalerHolding", "8m", hold_inputs, [
            firing("DigitalWorkerAutoscalerHolding", **stale, condition="MetricsStale")]),
        case("DigitalWorkerRolloutAborted", "4m", rollouts, []),
        case("DigitalWorkerRolloutAborted", "6m", rollouts, [firing("DigitalWorkerRolloutAborted", strategy="Canary")]),
        case("DigitalWorkerRolloutAborted", "25m", rollouts, []),
        case("DigitalWorkerReconcileErrors", "10m", errors, []),
        case("DigitalWorkerReconcileErrors", "20m", errors, [firing("DigitalWorkerReconcileErrors", kind="transient")]),
        case("DigitalWorkerSaturated", "8m", saturation, []),
        case("DigitalWorkerSaturated", "13m", saturation, [firing("DigitalWorkerSaturated", **saturated)]),
        case("DigitalWorkerNodeAgentNoNVML", "9m", nvml, []),
        case("DigitalWorkerNodeAgentNoNVML", "12m", nvml, [firing("DigitalWorkerNodeAgentNoNVML", Hostname="cpu-node")]),
    ]


def without_annotations(rules: dict) -> dict:
    """promtool compares annotations too; the firing semantics are tested without them, and one
    case below checks how the templates render."""
    return {"groups": [{**g, "rules": [{k: v for k, v in r.items() if k != "annotations"} for r in g["rules"]]}
                       for g in rules["groups"]]}


def run_promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120)


def test_checked_in_rules_pass_promtool_check():
    result = run_promtool("check", "rules", str(RULES_FILE))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(prometheus_rules()['groups'][0]['rules'])} rules found" in result.stdout


def test_each_alert_fires_on_its_series_and_not_on_healthy_ones(tmp_path: Path):
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(without_annotations(prometheus_rules())))
    tests = error_rate_cases() + timeout_cases() + cpu_cases() + gpu_cases() + operator_cases()
    covered = {t["alert_rule_test"][0]["alertname"] for t in tests}
    assert covered == {r["alert"] for r in prometheus_rules()["groups"][0]["rules"]}, "an alert without a unit test"
    assert all(any(t["alert_rule_test"][0]["exp_alerts"] for t in tests if t["alert_rule_test"][0]["alertname"] == a)
               for a in covered), "an alert that is never expected to fire"
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump({
        "rule_files": ["rules.yaml"], "evaluation_interval": "15s", "tests": merged(tests)}))
    result = run_promtool("test", "rules", str(tmp_path / "tests.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def merged(tests: list[dict]) -> list[dict]:
    """Cases on the same input series run as one promtool test group (each group costs a TSDB)."""
    groups: list[dict] = []
    for test in tests:
        if groups and groups[-1]["input_series"] == test["input_series"] and groups[-1]["interval"] == test["interval"]:
            groups[-1]["alert_rule_test"] += test["alert_rule_test"]
        else:
            groups.append({**test, "alert_rule_test": list(test["alert_rule_test"])})
    return groups


def test_alert_annotations_render(tmp_path: Path):
    (tmp_path / "rules.yaml").write_text(rules_yaml())
    test = error_rate_cases()[1]
    test["alert_rule_test"][0]["exp_alerts"] = [{
        "exp_labels": {**WORKER, **rule_labels("DigitalWorkerHighErrorRate")},
        "exp_annotations": {
            "summary": "team/bot: 25% of requests fail",
            "description": next(r for r in prometheus_rules()["groups"][0]["rules"]
                                if r["alert"] == "DigitalWorkerHighErrorRate")["annotations"]["description"],
        },
    }, {
        "exp_labels": {**WORKER, "digitalworker_io_instance": "all-aborted",
                       **rule_labels("DigitalWorkerHighErrorRate")},
        "exp_annotations": {
            "summary": "team/all-aborted: 100% of requests fail",
            "description": next(r for r in prometheus_rules()["groups"][0]["rules"]
                                if r["alert"] == "DigitalWorkerHighErrorRate")["annotations"]["description"],
        },
    }]
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump({
        "rule_files": ["rules.yaml"], "evaluation_interval": "15s", "tests": [test]}))
    result = run_promtool("test", "rules", str(tmp_path / "tests.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
