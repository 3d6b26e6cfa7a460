"""PrometheusProvider and the analysis end to end against a real Prometheus.

Two small metric servers expose SGLang's metric names, types and buckets for several revisions
(revision labels sit on the series themselves, as the operator's relabelling would put them):
- server "colon" answers in the classic text format: `sglang:num_requests_total`;
- server "underscore" answers in OpenMetrics, as prometheus_client does for Prometheus:
  `sglang_num_requests_total`.
Revisions: stable and errors (5% failed with HTTP 500) on the colon server; healthy, slow (2x TTFT) and idle
(series present, no traffic) on the underscore server.
"""
from __future__ import annotations

import http.server
import threading
import time

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from digital_worker.operator.analysis import (
    EARLY_LOOKS_PER_INTERVAL,
    REASON_FAILED,
    REASON_METRICS_UNAVAILABLE,
    Action,
    AnalysisSpec,
    AnalysisState,
    Verdict,
    evaluate,
    judge_run,
    measure_baseline,
    measure_run,
)
from digital_worker.operator.metric_providers import (
    ERROR_RATE,
    HTTP_ERROR_RATE,
    ITL_P95,
    KV_USAGE,
    QUEUE_LENGTH,
    REQUEST_COUNT,
    REQUEST_RATE,
    TTFT_P95,
    LOWER,
    UPPER,
    HttpErrorSource,
    PrometheusProvider,
    bound_name,
    revision_queries,
)
from digital_worker.runtime.sglang_metrics import E2E_BUCKETS, INTER_TOKEN_BUCKETS, TTFT_BUCKETS  # SGLang's bounds

WINDOW_SECONDS = 10
TTFT_P95_LOWER, TTFT_P95_UPPER = bound_name(TTFT_P95, LOWER), bound_name(TTFT_P95, UPPER)
LABELS = ["model_name", "namespace", "digitalworker_io_instance", "digitalworker_io_revision"]


def matchers(revision: str) -> dict[str, str]:
    return {"namespace": "team-a", "digitalworker_io_instance": "helpdesk", "digitalworker_io_revision": revision}


class SGLangMetrics:
    """SGLang's tokenizer and scheduler metrics in one registry, for several revisions."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("sglang:num_requests_total", "Number of requests processed.", LABELS,
                                registry=self.registry)
        self.aborted = Counter("sglang:num_aborted_requests_total", "Number of requests aborted.", LABELS,
                               registry=self.registry)
        self.ttft = Histogram("sglang:time_to_first_token_seconds", "TTFT", LABELS, buckets=TTFT_BUCKETS,
                              registry=self.registry)
        self.itl = Histogram("sglang:inter_token_latency_seconds", "ITL", LABELS, buckets=INTER_TOKEN_BUCKETS,
                             registry=self.registry)
        self.e2e = Histogram("sglang:e2e_request_latency_seconds", "E2E", LABELS, buckets=E2E_BUCKETS,
                             registry=self.registry)
        self.queue = Gauge("sglang:num_queue_reqs", "Queue", LABELS, registry=self.registry)
        self.kv = Gauge("sglang:token_usage", "KV usage", LABELS, registry=self.registry)
        # SGLang's HTTP middleware counter (the revision labels stand for the scrape's relabelling).
        self.responses = Counter("sglang:http_responses_total", "HTTP responses", [*LABELS, "endpoint", "status_code",
                                 "method"], registry=self.registry)
        # Not SGLang's: an HTTP status counter as a gateway or sidecar would export it.
        self.http = Counter("http_requests_total", "HTTP responses", [*LABELS, "code"], registry=self.registry)

    @staticmethod
    def labels(revision: str) -> dict[str, str]:
        return {"model_name": "qwen", **matchers(revision)}

    def declare(self, revision: str, with_aborted: bool) -> None:
        """Create the revision's series at 0 (as a started server would), so `increase` sees the
        first requests. Without `with_aborted` the aborted counter stays absent, like a
        prometheus_client counter that was never incremented."""
        labels = self.labels(revision)
        self.requests.labels(**labels)
        if with_aborted:
            self.aborted.labels(**labels)
        for histogram in (self.ttft, self.itl, self.e2e):
            histogram.labels(**labels)
        self.queue.labels(**labels).set(0)
        self.kv.labels(**labels).set(0)

    def request(self, revision: str, ttft: float, itl: float, outcome: str = "ok") -> None:
        """As SGLang 0.5.23 counts: a request its scheduler fails ("failed": an internal 500) is
        *finished* and answered 500; an "aborted" one (the client gone) is counted aborted only."""
        labels = self.labels(revision)
        route = {"endpoint": "/v1/chat/completions", "method": "POST"}
        # Every request comes with a kubelet probe: GETs, all 200, which must not dilute the rate.
        self.responses.labels(**labels, endpoint="/health", status_code="200", method="GET").inc()
        if outcome == "aborted":
            self.aborted.labels(**labels).inc()
            return
        self.requests.labels(**labels).inc()
        if outcome == "failed":
            self.responses.labels(**labels, **route, status_code="500").inc()
            self.http.labels(**labels, code="500").inc()
            return
        self.responses.labels(**labels, **route, status_code="200").inc()
        self.http.labels(**labels, code="200").inc()
        self.ttft.labels(**labels).observe(ttft)
        self.itl.labels(**labels).observe(itl)
        self.e2e.labels(**labels).observe(ttft + 100 * itl)


class MetricsServer:
    """Serves one registry on loopback, always in one exposition format."""

    def __init__(self, metrics: SGLangMetrics, openmetrics: bool) -> None:
        registry = metrics.registry

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                if openmetrics:
                    body = generate_openmetrics(registry)
                    content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8"
                else:
                    body = generate_latest(registry)
                    content_type = "text/plain; version=0.0.4; charset=utf-8"
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        # Port 0: the kernel picks a free one (no race with other tests picking ports).
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


class Traffic:
    """Records requests every 50 ms until stopped: what each revision's replicas would report."""

    def __init__(self, colon: SGLangMetrics, underscore: SGLangMetrics) -> None:
        self.colon, self.underscore = colon, underscore
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.errors_sent = 0

    def run(self) -> None:
        while not self.stop_event.is_set():
            for _ in range(2):
                self.colon.request("stable", ttft=0.3, itl=0.012)
                self.underscore.request("healthy", ttft=0.3, itl=0.012)
                self.underscore.request("slow", ttft=0.7, itl=0.012)
            # 1 in 20 of this revision's requests fails in the scheduler (HTTP 500): a 5% error rate.
            self.errors_sent += 1
            self.colon.request("errors", ttft=0.3, itl=0.012, outcome="failed" if self.errors_sent % 20 == 0 else "ok")
            # A revision whose every request is aborted finishes none.
            self.colon.request("broken", ttft=0.3, itl=0.012, outcome="aborted")
            self.colon.queue.labels(**self.colon.labels("stable")).set(3)
            self.underscore.kv.labels(**self.underscore.labels("healthy")).set(0.42)
            self.stop_event.wait(0.05)

    def __enter__(self) -> "Traffic":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        self.thread.join(timeout=5)


@pytest.fixture
def fleet(prometheus):
    colon, underscore = SGLangMetrics(), SGLangMetrics()
    colon.declare("stable", with_aborted=False)
    colon.declare("errors", with_aborted=True)
    colon.declare("broken", with_aborted=True)
    for revision in ("healthy", "slow", "idle"):
        underscore.declare(revision, with_aborted=True)
    servers = [MetricsServer(colon, openmetrics=False), MetricsServer(underscore, openmetrics=True)]
    try:
        prometheus.set_targets("sglang-colon", [f"127.0.0.1:{servers[0].server.server_port}"])
        prometheus.set_targets("sglang-underscore", [f"127.0.0.1:{servers[1].server.server_port}"])
        with Traffic(colon, underscore) as traffic:
            yield prometheus, traffic
    finally:
        for server in servers:
            server.close()


def test_analysis_against_real_prometheus(fleet):
    prometheus, _traffic = fleet
    provider = PrometheusProvider(prometheus.url, timeout=3)
    # Wait until both name forms are stored and each revision has a window's worth of requests.
    prometheus.wait_for('{__name__="sglang:num_requests_total"}', timeout=30)
    prometheus.wait_for('{__name__="sglang_num_requests_total"}', timeout=30)
    errors_count = revision_queries(matchers("errors"), WINDOW_SECONDS)[REQUEST_COUNT].promql
    prometheus.wait_for(errors_count, timeout=30, predicate=lambda r: float(r[0]["value"][1]) >= 60)
    # Counts start from a series' first sample; rates and quantiles need two samples in the window,
    # of each scrape target (the two are scraped independently: one can lag the other).
    for revision in ("stable", "healthy", "slow"):
        queries = revision_queries(matchers(revision), WINDOW_SECONDS)
        for name in (REQUEST_RATE, TTFT_P95):
            prometheus.wait_for(queries[name].promql, timeout=30,
                                predicate=lambda r: r and r[0]["value"][1] != "NaN")

    spec = AnalysisSpec.from_dict({
        "windowSeconds": WINDOW_SECONDS, "intervalSeconds": 5, "minRequests": 20,
        "maxErrorRate": 0.02, "maxTTFTP95Seconds": 2.0, "maxTTFTP95Ratio": 1.5, "maxITLP95Ratio": 1.5,
        "maxQueueLength": 10, "maxKVUsage": 0.9, "failureLimit": 1, "inconclusiveLimit": 1,
    })

    # Raw measurements: each one a number from Prometheus, read through both name forms.
    stable = provider.measure_all(revision_queries(matchers("stable"), WINDOW_SECONDS))
    healthy = provider.measure_all(revision_queries(matchers("healthy"), WINDOW_SECONDS))
    assert all(m.error is None for m in [*stable.values(), *healthy.values()])
    assert stable[REQUEST_COUNT].value > 50 and healthy[REQUEST_COUNT].value > 50
    # Same offered rate through both name forms; the two targets are scraped out of phase, so over a
    # short window their rates differ by up to a scrape's worth (38% seen on a busy machine).
    assert stable[REQUEST_RATE].value == pytest.approx(healthy[REQUEST_RATE].value, rel=0.5)
    # No aborted series exists for "stable" at all: still an error rate of 0, not "no data".
    assert stable[ERROR_RATE].value == 0.0
    # 0.3 s lies in SGLang's (0.2, 0.4] bucket; p95 interpolates inside it.
    assert 0.2 < stable[TTFT_P95].value <= 0.4
    assert healthy[TTFT_P95].value == pytest.approx(stable[TTFT_P95].value, rel=0.05)
    assert 0.010 < healthy[ITL_P95].value <= 0.015
    assert stable[QUEUE_LENGTH].value == pytest.approx(3, abs=0.6)
    assert healthy[KV_USAGE].value == pytest.approx(0.42)

    # Evaluated an hour ago, before any of this existed: no data, not an error; the request
    # count reads 0 there (both of its terms default to 0).
    queries = revision_queries(matchers("stable"), WINDOW_SECONDS)
    past = provider.measure(queries[TTFT_P95], at=time.time() - 3600)
    assert past.value is None and past.series_count == 0 and past.error is None
    assert provider.measure(queries[REQUEST_COUNT], at=time.time() - 3600).value == 0.0

    # A healthy canary (underscore form) against the stable (colon form): every check passes.
    run = measure_run(provider, spec, matchers("healthy"), matchers("stable"))
    result, state = evaluate(AnalysisState.start(0.0), run, 5.0, spec)
    assert result.verdict is Verdict.SUCCESSFUL, result.message
    assert result.action is Action.PASS and AnalysisState.from_dict(state.to_dict()) == state

    # 5% of requests failed by the scheduler (finished, answered 500): the error-rate check fails.
    run = measure_run(provider, spec, matchers("errors"), matchers("stable"))
    result, _ = evaluate(AnalysisState.start(0.0), run, 5.0, spec)
    assert result.action is Action.ABORT and result.reason == REASON_FAILED
    by_name = {check.name: check for check in result.checks}
    assert by_name["maxErrorRate"].verdict is Verdict.FAILED
    assert by_name["maxErrorRate"].value == pytest.approx(0.05, abs=0.02)
    assert by_name["maxTTFTP95Ratio"].verdict is Verdict.SUCCESSFUL

    # Every request aborted: no finished request, yet counted as traffic and judged Failed at 100%.
    run = measure_run(provider, spec, matchers("broken"), matchers("stable"))
    assert run.canary[REQUEST_COUNT].value > 20
    result, _ = evaluate(AnalysisState.start(0.0), run, 5.0, spec)
    by_name = {check.name: check for check in result.checks}
    assert result.action is Action.ABORT and by_name["maxErrorRate"].value == 1.0

    # Non-2xx POST responses, from SGLang's own counter (the default) and from a gateway's: 5% for
    # "errors", none at all for "stable" (its status 500 series does not even exist).
    gateway = HttpErrorSource("http_requests_total", "code", sglang=False, method=None)
    for source in (HttpErrorSource(), gateway):
        errors_http = provider.measure(revision_queries(matchers("errors"), WINDOW_SECONDS, source)[HTTP_ERROR_RATE])
        stable_http = provider.measure(revision_queries(matchers("stable"), WINDOW_SECONDS, source)[HTTP_ERROR_RATE])
        assert errors_http.value == pytest.approx(0.05, abs=0.02) and stable_http.value == 0.0, source
    http_spec = AnalysisSpec.from_dict({"windowSeconds": WINDOW_SECONDS, "maxHTTPErrorRate": 0.01,
                                        "maxErrorRate": None, "maxTTFTP95Ratio": None, "maxITLP95Ratio": None})
    result, _ = evaluate(AnalysisState.start(0.0), measure_run(provider, http_spec, matchers("errors")), 5.0, http_spec)
    assert result.action is Action.ABORT and result.checks[0].name == "maxHTTPErrorRate"
    assert result.checks[0].value == pytest.approx(errors_http.value, abs=0.02)

    # Twice the TTFT: the absolute TTFT check passes (under 2 s), the relative one aborts.
    run = measure_run(provider, spec, matchers("slow"), matchers("stable"))
    result, _ = evaluate(AnalysisState.start(0.0), run, 5.0, spec)
    by_name = {check.name: check for check in result.checks}
    assert by_name["maxTTFTP95Seconds"].verdict is Verdict.SUCCESSFUL
    assert by_name["maxTTFTP95Ratio"].verdict is Verdict.FAILED
    assert by_name["maxTTFTP95Ratio"].value / by_name["maxTTFTP95Ratio"].baseline > 1.5
    assert by_name["maxITLP95Ratio"].verdict is Verdict.SUCCESSFUL
    assert result.action is Action.ABORT

    # latencyRatioConfidence: the bounds of each p95 come from PromQL too, and the verdicts hold
    # (~400 requests per revision in the window: narrow bounds, inside the one bucket).
    bounded = AnalysisSpec.from_dict({**spec.to_dict(), "latencyRatioConfidence": 0.9})
    run = measure_run(provider, bounded, matchers("healthy"), matchers("stable"))
    for numbers in (run.canary, run.stable):
        low, point, high = (numbers[name].value for name in (TTFT_P95_LOWER, TTFT_P95, TTFT_P95_UPPER))
        assert 0.2 < low < point < high <= 0.4
    result, _ = evaluate(AnalysisState.start(0.0), run, 5.0, bounded)
    assert result.action is Action.PASS, result.message
    assert "90% bounds" in {check.name: check for check in result.checks}["maxTTFTP95Ratio"].message
    run = measure_run(provider, bounded, matchers("slow"), matchers("stable"))
    result, _ = evaluate(AnalysisState.start(0.0), run, 5.0, bounded)
    assert {check.name: check for check in result.checks}["maxTTFTP95Ratio"].verdict is Verdict.FAILED
    assert result.action is Action.ABORT
    state = AnalysisState.start(0.0, baseline=measure_baseline(provider, bounded, matchers("stable")))
    result, _ = evaluate(state, measure_run(provider, bounded, matchers("slow"), matchers("idle")), 5.0, bounded)
    ratio = {check.name: check for check in result.checks}["maxTTFTP95Ratio"]
    assert ratio.verdict is Verdict.FAILED and "before the step" in ratio.message

    # The canary took all traffic (the stable's series are idle now): relative checks fall back
    # to the stable's numbers captured before the step.
    baseline = measure_baseline(provider, spec, matchers("stable"))
    assert baseline[REQUEST_COUNT].value > 50 and 0.2 < baseline[TTFT_P95].value <= 0.4
    state = AnalysisState.start(0.0, baseline=baseline)
    result, _ = evaluate(state, measure_run(provider, spec, matchers("slow"), matchers("idle")), 5.0, spec)
    ratio = {check.name: check for check in result.checks}["maxTTFTP95Ratio"]
    assert ratio.verdict is Verdict.FAILED and "before the step" in ratio.message
    result, _ = evaluate(state, measure_run(provider, spec, matchers("healthy"), matchers("idle")), 5.0, spec)
    assert result.action is Action.PASS, result.message

    # Series present but no traffic, and a revision Prometheus never saw: Inconclusive -> pause.
    for revision in ("idle", "never-deployed"):
        run = measure_run(provider, spec, matchers(revision), matchers("stable"))
        assert run.canary[REQUEST_COUNT].error is None
        state = AnalysisState.start(0.0)
        for _ in range(EARLY_LOOKS_PER_INTERVAL):  # early looks first (no traffic yet), then the counted run
            result, state = evaluate(state, run, 5.0, spec)
        assert result.verdict is Verdict.INCONCLUSIVE, revision
        assert result.action is Action.PAUSE and state.phase.value == "Paused"
        assert all(check.verdict is Verdict.INCONCLUSIVE for check in result.checks)

    # Prometheus goes away mid-analysis: errors in the measurements, never an exception, and
    # the analysis pauses with MetricsUnavailable instead of promoting.
    prometheus.stop()
    started = time.monotonic()
    run = measure_run(provider, spec, matchers("healthy"), matchers("stable"))
    assert time.monotonic() - started < 10
    assert all(m.error and m.value is None for m in run.canary.values())
    result, state = evaluate(AnalysisState.start(0.0), run, 5.0, spec)
    assert result.verdict is Verdict.INCONCLUSIVE and result.action is Action.PAUSE
    assert result.reason == REASON_METRICS_UNAVAILABLE and "metrics unavailable" in result.message
    assert judge_run(spec, run).metrics_unavailable


def test_prometheus_provider_reports_bad_queries_and_refused_connections(prometheus, port):
    provider = PrometheusProvider(prometheus.url, timeout=3)
    from digital_worker.operator.metric_providers import MetricQuery

    # The evaluation time reaches Prometheus.
    at = time.time() - 600.25
    assert provider.measure(MetricQuery("t", "time()"), at=at).value == pytest.approx(at, abs=0.01)

    bad = provider.measure(MetricQuery("bad", "sum(rate(foo[5m]"))
    assert bad.value is None and "400" in bad.error
    scalar = provider.measure(MetricQuery("scalar", "vector(2) / vector(4)"))
    assert scalar.value == 0.5 and scalar.error is None
    assert provider.measure(MetricQuery("scalar result", "scalar(vector(3))")).value == 3.0
    nan = provider.measure(MetricQuery("nan", "vector(0) / vector(0)"))
    assert nan.value is None and nan.error is None and not nan.usable
    several = provider.measure(MetricQuery("several", 'label_replace(vector(1), "a", "x", "", "") or '
                                                      'label_replace(vector(2), "a", "y", "", "")'))
    assert several.value is None and "2 series" in several.error

    # Nothing listens on `port`: an error measurement, quickly.
    refused = PrometheusProvider(f"http://127.0.0.1:{port}", timeout=2).measure(MetricQuery("x", "vector(1)"))
    assert refused.value is None and refused.error and "Connection" in refused.error
