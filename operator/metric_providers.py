"""Where rollout analysis gets its numbers: PromQL builders per revision, and metric providers.

Shaped like Argo Rollouts' `metric/provider.go`: a provider turns one `MetricQuery` into one
`Measurement` and never raises; a broken or unreachable backend becomes a Measurement with
`error` set, which analysis treats as Inconclusive (pause, never promote).

SGLang registers its metrics as `sglang:<name>`, but prometheus_client answers Prometheus's
OpenMetrics scrape with `sglang_<name>`, so every query selects the metric by
`__name__=~"sglang[:_]<name>"` and works against either form.

Series of one revision are selected by label matchers the caller passes, e.g.
``{"namespace": "team-a", "digitalworker_io_instance": "helpdesk", "digitalworker_io_revision": "5f8c2d"}``.
"""
from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any, Mapping

# Metric names (without the `sglang:`/`sglang_` prefix), as in SGLang's srt/observability/
# metrics_collector.py and http_request_metrics.py.
REQUESTS_TOTAL = "num_requests_total"
ABORTED_REQUESTS_TOTAL = "num_aborted_requests_total"
HTTP_RESPONSES_TOTAL = "http_responses_total"  # SGLang's HTTP middleware: {endpoint, status_code, method}
TTFT_HISTOGRAM = "time_to_first_token_seconds"
ITL_HISTOGRAM = "inter_token_latency_seconds"
E2E_HISTOGRAM = "e2e_request_latency_seconds"
QUEUE_GAUGE = "num_queue_reqs"
KV_USAGE_GAUGE = "token_usage"

# Names of the measurements a revision gets (keys of `revision_queries`).
REQUEST_RATE = "request_rate"
REQUEST_COUNT = "request_count"
ERROR_RATE = "error_rate"
HTTP_ERROR_RATE = "http_error_rate"
TTFT_P95 = "ttft_p95"
ITL_P95 = "itl_p95"
E2E_P95 = "e2e_p95"
QUEUE_LENGTH = "queue_length"
KV_USAGE = "kv_usage"

# Confidence bounds of a latency p95 (`latencyRatioConfidence`): "<measurement>_lower" / "_upper".
LOWER, UPPER = "lower", "upper"
LATENCY_QUANTILES = (TTFT_P95, ITL_P95, E2E_P95)


def bound_name(measurement: str, side: str) -> str:
    """The measurement holding one confidence bound of a latency quantile, e.g. `ttft_p95_upper`."""
    return f"{measurement}_{side}"


# Whose observation count a quantile's bounds rest on: one TTFT and one end-to-end latency per
# request; inter-token latencies within one request move together, so ITL counts its requests
# (the end-to-end histogram's count), never its tokens, which would overstate the evidence.
SAMPLE_SIZE_OF = {TTFT_P95: TTFT_P95, ITL_P95: E2E_P95, E2E_P95: E2E_P95}
_QUANTILE_HISTOGRAM = {TTFT_P95: TTFT_HISTOGRAM, ITL_P95: ITL_HISTOGRAM, E2E_P95: E2E_HISTOGRAM}


def bound_quantile(quantile: float, observations: float, confidence: float, side: str) -> float:
    """The quantile level whose empirical value bounds the true `quantile` from below (`side`
    LOWER) or above (UPPER), each side holding with probability `confidence`.

    Distribution-free: the rank of the true quantile among n observations is Binomial(n, q), here
    in its normal approximation, so the bound is the empirical quantile at
    q -/+ z * sqrt(q (1 - q) / n), clamped to [0, 1]. Few observations push the upper bound to
    the largest one: p95 of 20 requests is no better known than their maximum."""
    if observations <= 0:
        return 0.0 if side == LOWER else 1.0
    z = NormalDist().inv_cdf(confidence)
    spread = z * math.sqrt(quantile * (1.0 - quantile) / observations)
    level = quantile - spread if side == LOWER else quantile + spread
    return min(1.0, max(0.0, level))


# Labels the operator makes Prometheus attach to every sample scraped from a DigitalWorker's pods
# (relabelled from the pod labels digitalworker.io/revision and digitalworker.io/instance).
REVISION_LABEL = "digitalworker_io_revision"
INSTANCE_LABEL = "digitalworker_io_instance"
NAMESPACE_LABEL = "namespace"

# A label matcher value: "value" means `=`; ("=~", "a|b") picks the operator.
MatcherValue = str | tuple[str, str]
LabelMatchers = Mapping[str, MatcherValue]

_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_OPERATORS = ("=", "!=", "=~", "!~")


def revision_matchers(namespace: str, instance: str, revision: str) -> dict[str, str]:
    """The label matchers selecting one revision of one DigitalWorker."""
    return {NAMESPACE_LABEL: namespace, INSTANCE_LABEL: instance, REVISION_LABEL: revision}


@dataclass(frozen=True)
class MetricQuery:
    """One named PromQL instant query.

    `revision_queries` also says what the query measures in structured form (`measurement`, the
    label `matchers` as sorted (label, operator, value) triples, `window_seconds`, `quantile`), so a
    provider that does not speak PromQL (the operator's in-process scraper) can answer it.
    PrometheusProvider reads only `promql`. A hand-written query leaves `measurement` None."""

    name: str
    promql: str
    measurement: str | None = None
    matchers: tuple[tuple[str, str, str], ...] = ()
    window_seconds: float | None = None
    quantile: float | None = None
    # Bound measurements (`bound_name`): the confidence each side holds with.
    confidence: float | None = None

    def matcher_values(self) -> dict[str, str] | None:
        """The equality matchers as {label: value}; None when any matcher is not `=`."""
        if any(operator != "=" for _, operator, _ in self.matchers):
            return None
        return {label: value for label, _, value in self.matchers}


@dataclass(frozen=True)
class Measurement:
    """The outcome of one query. `value` is None when there was no usable number."""

    query: MetricQuery
    value: float | None
    # How many series the query returned (0: nothing matched, e.g. no traffic yet).
    series_count: int = 0
    error: str | None = None

    @property
    def usable(self) -> bool:
        return self.error is None and self.value is not None and math.isfinite(self.value)


class MetricProvider(ABC):
    """Turns a query into a measurement. Implementations must not raise."""

    @abstractmethod
    def measure(self, query: MetricQuery, at: float | None = None) -> Measurement:
        """Evaluate `query` at unix time `at` (None: the backend's now)."""

    def measure_all(self, queries: Mapping[str, MetricQuery], at: float | None = None) -> dict[str, Measurement]:
        """Every query at one evaluation time, so a run's windows line up across revisions."""
        return {name: self.measure(query, at) for name, query in queries.items()}


# ---------------------------------------------------------------- PromQL builders


def _escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def matcher_triples(matchers: LabelMatchers) -> tuple[tuple[str, str, str], ...]:
    """`{"a": "x", "b": ("=~", "y|z")}` -> `(("a", "=", "x"), ("b", "=~", "y|z"))`, sorted."""
    triples = []
    for label in sorted(matchers):
        raw = matchers[label]
        operator, value = raw if isinstance(raw, tuple) else ("=", raw)
        triples.append((label, operator, str(value)))
    return tuple(triples)


def render_matchers(matchers: LabelMatchers) -> str:
    """`{"a": "x", "b": ("=~", "y|z")}` -> `a="x", b=~"y|z"` (sorted, so queries are stable)."""
    parts = []
    for label in sorted(matchers):
        if not _LABEL_NAME.match(label) or label == "__name__":
            raise ValueError(f"invalid label name for a matcher: {label!r}")
        raw = matchers[label]
        operator, value = raw if isinstance(raw, tuple) else ("=", raw)
        if operator not in _OPERATORS:
            raise ValueError(f"invalid matcher operator {operator!r} for label {label!r}")
        parts.append(f'{label}{operator}"{_escape_label_value(str(value))}"')
    return ", ".join(parts)


def sglang_selector(metric: str, matchers: LabelMatchers, extra: str = "") -> str:
    """A series selector matching `sglang:<metric>` and `sglang_<metric>` with the given labels."""
    labels = [f'__name__=~"sglang[:_]{re.escape(metric)}"']
    rendered = render_matchers(matchers)
    if rendered:
        labels.append(rendered)
    if extra:
        labels.append(extra)
    return "{" + ", ".join(labels) + "}"


def _window(window_seconds: float) -> str:
    seconds = int(round(window_seconds))
    if seconds < 1:
        raise ValueError(f"analysis window must be at least 1s, got {window_seconds}")
    return f"{seconds}s"


def counter_growth(selector: str, window: str) -> str:
    """How much a counter grew over the window, counting a series born inside it from zero.

    `increase()` cannot see a series' first value: prometheus_client only exposes a labelled
    counter once it was first touched, so a canary's aborted-requests series typically appears
    with its first few errors already counted, and `increase()` would drop exactly those, reading
    a bad canary's error rate low. Last value in the window minus the value at its start (absent:
    0) keeps them. Revisions' pods are new processes, so counter resets inside a window are rare."""
    return f"(sum(last_over_time({selector}[{window}])) - (sum({selector} offset {window}) or vector(0)))"


@dataclass(frozen=True)
class HttpErrorSource:
    """The HTTP response counter `maxHTTPErrorRate` reads.

    Default: SGLang's `sglang:http_responses_total{endpoint, status_code, method}`, which every
    replica exports with `--enable-metrics` (the launcher always passes it). Only POSTs count:
    the inference routes are POSTs, while kubelet probes and Prometheus scrapes are GETs that
    would dilute a failing canary's rate. A gateway's counter (e.g. `http_requests_total{code}`)
    also works: `HttpErrorSource("http_requests_total", "code", sglang=False, method=None)`;
    only Prometheus can answer that one (the in-process provider reads SGLang's pages only)."""

    metric: str = HTTP_RESPONSES_TOTAL
    status_label: str = "status_code"
    sglang: bool = True  # the name is `sglang:<metric>` or `sglang_<metric>`, not `<metric>`
    method: str | None = "POST"

    @property
    def is_sglang_default(self) -> bool:
        return self == SGLANG_HTTP_RESPONSES

    @property
    def scope(self) -> dict[str, str]:
        """Label matchers of the responses that count (the POSTs, for SGLang's counter)."""
        return {"method": self.method} if self.method is not None else {}

    @property
    def failure_matcher(self) -> str:
        """The PromQL matcher of the failed ones among them: any status but 2xx."""
        return f'{self.status_label}!~"{_SUCCESS_STATUS}"'

    def counts(self, labels: Mapping[str, str]) -> bool:
        """`scope` on one sample's labels (for parsers of /metrics pages)."""
        return all(labels.get(label) == value for label, value in self.scope.items())

    def failed(self, labels: Mapping[str, str]) -> bool:
        """`failure_matcher` on one sample's labels (PromQL regexes are anchored: a full match)."""
        return re.fullmatch(_SUCCESS_STATUS, labels.get(self.status_label, "")) is None


_SUCCESS_STATUS = "2.."
# What SGLang itself exports, and what `maxHTTPErrorRate` and the error rate read by default.
SGLANG_HTTP_RESPONSES = HttpErrorSource()


def _ended_requests(matchers: LabelMatchers, window: str) -> tuple[str, str]:
    """(finished, aborted) requests over the window, each 0 when its series is absent (a healthy
    replica may have no aborted series at all: `or vector(0)` makes that 0)."""
    finished = counter_growth(sglang_selector(REQUESTS_TOTAL, matchers), window)
    aborted = counter_growth(sglang_selector(ABORTED_REQUESTS_TOTAL, matchers), window)
    return f"({finished} or vector(0))", f"({aborted} or vector(0))"


def request_count_query(matchers: LabelMatchers, window_seconds: float) -> str:
    """Requests that ended in the window, finished or aborted (what `minRequests` is compared to).

    Aborted ones count too: a revision that fails every request finishes none, and must be judged
    Failed on its error rate, not waved through as "too little traffic"."""
    finished, aborted = _ended_requests(matchers, _window(window_seconds))
    return f"{finished} + {aborted}"


def request_rate_query(matchers: LabelMatchers, window_seconds: float) -> str:
    return f"sum(rate({sglang_selector(REQUESTS_TOTAL, matchers)}[{_window(window_seconds)}]))"


def error_rate_query(matchers: LabelMatchers, window_seconds: float) -> str:
    """Failed requests over requests that ended in the window (finished + aborted), at most 1.

    Failed is what SGLang 0.5.23 lets one see: requests it aborted (`num_aborted_requests_total`:
    a client gone, `/abort_request`, a handler failing) plus non-2xx answers to POSTs
    (`http_responses_total`). A request the scheduler ends with an error (an internal 500, a
    request it cannot serve) counts as *finished* in `num_requests_total`, never as aborted; its
    HTTP status is what shows it. Aborted ones are in the denominator too, so a revision that
    aborts everything reads 100%. No requests at all is 0/0 = NaN: Inconclusive, never a pass.
    Blind spot (SGLang's, not this query's): a streaming request the scheduler fails, answered 200
    with an SSE error event."""
    window = _window(window_seconds)
    finished, aborted = _ended_requests(matchers, window)
    failed_http, _ = _http_selectors(matchers, SGLANG_HTTP_RESPONSES)
    refused = f"({counter_growth(failed_http, window)} or vector(0))"
    return f"clamp_max(({aborted} + {refused}) / ({finished} + {aborted}), 1)"


def _http_selectors(matchers: LabelMatchers, source: HttpErrorSource) -> tuple[str, str]:
    """(non-2xx responses, all responses) series selectors of `source` for one revision."""
    if not _LABEL_NAME.match(source.metric) or not _LABEL_NAME.match(source.status_label):
        raise ValueError(f"invalid HTTP metric {source.metric!r} or status label {source.status_label!r}")
    selected = {**matchers, **source.scope}
    failed_matcher = source.failure_matcher
    if source.sglang:
        return sglang_selector(source.metric, selected, failed_matcher), sglang_selector(source.metric, selected)
    rendered = render_matchers(selected)
    return (f"{source.metric}{{{', '.join(filter(None, [rendered, failed_matcher]))}}}",
            f"{source.metric}{{{rendered}}}")


def http_error_rate_query(matchers: LabelMatchers, window_seconds: float, source: HttpErrorSource) -> str:
    """Non-2xx responses over all responses in the window, from an HTTP response counter with a
    status label: SGLang's own by default, or a gateway's / sidecar's (`HttpErrorSource`).

    Counted with `counter_growth`: a canary's first 5xx creates its `status_code="500"` series,
    whose first value `increase()` would drop. No responses at all: no number, Inconclusive."""
    window = _window(window_seconds)
    failed_selector, all_selector = _http_selectors(matchers, source)
    return f"({counter_growth(failed_selector, window)} or vector(0)) / {counter_growth(all_selector, window)}"


def histogram_quantile_query(
    histogram: str, matchers: LabelMatchers, window_seconds: float, quantile: float = 0.95
) -> str:
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    buckets = sglang_selector(f"{histogram}_bucket", matchers)
    return f"histogram_quantile({quantile:g}, sum by (le) (rate({buckets}[{_window(window_seconds)}])))"


def histogram_quantile_bound_query(
    measurement: str, matchers: LabelMatchers, window_seconds: float, quantile: float, confidence: float, side: str
) -> str:
    """`bound_quantile` in PromQL: the histogram quantile at q -/+ z sqrt(q (1 - q) / n), with n the
    observations in the window (`SAMPLE_SIZE_OF`). No observations: NaN, Inconclusive."""
    if not 0.0 < quantile < 1.0 or not 0.5 <= confidence < 1.0:
        raise ValueError(f"quantile must be in (0, 1) and confidence in [0.5, 1), got {quantile}, {confidence}")
    window = _window(window_seconds)
    buckets = sglang_selector(f"{_QUANTILE_HISTOGRAM[measurement]}_bucket", matchers)
    counted = _QUANTILE_HISTOGRAM[SAMPLE_SIZE_OF[measurement]]
    count = counter_growth(sglang_selector(f"{counted}_count", matchers), window)
    z = NormalDist().inv_cdf(confidence)
    sign = "-" if side == LOWER else "+"
    level = f"scalar(clamp({quantile:g} {sign} {z:.6g} * sqrt({quantile * (1 - quantile):.6g} / {count}), 0, 1))"
    return f"histogram_quantile({level}, sum by (le) (rate({buckets}[{window}])))"


def gauge_average_query(gauge: str, matchers: LabelMatchers, window_seconds: float) -> str:
    """Per-replica gauge averaged over the window; the worst replica of the revision.

    Per replica, not summed, so a 1-replica canary and a 10-replica stable compare fairly."""
    return f"max(avg_over_time({sglang_selector(gauge, matchers)}[{_window(window_seconds)}]))"


def gauge_max_query(gauge: str, matchers: LabelMatchers, window_seconds: float) -> str:
    """The highest value any replica of the revision reported in the window (0..1 for KV usage)."""
    return f"max(max_over_time({sglang_selector(gauge, matchers)}[{_window(window_seconds)}]))"


def revision_queries(
    matchers: LabelMatchers,
    window_seconds: float,
    http_errors: HttpErrorSource | None = None,
    quantile: float = 0.95,
    confidence: float | None = None,
) -> dict[str, MetricQuery]:
    """Every analysis measurement for one revision over one window, keyed by measurement name;
    with `confidence`, also both bounds of each latency quantile (`bound_name`)."""
    promql = {
        REQUEST_COUNT: request_count_query(matchers, window_seconds),
        REQUEST_RATE: request_rate_query(matchers, window_seconds),
        ERROR_RATE: error_rate_query(matchers, window_seconds),
        TTFT_P95: histogram_quantile_query(TTFT_HISTOGRAM, matchers, window_seconds, quantile),
        ITL_P95: histogram_quantile_query(ITL_HISTOGRAM, matchers, window_seconds, quantile),
        E2E_P95: histogram_quantile_query(E2E_HISTOGRAM, matchers, window_seconds, quantile),
        QUEUE_LENGTH: gauge_average_query(QUEUE_GAUGE, matchers, window_seconds),
        KV_USAGE: gauge_max_query(KV_USAGE_GAUGE, matchers, window_seconds),
    }
    if http_errors is not None:
        promql[HTTP_ERROR_RATE] = http_error_rate_query(matchers, window_seconds, http_errors)
    structured = matcher_triples(matchers)
    # Another HTTP counter than SGLang's is PromQL only: no measurement a scraper of SGLang could answer.
    promql_only = set() if http_errors is None or http_errors.is_sglang_default else {HTTP_ERROR_RATE}
    queries = {name: MetricQuery(name, text, measurement=None if name in promql_only else name, matchers=structured,
                                 window_seconds=float(window_seconds),
                                 quantile=quantile if name in LATENCY_QUANTILES else None)
               for name, text in promql.items()}
    if confidence is not None:
        for measurement in LATENCY_QUANTILES:
            for side in (LOWER, UPPER):
                name = bound_name(measurement, side)
                text = histogram_quantile_bound_query(measurement, matchers, window_seconds, quantile, confidence, side)
                queries[name] = MetricQuery(name, text, measurement=name, matchers=structured,
                                            window_seconds=float(window_seconds), quantile=quantile,
                                            confidence=confidence)
    return queries


# ---------------------------------------------------------------- parsing Prometheus answers


def measurement_from_result(query: MetricQuery, result: Any) -> Measurement:
    """Reduce an instant-query `data.result` (vector or scalar) to one Measurement.

    The builders aggregate to a single series; several series mean a caller-written query
    that is ambiguous, which we refuse rather than guess an aggregation."""
    if _is_scalar_sample(result):
        # A scalar result (e.g. `scalar(...)` or a bare number) is `[time, "value"]`.
        result = {"value": result}
    if isinstance(result, list):
        if not result:
            return Measurement(query, None, 0)
        if len(result) > 1:
            return Measurement(query, None, len(result), f"query returned {len(result)} series, expected 1")
        sample = result[0].get("value") if isinstance(result[0], dict) else None
    elif isinstance(result, dict) and "value" in result:
        sample = result["value"]
    else:
        return Measurement(query, None, 0, f"unexpected result shape: {type(result).__name__}")
    try:
        value = float(sample[1])
    except (TypeError, ValueError, IndexError) as exc:
        return Measurement(query, None, 1, f"unparsable sample {sample!r}: {exc}")
    # NaN (0/0, histogram_quantile with no observations) and ±Inf are kept as None: no number.
    return Measurement(query, value if math.isfinite(value) else None, 1)


def _is_scalar_sample(result: Any) -> bool:
    return (
        isinstance(result, list) and len(result) == 2
        and isinstance(result[0], (int, float)) and isinstance(result[1], str)
    )


# ---------------------------------------------------------------- clients


@dataclass
class PrometheusProvider(MetricProvider):
    """Instant queries through prometheus-api-client's `PrometheusConnect.custom_query`.

    Retries once on a connection error (a scrape-time blip), then reports the error in the
    Measurement; a stopped Prometheus costs about `timeout` seconds per query at most."""

    url: str
    timeout: float = 5.0
    headers: Mapping[str, str] | None = None
    disable_ssl: bool = False
    _client: Any = field(default=None, init=False, repr=False)

    def _connect(self) -> Any:
        if self._client is None:
            # prometheus_api_client pulls in pandas: import it only when first needed.
            from prometheus_api_client import PrometheusConnect
            from urllib3.util.retry import Retry

            self._client = PrometheusConnect(
                url=self.url.rstrip("/"),
                headers=dict(self.headers) if self.headers else None,
                disable_ssl=self.disable_ssl,
                retry=Retry(total=1, backoff_factor=0, status_forcelist=()),
                timeout=self.timeout,
            )
        return self._client

    def measure(self, query: MetricQuery, at: float | None = None) -> Measurement:
        params = {"time": f"{at:.3f}"} if at is not None else None
        try:
            result = self._connect().custom_query(query.promql, params=params)
        except Exception as exc:  # connection refused, timeout, HTTP 4xx/5xx, bad JSON: never raise
            return Measurement(query, None, 0, f"{type(exc).__name__}: {_first_line(str(exc))}")
        return measurement_from_result(query, result)


def _first_line(text: str, limit: int = 300) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line[:limit]
