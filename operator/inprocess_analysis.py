"""Rollout analysis without Prometheus: the operator scrapes the revisions' pods itself.

The embedded default (`digital-worker dev` on a machine with no `prometheus` binary) has no
Prometheus to ask, yet a canary must still be judged on its numbers. Two parts:

- `InProcessAnalysisProvider`, a `MetricProvider` (metric_providers.py) answering the queries
  `revision_queries` builds from its own store of scrapes. It reads the structured side of each
  `MetricQuery` (`measurement`, the `namespace` / `digitalworker_io_instance` /
  `digitalworker_io_revision` matchers, `window_seconds`, `quantile`), never the PromQL. The numbers
  mean what the PromQL means: counters and histogram buckets are increases between scrapes inside
  the window, per pod (a counter that went down is a restarted replica, counted from zero like
  Prometheus does), summed over the revision's pods; quantiles (and, for `latencyRatioConfidence`,
  their bounds) come from the summed bucket increases; the queue is the worst pod's average and KV
  usage the worst pod's maximum over the window; the error rate counts aborted requests and
  non-2xx POST answers over ended requests, as `error_rate_query`; the HTTP error rate is SGLang's
  non-2xx POST responses over all its POST responses (`HttpErrorSource`'s default; another
  counter is PromQL only). Missing data is never a pass: a revision with no pod scraped twice in
  the window is "no data", an error rate of 0/0 is "no number", a worker not scraped lately or a
  hand-written query is a provider error; all of them make the check Inconclusive.
- `RolloutScraper`, ticked by the operator's periodic loop (periodic.py `run_periodic`, when no
  Prometheus URL is set): it scrapes only workers whose rollout is Progressing, each at a cadence
  derived from its analysis window (a fifth of the shortest window, 1 to 10 s), and forgets a
  worker's samples once its rollout ends. At 1000 workers the idle ones cost a dictionary lookup.

Pages are parsed by the autoscaler's parser (autoscaling/metrics.py `parse_sglang_exposition`,
either name spelling) and quantiles use its `histogram_quantile`: one parser for both.

Entry points: none to call for dev mode or the tour. An operator started without a Prometheus URL
(`DW_PROMETHEUS_URL` unset or empty, e.g. `OperatorThread(..., env={"DW_PROMETHEUS_URL": ""})`)
installs a `RolloutScraper` in `run_periodic` and sets `reconciler.analysis_provider` to its
provider; canary analyses then run on these scrapes, and `status.rollout.analysis.checks` show the
measured values as with Prometheus. Tools and tests can feed an `InProcessAnalysisProvider`
directly (`record`, `mark_scraped`) or scrape with `RolloutScraper.scrape_worker`.

Cost (bench-free numbers from a 2-core machine under load): `due()` over 1000 workers with 10 rollouts
in progress ~1 ms per tick; one replica page parsed ~8 ms; one analysis run over 10 pods and a
60 s window of 2 s scrapes ~40 ms.
"""
from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import pairwise
from typing import Any

from digital_worker.operator import schema as api
from digital_worker.operator.pods import metrics_url
from digital_worker.operator.autoscaling.metrics import (
    ScrapeSample,
    histogram_quantile,
    parse_sglang_exposition,
)
from digital_worker.operator.metric_providers import (
    E2E_P95,
    ERROR_RATE,
    HTTP_ERROR_RATE,
    INSTANCE_LABEL,
    ITL_P95,
    KV_USAGE,
    LATENCY_QUANTILES,
    LOWER,
    NAMESPACE_LABEL,
    QUEUE_LENGTH,
    REQUEST_COUNT,
    REQUEST_RATE,
    REVISION_LABEL,
    SAMPLE_SIZE_OF,
    TTFT_P95,
    UPPER,
    Measurement,
    MetricProvider,
    MetricQuery,
    bound_name,
    bound_quantile,
)

logger = logging.getLogger("digital_worker.operator")

RevisionKey = tuple[str, str, str]  # (namespace, instance, revision)
WorkerKey = tuple[str, str]  # (namespace, instance)

_COUNTERS = {REQUEST_COUNT, REQUEST_RATE, ERROR_RATE, HTTP_ERROR_RATE}
_HISTOGRAMS = {TTFT_P95: "ttft_buckets", ITL_P95: "itl_buckets", E2E_P95: "e2e_buckets"}
_BOUNDS = {bound_name(measurement, side): (measurement, side)
           for measurement in LATENCY_QUANTILES for side in (LOWER, UPPER)}
_GAUGES = {QUEUE_LENGTH, KV_USAGE}
SUPPORTED_MEASUREMENTS = frozenset(_COUNTERS | set(_HISTOGRAMS) | set(_BOUNDS) | _GAUGES)

DEFAULT_WINDOW_SECONDS = 60.0


# ---------------------------------------------------------------- the numbers (pure)


def _increase(before: float, after: float) -> float:
    """A counter's increase between two scrapes; a drop is a restart, counted from zero."""
    return after - before if after >= before else after


def _counter_span(samples: Sequence[ScrapeSample], start: float, at: float) -> list[ScrapeSample]:
    """The scrapes an increase over (start, at] is read from: the last one at or before `start`
    (so the whole window is covered) and every one after it up to `at`. Fewer than two: none."""
    upto = [sample for sample in samples if sample.time <= at]
    first = 0
    for index, sample in enumerate(upto):
        if sample.time <= start:
            first = index
    span = upto[first:]
    return span if len(span) >= 2 else []


def _buckets_increase(span: Sequence[ScrapeSample], attribute: str) -> dict[float, float]:
    counts = [dict(getattr(sample, attribute)).get(math.inf, 0.0) for sample in span]
    if all(a <= b for a, b in pairwise(counts)):
        # No restart in the span (the +Inf bucket never went down): last minus first, in one pass.
        first = dict(getattr(span[0], attribute))
        return {bound: count - first.get(bound, 0.0) for bound, count in getattr(span[-1], attribute)}
    total: dict[float, float] = {}
    for before, after in pairwise(span):
        previous = dict(getattr(before, attribute))
        for bound, count in getattr(after, attribute):
            total[bound] = total.get(bound, 0.0) + _increase(previous.get(bound, 0.0), count)
    return total


def _summed_buckets(spans: Sequence[Sequence[ScrapeSample]], attribute: str) -> dict[float, float]:
    summed: dict[float, float] = {}
    for span in spans:
        for bound, count in _buckets_increase(span, attribute).items():
            summed[bound] = summed.get(bound, 0.0) + count
    return summed


def revision_measurement(
    pods: Mapping[str, Sequence[ScrapeSample]],
    measurement: str,
    window_seconds: float,
    at: float,
    quantile: float = 0.95,
    confidence: float = 0.9,
) -> tuple[float | None, int]:
    """(value, how many series it was computed from) for one revision over (at - window, at].

    `pods` maps each pod to its scrapes in time order. `(None, 0)`: no pod has data in the window
    (Prometheus' empty result); `(None, n)`: data but no number (0/0, no observations)."""
    start = at - window_seconds
    if measurement in _GAUGES:
        per_pod = []
        for samples in pods.values():
            values = [(s.queue if measurement == QUEUE_LENGTH else s.token_usage)
                      for s in samples if start < s.time <= at]
            if values:
                per_pod.append(sum(values) / len(values) if measurement == QUEUE_LENGTH else max(values))
        return (max(per_pod), 1) if per_pod else (None, 0)

    spans = [span for span in (_counter_span(samples, start, at) for samples in pods.values()) if span]
    if not spans:
        return None, 0
    if measurement in _HISTOGRAMS or measurement in _BOUNDS:
        base, side = _BOUNDS.get(measurement, (measurement, None))
        summed = _summed_buckets(spans, _HISTOGRAMS[base])
        level = quantile
        if side is not None:
            counted = _HISTOGRAMS[SAMPLE_SIZE_OF[base]]
            observations = (summed if counted == _HISTOGRAMS[base] else _summed_buckets(spans, counted)).get(math.inf, 0.0)
            level = bound_quantile(quantile, observations, confidence, side)
        value = histogram_quantile(level, list(summed.items()))
        return (value if value is not None and math.isfinite(value) else None), 1

    def grown(attribute: str, span: Sequence[ScrapeSample]) -> float:
        return sum(_increase(getattr(a, attribute), getattr(b, attribute)) for a, b in pairwise(span))

    if measurement == HTTP_ERROR_RATE:
        responses = sum(grown("http_responses_total", span) for span in spans)
        failed = sum(grown("http_error_responses_total", span) for span in spans)
        return (failed / responses if responses > 0 else None), 1
    finished = aborted = refused = rate = 0.0
    for span in spans:
        pod_finished = grown("requests_total", span)
        finished += pod_finished
        aborted += grown("aborted_requests_total", span)
        refused += grown("http_error_responses_total", span)
        covered = span[-1].time - span[0].time
        if covered > 0:
            rate += pod_finished / covered
    if measurement == REQUEST_COUNT:
        return finished + aborted, 1
    if measurement == REQUEST_RATE:
        return rate, 1
    if measurement == ERROR_RATE:  # as error_rate_query: aborted + non-2xx POSTs over ended, at most 1
        ended = finished + aborted
        failed = aborted + refused
        return (min(1.0, failed / ended) if ended > 0 else (1.0 if failed > 0 else None)), 1
    raise ValueError(f"unsupported measurement {measurement!r}")


# ---------------------------------------------------------------- the provider


class InProcessAnalysisProvider(MetricProvider):
    """Answers analysis queries from scrapes recorded with `record` (by `RolloutScraper`, or tests).

    Thread-safe: scrapes are recorded from the periodic loop's worker threads while reconcile
    threads measure."""

    def __init__(self, retention_seconds: float = 1800.0) -> None:
        self.retention_seconds = retention_seconds
        self._samples: dict[RevisionKey, dict[str, deque[ScrapeSample]]] = {}
        self._last_scrape: dict[WorkerKey, float] = {}
        self._lock = threading.Lock()

    def record(self, namespace: str, instance: str, revision: str, pod: str, sample: ScrapeSample) -> None:
        """One pod's scrape; samples older than the retention are dropped as new ones arrive."""
        with self._lock:
            pods = self._samples.setdefault((namespace, instance, revision), {})
            samples = pods.setdefault(pod, deque())
            samples.append(sample)
            horizon = sample.time - self.retention_seconds
            while samples and samples[0].time < horizon:
                samples.popleft()

    def mark_scraped(self, namespace: str, instance: str, when: float) -> None:
        """A scrape round of the worker happened (even if some pods did not answer)."""
        with self._lock:
            self._last_scrape[(namespace, instance)] = when
            # Pods gone for longer than the retention leave no empty deques behind.
            for key in [k for k in self._samples if k[:2] == (namespace, instance)]:
                pods = self._samples[key]
                for pod in [p for p, samples in pods.items() if not samples or samples[-1].time < when - self.retention_seconds]:
                    del pods[pod]
                if not pods:
                    del self._samples[key]

    def forget(self, namespace: str, instance: str) -> None:
        with self._lock:
            self._last_scrape.pop((namespace, instance), None)
            for key in [k for k in self._samples if k[:2] == (namespace, instance)]:
                del self._samples[key]

    def revisions(self) -> list[RevisionKey]:
        with self._lock:
            return sorted(self._samples)

    def measure(self, query: MetricQuery, at: float | None = None) -> Measurement:
        at = time.time() if at is None else at
        if query.measurement not in SUPPORTED_MEASUREMENTS:
            why = "a hand-written query" if query.measurement is None else f"measurement {query.measurement!r}"
            return Measurement(query, None, 0, f"the in-process scraper cannot answer {why} (no Prometheus)")
        labels = query.matcher_values()
        if labels is None or not {NAMESPACE_LABEL, INSTANCE_LABEL, REVISION_LABEL} <= labels.keys():
            return Measurement(query, None, 0, "the in-process scraper needs namespace, instance and revision "
                                               "equality matchers")
        window = float(query.window_seconds or DEFAULT_WINDOW_SECONDS)
        namespace, instance, revision = labels[NAMESPACE_LABEL], labels[INSTANCE_LABEL], labels[REVISION_LABEL]
        with self._lock:
            last = self._last_scrape.get((namespace, instance))
            pods = {pod: list(samples) for pod, samples in self._samples.get((namespace, instance, revision), {}).items()}
        if last is None or last < at - window:
            return Measurement(query, None, 0, f"no in-process scrape of {namespace}/{instance} in the last {window:g}s")
        value, series = revision_measurement(pods, query.measurement, window, at, query.quantile or 0.95,
                                             query.confidence or 0.9)
        return Measurement(query, value, series)


# ---------------------------------------------------------------- scraping, on the periodic tick


def analysis_windows(spec: Mapping[str, Any]) -> list[float]:
    """Every analysis window a worker's rollout may ask for (the rollout's and each step's)."""
    rollout = spec.get("rollout") or {}
    blocks = [rollout.get("analysis") or {}]
    for step in (rollout.get("canary") or {}).get("steps") or []:
        if isinstance(step, Mapping) and isinstance(step.get("analysis"), Mapping):
            blocks.append(step["analysis"])
    blue_green = rollout.get("blueGreen") or {}
    blocks += [blue_green[key] for key in ("prePromotionAnalysis", "postPromotionAnalysis")
               if isinstance(blue_green.get(key), Mapping)]
    fallback = spec.get("fallback")
    if isinstance(fallback, Mapping):  # the breaker judges the stable's error rate over unhealthySeconds
        blocks.append({"windowSeconds": min(120, max(10, int(fallback.get("unhealthySeconds", 60) or 0)))})
    windows = []
    for block in blocks:
        try:
            windows.append(float(block.get("windowSeconds", DEFAULT_WINDOW_SECONDS)))
        except (TypeError, ValueError):
            continue
    return [w for w in windows if w > 0] or [DEFAULT_WINDOW_SECONDS]


def scrape_interval(spec: Mapping[str, Any]) -> float:
    """A fifth of the shortest analysis window, within 1..10 s: enough scrapes per window to
    measure increases, few enough to stay cheap."""
    return min(10.0, max(1.0, min(analysis_windows(spec)) / 5.0))


def rollout_in_progress(body: Mapping[str, Any]) -> bool:
    return ((body.get("status") or {}).get("rollout") or {}).get("phase") == "Progressing" and \
        not body["metadata"].get("deletionTimestamp")


def needs_scrape(body: Mapping[str, Any]) -> bool:
    """A rollout in progress is analysed; a worker with a fallback model has its breaker watching."""
    return rollout_in_progress(body) or bool((body.get("spec") or {}).get("fallback")) and \
        not body["metadata"].get("deletionTimestamp")


class RolloutScraper:
    """Scrapes the pods of workers whose rollout is Progressing (or whose fallback breaker needs the
    stable's error rate) into an InProcessAnalysisProvider.

    `list_pods(namespace, instance) -> [pod]` and `fetch(url) -> text` are the only I/O; both are
    called from `scrape_worker`, which the periodic loop runs in its thread pool."""

    def __init__(self, provider: InProcessAnalysisProvider | None = None, *, timeout_seconds: float = 2.0,
                 fetch: Callable[[str], str] | None = None) -> None:
        self.provider = provider or InProcessAnalysisProvider()
        self.timeout_seconds = timeout_seconds
        self.fetch = fetch or self._fetch
        self._next_scrape: dict[WorkerKey, float] = {}
        self._in_flight: set[WorkerKey] = set()
        self._tasks: set[asyncio.Task] = set()

    def _fetch(self, url: str) -> str:
        request = urllib.request.Request(url, headers={"Accept": "text/plain; version=0.0.4"})
        with urllib.request.urlopen(request, timeout=self.timeout_seconds) as response:
            return response.read().decode("utf-8", "replace")

    def due(self, bodies: Iterable[Mapping[str, Any]], now: float) -> list[WorkerKey]:
        """Workers to scrape this tick; workers whose rollout ended are forgotten."""
        progressing: set[WorkerKey] = set()
        due = []
        for body in bodies:
            if not needs_scrape(body):
                continue
            key = (body["metadata"]["namespace"], body["metadata"]["name"])
            progressing.add(key)
            spec = body.get("spec") or {}
            if now >= self._next_scrape.get(key, now):
                self._next_scrape[key] = now + scrape_interval(spec)
                # Keep what the longest window needs (with room for a late analysis run).
                self.provider.retention_seconds = max(self.provider.retention_seconds,
                                                      2 * max(analysis_windows(spec)) + 60)
                due.append(key)
        for key in [k for k in self._next_scrape if k not in progressing]:
            del self._next_scrape[key]
            self.provider.forget(*key)
        return due

    def scrape_worker(self, namespace: str, instance: str, pods: Sequence[Mapping[str, Any]],
                      now: float | None = None) -> int:
        """Scrape each pod of one worker once; returns how many answered. A round in which pods
        exist but none answers is not marked as a scrape: after a window of those, measurements
        are errors (metrics unavailable), as with an unreachable Prometheus."""
        answered = targets = 0
        for pod in pods:
            meta = pod["metadata"]
            revision = (meta.get("labels") or {}).get(api.LABEL_REVISION)
            address = metrics_url(pod)
            if not revision or not address or meta.get("deletionTimestamp"):
                continue
            targets += 1
            try:
                text = self.fetch(address)
            except Exception:  # starting or gone: the window just has one scrape fewer
                continue
            try:
                sample = parse_sglang_exposition([text], time.time() if now is None else now)
            except Exception as exc:  # a garbled page is that pod's problem, not the round's
                logger.debug("unparsable metrics from %s: %s", address, exc)
                continue
            self.provider.record(namespace, instance, revision, meta["name"], sample)
            answered += 1
        if answered or not targets:
            self.provider.mark_scraped(namespace, instance, time.time() if now is None else now)
        return answered

    async def tick_all(self, bodies: list[Mapping[str, Any]], list_pods: Callable, run_sync: Callable,
                       now: float | None = None) -> None:
        """One periodic tick: start scraping the workers that are due (blocking parts in `run_sync`).

        Scrapes run as tasks the tick does not wait for, so unreachable pods (seconds of timeouts)
        never delay the periodic loop; a worker whose last scrape is still running is skipped."""
        for key in self.due(bodies, time.time() if now is None else now):
            if key in self._in_flight:
                continue
            self._in_flight.add(key)
            task = asyncio.create_task(self._scrape(key, list_pods, run_sync, now))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _scrape(self, key: WorkerKey, list_pods: Callable, run_sync: Callable, now: float | None) -> None:
        namespace, instance = key
        try:
            pods = await run_sync(list_pods, namespace, instance)
            await run_sync(self.scrape_worker, namespace, instance, pods, now)
        except Exception:  # one worker's failure never stops the others' analysis data
            logger.exception("analysis scrape failed for %s/%s", namespace, instance)
        finally:
            self._in_flight.discard(key)
