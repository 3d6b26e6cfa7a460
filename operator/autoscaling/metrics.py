"""Where the autoscaler's metric history comes from: Prometheus, or an in-process scraper.

`MetricsSource.history(selector, window_seconds, step, now=None) -> MetricHistory`:
`selector` is a PromQL label matcher chosen by the operator, e.g. ``job="dw-ai-support-bot"`` or
``namespace="team-a",model_name="qwen2.5-7b"``. Both forms of SGLang's metric names are accepted
(``sglang:num_queue_reqs`` as SGLang registers them, ``sglang_num_queue_reqs`` as
prometheus_client renders them for OpenMetrics scrapes).

Sources never raise for an unreachable backend: they return `MetricHistory.failed(reason)`, and
the policy holds (never scales down blind).
"""
from __future__ import annotations

import math
import threading
import time
import urllib.request
from bisect import bisect_right
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterable, Mapping, Protocol, Sequence

from digital_worker.operator.metric_providers import SGLANG_HTTP_RESPONSES

from .history import (
    GENERATION_TOKEN_RATE,
    GPU_MEMORY_USED,
    GPU_UTILIZATION,
    KV_CACHE_USAGE,
    PROMPT_TOKEN_RATE,
    QUEUE_LENGTH,
    REQUEST_RATE,
    RUNNING_REQUESTS,
    ITL_P95,
    TTFT_P95,
    MetricHistory,
)


# (namespace, pod names) of one worker: the node agents attribute GPUs to pods, not to workers.
GpuPods = tuple[str, tuple[str, ...]]


class MetricsSource(Protocol):
    def history(self, selector: str, window_seconds: float, step: float, now: float | None = None,
                names: Sequence[str] | None = None, gpu_pods: GpuPods | None = None) -> MetricHistory:
        """Samples every `step` seconds over the last `window_seconds` (only `names`, when given);
        GPU series too when `gpu_pods` names the worker's pods and a source can see their GPUs."""
        ...


def sglang_name(metric: str) -> str:
    """A `__name__` matcher accepting both `sglang:` and `sglang_` spellings."""
    return f'__name__=~"sglang[:_]{metric}"'


def _matchers(metric: str, selector: str) -> str:
    selector = selector.strip().strip("{}").strip()
    return "{" + sglang_name(metric) + (f",{selector}" if selector else "") + "}"


def _gpu_series(metric: str, namespace: str, pods: Sequence[str]) -> str:
    """A DCGM-style series of the GPUs held by `pods`. The node agents label each GPU with the pod
    using it; scraped as a pod themselves those labels arrive as exported_pod/exported_namespace."""
    # Pod names are DNS labels: only the dot needs escaping (as `\\.` inside a PromQL string).
    names = "|".join(pod.replace(".", "\\\\.") for pod in sorted(pods))
    return (f'({metric}{{exported_namespace="{namespace}",exported_pod=~"{names}"}} or '
            f'{metric}{{namespace="{namespace}",pod=~"{names}"}})')


def gpu_queries(namespace: str, pods: Sequence[str]) -> dict[str, str]:
    """Mean GPU utilisation (0..1) and the fullest GPU's memory share of a worker's pods."""
    used = _gpu_series("DCGM_FI_DEV_FB_USED", namespace, pods)
    free = _gpu_series("DCGM_FI_DEV_FB_FREE", namespace, pods)
    return {
        GPU_UTILIZATION: f"avg({_gpu_series('DCGM_FI_DEV_GPU_UTIL', namespace, pods)}) / 100",
        GPU_MEMORY_USED: f"max({used} / ({used} + {free}))",
    }


def promql_queries(selector: str, rate_window_seconds: float) -> dict[str, str]:
    """The PromQL for each SGLang series of a MetricHistory (GPU series: `gpu_queries`)."""
    window = f"{max(1, int(round(rate_window_seconds)))}s"
    return {
        REQUEST_RATE: f"sum(rate({_matchers('num_requests_total', selector)}[{window}]))",
        PROMPT_TOKEN_RATE: f"sum(rate({_matchers('prompt_tokens_total', selector)}[{window}]))",
        GENERATION_TOKEN_RATE: f"sum(rate({_matchers('generation_tokens_total', selector)}[{window}]))",
        QUEUE_LENGTH: f"sum({_matchers('num_queue_reqs', selector)})",
        RUNNING_REQUESTS: f"sum({_matchers('num_running_reqs', selector)})",
        KV_CACHE_USAGE: f"max({_matchers('token_usage', selector)})",
        TTFT_P95: (
            "histogram_quantile(0.95, sum by (le) "
            f"(rate({_matchers('time_to_first_token_seconds_bucket', selector)}[{window}])))"
        ),
        # SGLang renamed time_per_output_token to inter_token_latency; accept both.
        ITL_P95: (
            "histogram_quantile(0.95, sum by (le) "
            f"(rate({_matchers('(inter_token_latency|time_per_output_token)_seconds_bucket', selector)}[{window}])))"
        ),
    }


class PrometheusMetricsSource:
    """History via Prometheus' query_range (through prometheus-api-client)."""

    def __init__(self, url: str, *, timeout_seconds: float = 5.0, rate_window_seconds: float | None = None,
                 include_gpu: bool = True) -> None:
        from prometheus_api_client import PrometheusConnect
        from urllib3.util.retry import Retry

        self.url = url
        self.timeout_seconds = timeout_seconds
        self.rate_window_seconds = rate_window_seconds
        self.include_gpu = include_gpu
        # One quick retry: a tick that waits through a long backoff is a tick late for everyone.
        retry = Retry(total=1, backoff_factor=0.2, status_forcelist=(502, 503, 504))
        self._client = PrometheusConnect(url=url, disable_ssl=True, timeout=timeout_seconds, retry=retry)

    def history(self, selector: str, window_seconds: float, step: float, now: float | None = None,
                names: Sequence[str] | None = None, gpu_pods: GpuPods | None = None) -> MetricHistory:
        now = time.time() if now is None else now
        step = max(1.0, float(step))
        rate_window = self.rate_window_seconds or max(60.0, 2 * step)
        queries = promql_queries(selector, rate_window)
        if self.include_gpu and gpu_pods is not None and gpu_pods[1]:
            queries.update(gpu_queries(*gpu_pods))
        if names is not None:
            queries = {name: query for name, query in queries.items() if name in names}
        start = datetime.fromtimestamp(now - window_seconds, tz=timezone.utc)
        end = datetime.fromtimestamp(now, tz=timezone.utc)
        columns: dict[str, dict[float, float]] = {}
        for name, query in queries.items():
            try:
                result = self._client.custom_query_range(query, start_time=start, end_time=end, step=f"{step:g}s",
                                                         timeout=self.timeout_seconds)
            except Exception as exc:  # connection refused, timeout, 5xx: hold, do not crash the tick
                if name in (GPU_UTILIZATION, GPU_MEMORY_USED):
                    continue  # optional series; the SGLang ones decide whether we can act
                return MetricHistory.failed(f"Prometheus at {self.url}: {type(exc).__name__}: {exc}"[:300])
            points: dict[float, float] = {}
            for series in result or []:
                for timestamp, value in series.get("values", []):
                    number = float(value)
                    if math.isnan(number) or math.isinf(number):
                        continue
                    points[float(timestamp)] = number
            columns[name] = points
        timestamps = sorted({t for points in columns.values() for t in points})
        rows = [(t, {name: points[t] for name, points in columns.items() if t in points}) for t in timestamps]
        return MetricHistory.from_rows(rows, step)


# ---------------------------------------------------------------------------------------------
# The embedded default: scrape the replicas ourselves, keep a short history in memory


def histogram_quantile(quantile: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile on cumulative (upper bound, count) pairs; None when empty."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = quantile * total
    previous_bound, previous_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return previous_bound
            if count == previous_count:
                return bound
            return previous_bound + (bound - previous_bound) * (rank - previous_count) / (count - previous_count)
        previous_bound, previous_count = bound, count
    return previous_bound


@dataclass(frozen=True)
class ScrapeSample:
    """Raw cumulative values of one scrape of all of one DigitalWorker's replicas."""

    time: float
    requests_total: float
    prompt_tokens_total: float
    generation_tokens_total: float
    queue: float
    running: float
    token_usage: float
    ttft_buckets: tuple[tuple[float, float], ...]
    itl_buckets: tuple[tuple[float, float], ...] = ()
    # Read for rollout analysis (operator/inprocess_analysis.py), not by the autoscaler.
    aborted_requests_total: float = 0.0
    e2e_buckets: tuple[tuple[float, float], ...] = ()
    # SGLang's `http_responses_total` for POSTs (the inference routes): all, and the non-2xx ones
    # (`metric_providers.SGLANG_HTTP_RESPONSES`).
    http_responses_total: float = 0.0
    http_error_responses_total: float = 0.0


def parse_sglang_exposition(texts: Iterable[str], now: float) -> ScrapeSample:
    """Sum the SGLang metrics of several replicas' /metrics pages (either name spelling).

    Works sample by sample: with an OpenMetrics page whose TYPE lines say `sglang:x` while the
    samples say `sglang_x_total`, the parser returns untyped families, but the samples are right.
    """
    from prometheus_client.parser import text_string_to_metric_families

    counters = {"num_requests_total": 0.0, "prompt_tokens_total": 0.0, "generation_tokens_total": 0.0,
                "num_aborted_requests_total": 0.0}
    gauges = {"num_queue_reqs": 0.0, "num_running_reqs": 0.0}
    usage = 0.0
    buckets: dict[float, float] = {}
    itl_buckets: dict[float, float] = {}
    e2e_buckets: dict[float, float] = {}
    responses = error_responses = 0.0
    for text in texts:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                name = sample.name.replace("sglang:", "sglang_")
                if not name.startswith("sglang_"):
                    continue
                short = name[len("sglang_"):]
                if short in counters:
                    counters[short] += sample.value
                elif short in gauges:
                    gauges[short] += sample.value
                elif short == "token_usage":
                    usage = max(usage, sample.value)
                elif short == "time_to_first_token_seconds_bucket":
                    bound = float(sample.labels.get("le", "inf"))
                    buckets[bound] = buckets.get(bound, 0.0) + sample.value
                elif short in ("inter_token_latency_seconds_bucket", "time_per_output_token_seconds_bucket"):
                    bound = float(sample.labels.get("le", "inf"))
                    itl_buckets[bound] = itl_buckets.get(bound, 0.0) + sample.value
                elif short == "e2e_request_latency_seconds_bucket":
                    bound = float(sample.labels.get("le", "inf"))
                    e2e_buckets[bound] = e2e_buckets.get(bound, 0.0) + sample.value
                elif short == SGLANG_HTTP_RESPONSES.metric and SGLANG_HTTP_RESPONSES.counts(sample.labels):
                    responses += sample.value
                    if SGLANG_HTTP_RESPONSES.failed(sample.labels):
                        error_responses += sample.value
    return ScrapeSample(now, counters["num_requests_total"], counters["prompt_tokens_total"],
                        counters["generation_tokens_total"], gauges["num_queue_reqs"], gauges["num_running_reqs"],
                        usage, tuple(sorted(buckets.items())), tuple(sorted(itl_buckets.items())),
                        counters["num_aborted_requests_total"], tuple(sorted(e2e_buckets.items())),
                        responses, error_responses)


def _rates(previous: ScrapeSample, current: ScrapeSample) -> dict[str, float]:
    elapsed = current.time - previous.time
    if elapsed <= 0:
        return {}

    def rate(a: float, b: float) -> float:
        # A counter that went down is a restarted replica: count from zero, like Prometheus does.
        return (b - a if b >= a else b) / elapsed

    values = {
        REQUEST_RATE: rate(previous.requests_total, current.requests_total),
        PROMPT_TOKEN_RATE: rate(previous.prompt_tokens_total, current.prompt_tokens_total),
        GENERATION_TOKEN_RATE: rate(previous.generation_tokens_total, current.generation_tokens_total),
        QUEUE_LENGTH: current.queue,
        RUNNING_REQUESTS: current.running,
        KV_CACHE_USAGE: current.token_usage,
    }
    for name, before_buckets, now_buckets in ((TTFT_P95, previous.ttft_buckets, current.ttft_buckets),
                                               (ITL_P95, previous.itl_buckets, current.itl_buckets)):
        before = dict(before_buckets)
        delta = [(bound, max(0.0, count - before.get(bound, 0.0))) for bound, count in now_buckets]
        p95 = histogram_quantile(0.95, delta)
        if p95 is not None:
            values[name] = p95
    return values


class InMemoryMetricsSource:
    """A bounded in-memory history per selector, fed by `record` (the scraper) or by tests."""

    blocking = False  # reads are microseconds: the Autoscaler calls it on the event loop

    def __init__(self, retention_seconds: float = 3 * 86400.0) -> None:
        self.retention_seconds = retention_seconds
        self._series: dict[str, deque[tuple[float, dict[str, float]]]] = {}
        self._last_scrape: dict[str, ScrapeSample] = {}
        self._lock = threading.Lock()

    def record(self, selector: str, timestamp: float, values: Mapping[str, float]) -> None:
        with self._lock:
            rows = self._series.setdefault(selector, deque())
            rows.append((float(timestamp), dict(values)))
            horizon = timestamp - self.retention_seconds
            while rows and rows[0][0] < horizon:
                rows.popleft()

    def record_scrape(self, selector: str, sample: ScrapeSample) -> None:
        """Turn cumulative counters into rates against the previous scrape of the same selector."""
        previous = self._last_scrape.get(selector)
        self._last_scrape[selector] = sample
        if previous is not None:
            values = _rates(previous, sample)
            if values:
                self.record(selector, sample.time, values)

    def forget(self, selector: str) -> None:
        with self._lock:
            self._series.pop(selector, None)
            self._last_scrape.pop(selector, None)

    def history(self, selector: str, window_seconds: float, step: float, now: float | None = None,
                names: Sequence[str] | None = None, gpu_pods: GpuPods | None = None) -> MetricHistory:
        now = time.time() if now is None else now
        step = max(1e-3, float(step))
        with self._lock:
            rows = list(self._series.get(selector, ()))
        start = now - window_seconds
        times = [t for t, _ in rows]
        out = []
        # One row per step: the newest sample at or before each grid point, within one step.
        grid_point = start + step
        while grid_point <= now + 1e-9:
            index = bisect_right(times, grid_point) - 1
            if index >= 0 and grid_point - times[index] < step:
                out.append((times[index], rows[index][1]))
            grid_point += step
        deduplicated = []
        for row in out:
            if not deduplicated or deduplicated[-1][0] != row[0]:
                deduplicated.append(row)
        return MetricHistory.from_rows(deduplicated, step)


class InProcessScraper:
    """Scrapes replicas' /metrics pages into an `InMemoryMetricsSource` (the embedded default)."""

    def __init__(self, source: InMemoryMetricsSource, timeout_seconds: float = 3.0) -> None:
        self.source = source
        self.timeout_seconds = timeout_seconds

    def _fetch(self, url: str) -> str:
        request = urllib.request.Request(url, headers={"Accept": "text/plain; version=0.0.4"})
        with urllib.request.urlopen(request, timeout=self.timeout_seconds) as response:
            return response.read().decode("utf-8", "replace")

    def scrape(self, selector: str, addresses: Iterable[str], now: float | None = None) -> int:
        """Scrape `host:port` addresses (or full URLs) once; returns how many answered.

        When none answers nothing is recorded, so the history goes stale and the policy holds.
        """
        texts = []
        for address in addresses:
            url = address if address.startswith("http") else f"http://{address}/metrics"
            try:
                texts.append(self._fetch(url))
            except Exception:
                continue  # a replica that is starting or gone: the others still count
        if texts:
            sample = parse_sglang_exposition(texts, time.time() if now is None else now)
            self.source.record_scrape(selector, sample)
        return len(texts)
