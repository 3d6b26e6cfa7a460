"""Prometheus alerting rules for a digital-worker fleet, as one rule group (a dict).

`prometheus_rules()` is the content of a Prometheus rule file and of a PrometheusRule's `spec`.
What "error", "timeout" and "CPU" are measured on is explained in `promql.py`.
"""
from __future__ import annotations

from typing import Any

from digital_worker.operator.gpu_health import FATAL_XIDS
from digital_worker.operator.metric_providers import KV_USAGE_GAUGE, QUEUE_GAUGE

from .promql import TIMEOUT_SECONDS, WORKER_LABELS, cpu_share, error_share, sglang, timeout_share

GROUP_NAME = "digital-worker"

ERROR_SHARE_THRESHOLD = 0.10
TIMEOUT_SHARE_THRESHOLD = 0.05
CPU_THRESHOLD = 0.85
KV_USAGE_THRESHOLD = 0.90
GPU_LABELS = "Hostname, gpu, UUID"
WORKER = "{{ $labels.namespace }}/{{ $labels.digitalworker_io_instance }}"


def _alert(name: str, expr: str, severity: str, summary: str, description: str, for_: str | None = None) -> dict:
    rule: dict[str, Any] = {"alert": name, "expr": expr}
    if for_:
        rule["for"] = for_
    rule["labels"] = {"severity": severity, "component": "digital-worker"}
    rule["annotations"] = {"summary": summary, "description": description}
    return rule


def alert_rules() -> list[dict]:
    fatal = "|".join(str(x) for x in sorted(FATAL_XIDS))
    xids = "digital_worker_gpu_xid_errors_total"
    by_xid = f"{GPU_LABELS}, xid"
    return [
        _alert("DigitalWorkerHighErrorRate",
               f"{error_share('1m')} > {ERROR_SHARE_THRESHOLD}", "critical",
               f"{WORKER}: {{{{ $value | humanizePercentage }}}} of requests fail",
               "More than 10% of the requests that ended failed for 2 minutes: answered non-2xx by SGLang "
               "(internal errors) or aborted (clients hanging up).", "2m"),
        _alert("DigitalWorkerRequestTimeouts",
               f"{timeout_share('5m')} > {TIMEOUT_SHARE_THRESHOLD}", "warning",
               f"{WORKER}: {{{{ $value | humanizePercentage }}}} of requests wait over {TIMEOUT_SECONDS}s",
               f"More than 5% of requests got their first byte after {TIMEOUT_SECONDS}s (time to first token "
               "when streaming, end-to-end latency otherwise): a gateway with that read timeout cuts them. "
               "Scale out, or look at queue length and KV cache usage.", "5m"),
        _alert("DigitalWorkerHighCPU",
               f"{cpu_share('5m')} > {CPU_THRESHOLD}", "warning",
               "{{ $labels.namespace }}/{{ $labels.pod }} ({{ $labels.container }}) uses "
               "{{ $value | humanizePercentage }} of its CPU",
               "CPU use over 85% of the container's CPU limit (or request) for 5 minutes. A starved SGLang "
               "scheduler or tokenizer shows up as latency before the GPU is busy.", "5m"),
        _alert("DigitalWorkerGPUXidError",
               f"(max by ({by_xid}) (increase({xids}[10m])) > 0) or "
               f"(max by ({by_xid}) ({xids}) unless max by ({by_xid}) ({xids} offset 10m))", "warning",
               "XID {{ $labels.xid }} on GPU {{ $labels.gpu }} of {{ $labels.Hostname }}",
               "The node agent saw an XID error in the last 10 minutes."),
        _alert("DigitalWorkerGPUFatalXid",
               f'max by ({by_xid}) ({xids}{{xid=~"{fatal}"}}) > 0', "critical",
               "Fatal XID {{ $labels.xid }} on GPU {{ $labels.gpu }} of {{ $labels.Hostname }}",
               "The GPU needs a reset. The operator replaces replicas on it and taints the node "
               "digitalworker.io/gpu-unhealthy."),
        _alert("DigitalWorkerGPUUncorrectableECC",
               f"(max by ({GPU_LABELS}) (DCGM_FI_DEV_ECC_DBE_VOL_TOTAL) > 0) or "
               f"(max by ({GPU_LABELS}) (DCGM_FI_DEV_ROW_REMAP_FAILURE) > 0)", "critical",
               "Uncorrectable ECC error on GPU {{ $labels.gpu }} of {{ $labels.Hostname }}",
               "Double-bit (uncorrectable) ECC errors since the last reset, or a failed row remap: the GPU "
               "needs a reset or replacement. The operator replaces replicas on it and taints the node."),
        _alert("DigitalWorkerAutoscalerHolding",
               "max by (namespace, name, condition) (digitalworker_autoscaler_holding) == 1 "
               "and on (namespace, name) "
               "sum by (namespace, name) (increase(digitalworker_autoscaler_decisions_total[10m])) > 0",
               "warning",
               "{{ $labels.namespace }}/{{ $labels.name }}: autoscaler holds ({{ $labels.condition }})",
               "The autoscaler cannot see the load (stale or missing metrics) and keeps the replica count "
               "as it is. Check Prometheus and the worker's scrape targets.", "5m"),
        _alert("DigitalWorkerRolloutAborted",
               "sum by (strategy) (increase(digitalworker_operator_rollouts_total{result=\"Aborted\"}[15m])) > 0",
               "warning",
               "A {{ $labels.strategy }} rollout was aborted",
               "Analysis failed (or someone aborted): the stable revision took all traffic back and the "
               "worker is Degraded. `kubectl get events --field-selector reason=RolloutAborted -A` and "
               "`digital-worker status` say which worker and why."),
        _alert("DigitalWorkerSaturated",
               f"avg by ({WORKER_LABELS}) ({sglang(KV_USAGE_GAUGE)}) > {KV_USAGE_THRESHOLD} "
               f"and on ({WORKER_LABELS}) sum by ({WORKER_LABELS}) ({sglang(QUEUE_GAUGE)}) > 0", "warning",
               f"{WORKER}: KV cache {{{{ $value | humanizePercentage }}}} full with requests queued",
               "Replicas are out of KV cache and requests wait: latency grows. Scale out (or let the "
               "autoscaler do it).", "10m"),
        _alert("DigitalWorkerReconcileErrors",
               "sum by (kind) (rate(digitalworker_operator_reconcile_errors_total[5m])) > 0", "warning",
               "The operator's reconcile passes fail ({{ $labels.kind }})",
               "Reconcile passes have been failing for 15 minutes: see the operator's log.", "15m"),
        _alert("DigitalWorkerNodeAgentNoNVML",
               "max by (Hostname) (digital_worker_nvml_up) == 0", "warning",
               "Node agent on {{ $labels.Hostname }} cannot reach NVML",
               "No NVIDIA driver answers on this node: its GPUs are not watched for faults.", "10m"),
    ]


def prometheus_rules() -> dict:
    """A Prometheus rule file (also the `spec` of a PrometheusRule)."""
    return {"groups": [{"name": GROUP_NAME, "rules": alert_rules()}]}
