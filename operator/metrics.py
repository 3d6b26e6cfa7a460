"""The operator's own Prometheus metrics, registered once per process (several operators may run in
one test process; prometheus_client refuses duplicate registrations)."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class OperatorMetrics:
    reconcile_seconds: Any
    reconcile_errors: Any
    autoscaler: Any


@functools.lru_cache(maxsize=1)
def operator_metrics() -> OperatorMetrics:
    from prometheus_client import Counter, Histogram

    from digital_worker.operator.autoscaling.controller import OperatorMetrics as AutoscalerMetrics

    return OperatorMetrics(
        reconcile_seconds=Histogram("digitalworker_reconcile_seconds", "Duration of one reconcile pass",
                                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)),
        reconcile_errors=Counter("digitalworker_reconcile_errors", "Reconcile passes that failed, by kind",
                                 ["kind"]),
        autoscaler=AutoscalerMetrics(),
    )
