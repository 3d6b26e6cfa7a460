"""The operator's own Prometheus metrics, registered once per process (several operators may run in
one test process; prometheus_client refuses duplicate registrations).

Served on `digital-worker run --metrics-port`. Names follow Prometheus conventions under the
`digitalworker_operator_` prefix; the autoscaler's own family keeps `digitalworker_autoscaler_`
(operator/autoscaling/controller.py). Label values that are known in advance are created at
registration so their series exist at 0: an alert on `increase()` then sees the first event too.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

ROLLOUT_STRATEGIES = ("Canary", "BlueGreen")
ROLLOUT_RESULTS = ("Completed", "Aborted")
ANALYSIS_VERDICTS = ("Successful", "Failed", "Inconclusive")
RECONCILE_ERROR_KINDS = ("transient", "unexpected")


@dataclass(frozen=True)
class OperatorMetrics:
    reconcile_seconds: Any
    reconcile_errors: Any
    rollouts: Any
    analysis_verdicts: Any
    autoscaler: Any


@functools.lru_cache(maxsize=1)
def operator_metrics() -> OperatorMetrics:
    from prometheus_client import Counter, Histogram

    from digital_worker.operator.autoscaling.controller import OperatorMetrics as AutoscalerMetrics

    metrics = OperatorMetrics(
        reconcile_seconds=Histogram(
            "digitalworker_operator_reconcile_duration_seconds", "Duration of one reconcile pass",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)),
        reconcile_errors=Counter(
            "digitalworker_operator_reconcile_errors", "Reconcile passes that failed, by kind", ["kind"]),
        rollouts=Counter(
            "digitalworker_operator_rollouts", "Rollouts that ended, by strategy and result (Completed, Aborted)",
            ["strategy", "result"]),
        analysis_verdicts=Counter(
            "digitalworker_operator_analysis_verdicts", "Rollout analysis runs, by verdict "
            "(Successful, Failed, Inconclusive)", ["verdict"]),
        autoscaler=AutoscalerMetrics(),
    )
    for kind in RECONCILE_ERROR_KINDS:
        metrics.reconcile_errors.labels(kind)
    for strategy in ROLLOUT_STRATEGIES:
        for result in ROLLOUT_RESULTS:
            metrics.rollouts.labels(strategy, result)
    for verdict in ANALYSIS_VERDICTS:
        metrics.analysis_verdicts.labels(verdict)
    return metrics


def record_rollout_result(strategy: str, result: str) -> None:
    """A rollout ended: `strategy` Canary|BlueGreen, `result` Completed|Aborted."""
    operator_metrics().rollouts.labels(strategy, result).inc()


def record_analysis_verdict(verdict: str) -> None:
    """One analysis run finished with `verdict` Successful|Failed|Inconclusive."""
    operator_metrics().analysis_verdicts.labels(verdict).inc()
