"""Fast checks: the checked-in files equal the generator, the dashboard is well formed, the CLI prints
both without Pulumi, the platform deploys them, and the operator's metrics behave."""
from __future__ import annotations

import json
import subprocess
import sys

import yaml
from digital_worker.operator.autoscaling.controller import OperatorMetrics
from digital_worker.operator.autoscaling.forecast import Forecast
from digital_worker.operator.autoscaling.policy import HOLD, HOLD_METRICS_MISSING, HOLD_METRICS_STALE, Decision
from digital_worker.stacks import manifests, observability
from digital_worker.stacks.observability import grafana
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from promql_names import referenced

from digital_worker.cli import main


def test_checked_in_files_equal_the_generator():
    assert observability.DASHBOARD_FILE.read_text() == observability.dashboard_json(), \
        "run `digital-worker observability write`"
    assert observability.RULES_FILE.read_text() == observability.rules_yaml(), "run `digital-worker observability write`"
    assert yaml.safe_load(observability.RULES_FILE.read_text()) == observability.prometheus_rules()


def test_dashboard_is_well_formed():
    board = json.loads(observability.DASHBOARD_FILE.read_text())
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    titles = [p["title"] for p in board["panels"] if p["type"] != "row"]
    for wanted in ("Requests per second", "Time to first token", "Inter-token latency", "Queued and running requests",
                   "KV cache usage", "GPU utilization", "GPU memory used", "GPU temperature",
                   "Replicas: current, desired, serving", "Demand vs forecast", "Rollouts ended"):
        assert wanted in titles
    occupied = set()
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24
        cells = {(grid["x"] + dx, grid["y"] + dy) for dx in range(grid["w"]) for dy in range(grid["h"])}
        assert not cells & occupied, f"{panel['title']} overlaps another panel"
        occupied |= cells
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs))
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and set(variables) == {"datasource", "namespace", "worker"}
    # Every SGLang selector takes both name forms, as Prometheus may store either.
    for expr in grafana.queries(board):
        assert "sglang:" not in expr and "sglang_" not in expr, expr


def test_metric_name_extraction():
    names, regexes = referenced('sum by (le, namespace) (rate({__name__=~"sglang[:_]x_bucket", le=~"60|60.0"}[$__rate_interval]))'
                                ' / on (namespace) group_left max(DCGM_FI_DEV_GPU_TEMP{gpu="0"} offset 10m) > bool 2')
    assert names == {"DCGM_FI_DEV_GPU_TEMP"} and regexes == {"sglang[:_]x_bucket"}


def test_cli_prints_rules_and_dashboard(capsys):
    assert main(["observability", "rules"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == observability.prometheus_rules()
    assert main(["observability", "dashboard"]) == 0
    assert json.loads(capsys.readouterr().out)["uid"] == grafana.UID
    assert main(["observability", "rules", "--prometheus-rule", "-n", "mon"]) == 0
    rule = yaml.safe_load(capsys.readouterr().out)
    assert rule["kind"] == "PrometheusRule" and rule["metadata"]["namespace"] == "mon"
    assert main(["observability", "dashboard", "--configmap"]) == 0
    configmap = yaml.safe_load(capsys.readouterr().out)
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["digital-worker-fleet.json"])["uid"] == grafana.UID


def test_cli_needs_no_pulumi(tmp_path):
    code = ("import sys; from digital_worker.cli import main; main(['observability', 'write', '--dir', sys.argv[1]]); "
            "assert not [m for m in sys.modules if m.startswith(('pulumi', 'kopf', 'statsmodels'))], sys.modules")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "dashboard.json").read_text() == observability.DASHBOARD_FILE.read_text()
    assert (tmp_path / "prometheus-rules.yaml").read_text() == observability.RULES_FILE.read_text()


def test_platform_deploys_rules_and_dashboard():
    with_operator = manifests.platform_objects(manifests.PlatformSettings(prometheus_mode="podmonitor"))
    kinds = {o["kind"]: o for o in with_operator.monitoring}
    assert kinds["PrometheusRule"]["spec"] == observability.prometheus_rules()
    assert kinds["ServiceMonitor"]["spec"]["endpoints"][0]["honorLabels"] is True
    assert "digital-worker-fleet.json" in kinds["ConfigMap"]["data"]
    helm = manifests.PlatformSettings(prometheus_mode="helm")
    assert manifests.prometheus_helm_values(helm)["serverFiles"]["alerting_rules.yml"] == observability.prometheus_rules()
    assert [o["kind"] for o in manifests.platform_objects(helm).monitoring] == ["ConfigMap"]


def test_operator_records_rollouts_and_verdicts_on_its_registry():
    from digital_worker.operator.metrics import operator_metrics, record_analysis_verdict, record_rollout_result

    operator_metrics()

    def value(name, **labels):
        return REGISTRY.get_sample_value(name, labels) or 0.0

    # Known label values exist from the start, at 0.
    assert REGISTRY.get_sample_value("digitalworker_operator_rollouts_total",
                                     {"strategy": "BlueGreen", "result": "Aborted"}) is not None
    assert REGISTRY.get_sample_value("digitalworker_operator_analysis_verdicts_total",
                                     {"verdict": "Inconclusive"}) is not None
    before = value("digitalworker_operator_rollouts_total", strategy="Canary", result="Completed")
    failed = value("digitalworker_operator_analysis_verdicts_total", verdict="Failed")
    record_rollout_result("Canary", "Completed")
    record_analysis_verdict("Failed")
    record_analysis_verdict("Failed")
    assert value("digitalworker_operator_rollouts_total", strategy="Canary", result="Completed") == before + 1
    assert value("digitalworker_operator_analysis_verdicts_total", verdict="Failed") == failed + 2
    text = generate_latest(REGISTRY).decode()
    assert 'digitalworker_operator_reconcile_duration_seconds_bucket{le="0.005"}' in text
    assert 'digitalworker_operator_reconcile_errors_total{kind="unexpected"}' in text
    assert "# TYPE digitalworker_autoscaler_holding gauge" in text


def test_holding_gauge_follows_the_decision_and_goes_with_the_worker():
    registry = CollectorRegistry()
    metrics = OperatorMetrics(registry)

    def holding(condition):
        return registry.get_sample_value("digitalworker_autoscaler_holding",
                                         {"namespace": "team", "name": "bot", "condition": condition})

    metrics.record("team", "bot", Decision(3, HOLD, "no metrics for 5m", hold_condition=HOLD_METRICS_STALE),
                   "Auto", 3, None, None)
    assert holding(HOLD_METRICS_STALE) == 1 and holding(HOLD_METRICS_MISSING) == 0
    assert registry.get_sample_value("digitalworker_autoscaler_current_replicas", {"namespace": "team", "name": "bot"}) == 3
    forecast = Forecast(horizon_seconds=300, point=12.0, upper=15.0, lower=9.0, quantile=0.9, model="holt-winters")
    metrics.record("team", "bot", Decision(4, "ScaleUp", "load"), "Auto", 3, forecast, 1.5)
    assert registry.get_sample_value("digitalworker_autoscaler_forecast_requests_per_second",
                                     {"namespace": "team", "name": "bot", "bound": "upper"}) == 15.0
    assert holding(HOLD_METRICS_STALE) == 0 and holding(HOLD_METRICS_MISSING) == 0
    assert registry.get_sample_value("digitalworker_autoscaler_forecast_abs_error",
                                     {"namespace": "team", "name": "bot"}) == 1.5
    metrics.forget("team", "bot")
    assert holding(HOLD_METRICS_STALE) is None
    assert registry.get_sample_value("digitalworker_autoscaler_forecast_requests_per_second",
                                     {"namespace": "team", "name": "bot", "bound": "upper"}) is None
    assert registry.get_sample_value("digitalworker_autoscaler_desired_replicas", {"namespace": "team", "name": "bot"}) is None
