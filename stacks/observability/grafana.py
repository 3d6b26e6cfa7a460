"""The Grafana "digital-worker fleet" dashboard, as a dict (Grafana's dashboard JSON model).

Rows: traffic (requests, errors, timeouts, traffic by revision), latency (TTFT, ITL, end to end),
load (queue, KV cache, throughput), GPUs (utilization, memory, temperature, health), autoscaling
(replicas vs desired, demand vs forecast, holds) and rollouts/operator. Rollout ends and scaling
steps are annotations on every panel. Variables: the Prometheus data source, namespace, worker.
"""
from __future__ import annotations

from typing import Any

from digital_worker.operator.metric_providers import (E2E_HISTOGRAM, INSTANCE_LABEL, ITL_HISTOGRAM, KV_USAGE_GAUGE,
                                                      QUEUE_GAUGE, REQUESTS_TOTAL, REVISION_LABEL, TTFT_HISTOGRAM)

from .promql import WORKER_LABELS, error_share, sglang, sum_rate, timeout_share

UID = "digital-worker-fleet"
TITLE = "digital-worker fleet"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"
# Series selection by the dashboard's variables: SGLang series carry the worker as
# digitalworker_io_instance, the operator's as name; GPU series carry the namespace of the pod on them.
WORKER_FILTER = f'namespace=~"$namespace", {INSTANCE_LABEL}=~"$worker"'
OPERATOR_FILTER = 'namespace=~"$namespace", name=~"$worker"'
GPU_FILTER = 'namespace=~"$namespace"'
WORKER_LEGEND = "{{namespace}}/{{%s}}" % INSTANCE_LABEL
OPERATOR_LEGEND = "{{namespace}}/{{name}}"
GPU_LEGEND = "{{Hostname}} GPU {{gpu}}"
PANEL_WIDTH = 8
PANEL_HEIGHT = 8


def _quantiles(histogram: str) -> list[tuple[str, str]]:
    selector = sglang(f"{histogram}_bucket", WORKER_FILTER)
    return [(f"histogram_quantile({q}, sum by (le, {WORKER_LABELS}) (rate({selector}[{RATE}])))",
             f"p{round(q * 100)} {WORKER_LEGEND}") for q in (0.5, 0.95, 0.99)]


def _rows() -> list[tuple[str, list[dict]]]:
    requests = sum_rate(sglang(REQUESTS_TOTAL, WORKER_FILTER), RATE)
    return [
        ("Traffic", [
            _panel("Requests per second", [(requests, WORKER_LEGEND)], "reqps",
                   "Requests SGLang finished per second, per worker."),
            _panel("Errors (aborted or non-2xx share)", [(error_share(RATE, WORKER_FILTER), WORKER_LEGEND)], "percentunit",
                   "Aborted requests (clients hanging up, aborts) and non-2xx answers (internal errors) over "
                   "ended requests. Alert at 10% for 2 minutes."),
            _panel("Timeouts (first byte after 60 s)", [(timeout_share(RATE, WORKER_FILTER), WORKER_LEGEND)],
                   "percentunit", "Share of requests whose first byte came after 60 s (TTFT when streaming, "
                   "end-to-end otherwise). Alert at 5%."),
            _panel("Traffic by revision", [(
                sum_rate(sglang(REQUESTS_TOTAL, WORKER_FILTER), RATE, f"{WORKER_LABELS}, {REVISION_LABEL}"),
                "%s {{%s}}" % (WORKER_LEGEND, REVISION_LABEL))], "reqps",
                "Requests per revision: a canary's share grows step by step, an aborted one drops to 0.",
                stacked=True),
        ]),
        ("Latency", [
            _panel("Time to first token", _quantiles(TTFT_HISTOGRAM), "s", "p50, p95, p99 per worker."),
            _panel("Inter-token latency", _quantiles(ITL_HISTOGRAM), "s", "p50, p95, p99 per worker."),
            _panel("End-to-end latency", _quantiles(E2E_HISTOGRAM), "s", "p50, p95, p99 per worker."),
        ]),
        ("Load", [
            _panel("Queued and running requests", [
                (f"sum by ({WORKER_LABELS}) ({sglang(QUEUE_GAUGE, WORKER_FILTER)})", f"queued {WORKER_LEGEND}"),
                (f"sum by ({WORKER_LABELS}) ({sglang('num_running_reqs', WORKER_FILTER)})",
                 f"running {WORKER_LEGEND}"),
            ], "short", "Requests waiting for a batch slot, and requests in a batch."),
            _panel("KV cache usage", [
                (f"max by ({WORKER_LABELS}) ({sglang(KV_USAGE_GAUGE, WORKER_FILTER)})", f"max {WORKER_LEGEND}"),
                (f"avg by ({WORKER_LABELS}) ({sglang(KV_USAGE_GAUGE, WORKER_FILTER)})", f"avg {WORKER_LEGEND}"),
            ], "percentunit", "Share of KV cache tokens in use: the fullest replica and the average."),
            _panel("Generation throughput", [
                (f"sum by ({WORKER_LABELS}) ({sglang('gen_throughput', WORKER_FILTER)})", WORKER_LEGEND),
            ], "short", "Tokens generated per second, all replicas."),
        ]),
        ("GPUs", [
            _panel("GPU utilization", [(f"max by (Hostname, gpu) (DCGM_FI_DEV_GPU_UTIL{{{GPU_FILTER}}})",
                                        GPU_LEGEND)], "percent", "From the node agents (dcgm-exporter names)."),
            _panel("GPU memory used", [(
                f"max by (Hostname, gpu) (DCGM_FI_DEV_FB_USED{{{GPU_FILTER}}}) / "
                f"max by (Hostname, gpu) (DCGM_FI_DEV_FB_TOTAL{{{GPU_FILTER}}})", GPU_LEGEND)], "percentunit",
                "Framebuffer used over total."),
            _panel("GPU temperature", [(f"max by (Hostname, gpu) (DCGM_FI_DEV_GPU_TEMP{{{GPU_FILTER}}})",
                                        GPU_LEGEND)], "celsius", ""),
            _panel("GPU health", [
                (f"min by (Hostname, gpu) (digital_worker_gpu_healthy{{{GPU_FILTER}}})", f"healthy {GPU_LEGEND}"),
                ("sum by (Hostname, gpu, xid) (increase(digital_worker_gpu_xid_errors_total[%s]))" % RATE,
                 "XID {{xid}} " + GPU_LEGEND),
            ], "short", "1 = healthy; 0 after a fatal XID, uncorrectable ECC or a row remap failure. "
                        "XID errors counted per interval."),
            _panel("Power draw", [(f"max by (Hostname, gpu) (DCGM_FI_DEV_POWER_USAGE{{{GPU_FILTER}}})",
                                   GPU_LEGEND)], "watt", ""),
        ]),
        ("Autoscaling", [
            _panel("Replicas: current, desired, serving", [
                (f"max by (namespace, name) (digitalworker_autoscaler_current_replicas{{{OPERATOR_FILTER}}})",
                 f"current {OPERATOR_LEGEND}"),
                (f"max by (namespace, name) (digitalworker_autoscaler_desired_replicas{{{OPERATOR_FILTER}}})",
                 f"desired {OPERATOR_LEGEND}"),
                (f"count by ({WORKER_LABELS}) ({sglang('num_running_reqs', WORKER_FILTER)})",
                 f"serving {WORKER_LEGEND}"),
            ], "short", "Replicas the worker has, the autoscaler wants, and that answer scrapes."),
            _panel("Demand vs forecast", [
                (requests, f"observed {WORKER_LEGEND}"),
                (f'max by (namespace, name, bound) (digitalworker_autoscaler_forecast_requests_per_second'
                 f'{{{OPERATOR_FILTER}, bound=~"point|upper"}})', "forecast {{bound}} " + OPERATOR_LEGEND),
            ], "reqps", "Requests per second now, and the forecast the autoscaler sizes for (at its lead "
                        "time, so the forecast runs ahead of the load)."),
            _panel("Autoscaler holds and forecast error", [
                (f"max by (namespace, name, condition) (digitalworker_autoscaler_holding{{{OPERATOR_FILTER}}})",
                 "holding {{condition}} " + OPERATOR_LEGEND),
                (f"max by (namespace, name) (digitalworker_autoscaler_forecast_abs_error{{{OPERATOR_FILTER}}})",
                 f"abs error (req/s) {OPERATOR_LEGEND}"),
            ], "short", "1 while the autoscaler holds for lack of metrics; last one-bucket forecast error."),
        ]),
        ("Rollouts and operator", [
            _panel("Rollouts ended", [
                (f"sum by (strategy, result) (increase(digitalworker_operator_rollouts_total[{RATE}]))",
                 "{{strategy}} {{result}}"),
            ], "short", "Rollouts that completed or were aborted.", bars=True),
            _panel("Analysis verdicts", [
                (f"sum by (verdict) (increase(digitalworker_operator_analysis_verdicts_total[{RATE}]))",
                 "{{verdict}}"),
            ], "short", "Canary analysis runs by verdict.", bars=True),
            _panel("Scaling decisions", [
                (f"sum by (action, mode) (increase(digitalworker_autoscaler_decisions_total"
                 f"{{{OPERATOR_FILTER}}}[{RATE}]))", "{{action}} ({{mode}})"),
            ], "short", "Autoscaler decisions: ScaleUp, ScaleDown, Hold (DryRun ones are only recorded).",
                bars=True),
            _panel("Reconcile duration and errors", [
                ("histogram_quantile(0.95, sum by (le) "
                 f"(rate(digitalworker_operator_reconcile_duration_seconds_bucket[{RATE}])))", "p95 duration (s)"),
                (f"sum by (kind) (rate(digitalworker_operator_reconcile_errors_total[{RATE}]))",
                 "errors/s {{kind}}"),
            ], "short", ""),
            _panel("Forecast fit time", [
                ("histogram_quantile(0.95, sum by (le) "
                 f"(rate(digitalworker_autoscaler_fit_seconds_bucket[{RATE}])))", "p95 fit (s)"),
            ], "s", "Time statsmodels takes to fit the demand forecast (in a worker thread)."),
        ]),
    ]


def _panel(title: str, targets: list[tuple[str, str]], unit: str, description: str, *,
           stacked: bool = False, bars: bool = False) -> dict:
    custom: dict[str, Any] = {"drawStyle": "bars" if bars else "line", "fillOpacity": 30 if (stacked or bars) else 10,
                              "showPoints": "never", "spanNulls": True}
    if stacked:
        custom["stacking"] = {"mode": "normal", "group": "A"}
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "fieldConfig": {"defaults": {"unit": unit, "custom": custom}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
        "targets": [{"datasource": DATASOURCE, "refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend}
                    for i, (expr, legend) in enumerate(targets)],
    }


def _variable(name: str, label: str, query: str) -> dict:
    return {
        "name": name, "label": label, "type": "query", "datasource": DATASOURCE,
        "query": query, "definition": query,
        "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*", "sort": 1,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
    }


def annotations() -> list[dict]:
    """Rollout ends and Auto scaling steps, drawn on every panel."""
    builtin = {"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True,
               "hide": True, "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts", "type": "dashboard"}
    return [
        builtin,
        {"name": "Rollouts", "datasource": DATASOURCE, "enable": True, "iconColor": "orange", "step": "30s",
         "expr": "sum by (strategy, result) (increase(digitalworker_operator_rollouts_total[1m])) > 0",
         "titleFormat": "Rollout {{result}}", "textFormat": "{{strategy}} rollout {{result}}",
         "tagKeys": "strategy,result", "useValueForTime": False},
        {"name": "Scaling", "datasource": DATASOURCE, "enable": True, "iconColor": "green", "step": "30s",
         "expr": "sum by (namespace, name, action) (increase(digitalworker_autoscaler_decisions_total"
                 '{action!="Hold", mode="Auto"}[1m])) > 0',
         "titleFormat": "{{action}}", "textFormat": "{{namespace}}/{{name}} {{action}}",
         "tagKeys": "namespace,name,action", "useValueForTime": False},
    ]


def dashboard() -> dict:
    panels: list[dict] = []
    next_id = 1
    y = 0
    for row_title, row_panels in _rows():
        panels.append({"type": "row", "title": row_title, "id": next_id, "collapsed": False, "panels": [],
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        next_id += 1
        y += 1
        for index, panel in enumerate(row_panels):
            column = index % (24 // PANEL_WIDTH)
            if index and column == 0:
                y += PANEL_HEIGHT
            panel["id"] = next_id
            panel["gridPos"] = {"h": PANEL_HEIGHT, "w": PANEL_WIDTH, "x": column * PANEL_WIDTH, "y": y}
            panels.append(panel)
            next_id += 1
        y += PANEL_HEIGHT
    requests_metric = sglang(REQUESTS_TOTAL)
    worker_metric = sglang(REQUESTS_TOTAL, 'namespace=~"$namespace"')
    return {
        "uid": UID,
        "title": TITLE,
        "description": "SGLang digital workers: traffic, latency, load, GPUs, autoscaling and rollouts.",
        "tags": ["digital-worker", "sglang", "llm"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-3h", "to": "now"},
        "annotations": {"list": annotations()},
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0, "refresh": 1},
            _variable("namespace", "Namespace", f"label_values({requests_metric}, namespace)"),
            _variable("worker", "DigitalWorker", f"label_values({worker_metric}, {INSTANCE_LABEL})"),
        ]},
        "panels": panels,
    }


def queries(board: dict | None = None) -> list[str]:
    """Every PromQL expression in the dashboard: panel targets, then annotations."""
    board = board or dashboard()
    found = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    found += [a["expr"] for a in board["annotations"]["list"] if "expr" in a]
    return found
