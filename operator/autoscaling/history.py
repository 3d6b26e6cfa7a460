"""Metric history of one DigitalWorker: what every policy reads. Pure data, no I/O."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping

# The series a MetricsSource fills (any may be missing: then it is absent or all NaN).
REQUEST_RATE = "request_rate"  # requests/s, summed over the replicas
PROMPT_TOKEN_RATE = "prompt_token_rate"  # tokens/s
GENERATION_TOKEN_RATE = "generation_token_rate"  # tokens/s
QUEUE_LENGTH = "queue_length"  # waiting requests, summed
RUNNING_REQUESTS = "running_requests"  # running requests, summed
KV_CACHE_USAGE = "kv_cache_usage"  # 0..1, the busiest replica
TTFT_P95 = "ttft_p95"  # seconds
ITL_P95 = "itl_p95"  # seconds between output tokens
GPU_UTILIZATION = "gpu_utilization"  # 0..1, from the node agents
GPU_MEMORY_USED = "gpu_memory_used"  # 0..1 of the fullest GPU's memory, from the node agents
METRIC_NAMES = (
    REQUEST_RATE,
    PROMPT_TOKEN_RATE,
    GENERATION_TOKEN_RATE,
    QUEUE_LENGTH,
    RUNNING_REQUESTS,
    KV_CACHE_USAGE,
    TTFT_P95,
    ITL_P95,
    GPU_UTILIZATION,
    GPU_MEMORY_USED,
)


@dataclass(frozen=True)
class MetricHistory:
    """Aligned samples: `series[name][i]` was observed at `timestamps[i]` (NaN: no sample)."""

    timestamps: tuple[float, ...] = ()
    series: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    step_seconds: float = 15.0
    error: str | None = None  # set when the source could not be read (e.g. Prometheus down)

    @classmethod
    def from_rows(cls, rows: Iterable[tuple[float, Mapping[str, float]]], step_seconds: float) -> "MetricHistory":
        rows = list(rows)
        timestamps = tuple(float(t) for t, _ in rows)
        series = {name: tuple(float(values.get(name, math.nan)) for _, values in rows) for name in METRIC_NAMES}
        return cls(timestamps, series, step_seconds)

    @classmethod
    def failed(cls, error: str) -> "MetricHistory":
        return cls(error=error)

    def values(self, name: str) -> tuple[float, ...]:
        return self.series.get(name, ())

    def latest(self, name: str) -> float | None:
        for value in reversed(self.values(name)):
            if not math.isnan(value):
                return value
        return None

    def last_sample_time(self, name: str = REQUEST_RATE) -> float | None:
        values = self.values(name)
        for index in range(len(values) - 1, -1, -1):
            if not math.isnan(values[index]):
                return self.timestamps[index]
        return None

    def staleness(self, now: float, name: str = REQUEST_RATE) -> float:
        """Seconds since the newest sample of `name` (infinite when there is none)."""
        last = self.last_sample_time(name)
        return math.inf if last is None else max(0.0, now - last)

    def mean(self, name: str, since: float) -> float | None:
        picked = [v for t, v in zip(self.timestamps, self.values(name)) if t >= since and not math.isnan(v)]
        return sum(picked) / len(picked) if picked else None

    def maximum(self, name: str, since: float) -> float | None:
        picked = [v for t, v in zip(self.timestamps, self.values(name)) if t >= since and not math.isnan(v)]
        return max(picked) if picked else None

    def points(self, name: str, since: float = -math.inf) -> list[tuple[float, float]]:
        return [(t, v) for t, v in zip(self.timestamps, self.values(name)) if t >= since and not math.isnan(v)]
