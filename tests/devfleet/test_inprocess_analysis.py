"""The in-process analysis provider on recorded /metrics pages (no servers, no Prometheus).

Each simulated replica is a prometheus_client registry with SGLang's metric names and buckets; a
"scrape" renders it (classic text or OpenMetrics, as the two name spellings come) and hands the page
to `RolloutScraper.scrape_worker` through its `fetch` seam. The provider must answer the queries
`revision_queries` builds with what the PromQL would mean, and never let missing data pass."""
from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from digital_worker.operator import schema as api
from digital_worker.operator.analysis import (
    AnalysisSpec,
    Verdict,
    judge_run,
    measure_run,
)
from digital_worker.operator.autoscaling.metrics import parse_sglang_exposition
from digital_worker.operator.inprocess_analysis import (
    InProcessAnalysisProvider,
    RolloutScraper,
    revision_measurement,
    scrape_interval,
)
from digital_worker.operator.metric_providers import (
    E2E_P95,
    ERROR_RATE,
    HTTP_ERROR_RATE,
    KV_USAGE,
    QUEUE_LENGTH,
    REQUEST_COUNT,
    REQUEST_RATE,
    TTFT_P95,
    HttpErrorSource,
    MetricQuery,
    PrometheusProvider,
    revision_matchers,
    revision_queries,
)
from digital_worker.runtime.sglang_metrics import (
    E2E_BUCKETS,
    INTER_TOKEN_BUCKETS,
    TTFT_BUCKETS,
)

NAMESPACE, WORKER = "ai", "bot"


class Replica:
    """One SGLang replica's metrics, rendered as its /metrics page would be."""

    def __init__(self, openmetrics: bool = False) -> None:
        self.openmetrics = openmetrics
        self.registry = registry = CollectorRegistry()
        self.finished = Counter("sglang:num_requests_total", "requests", ["model_name"], registry=registry)
        self.aborted = Counter("sglang:num_aborted_requests_total", "aborted", ["model_name"], registry=registry)
        self.ttft = Histogram("sglang:time_to_first_token_seconds", "ttft", ["model_name"], buckets=TTFT_BUCKETS,
                              registry=registry)
        self.itl = Histogram("sglang:inter_token_latency_seconds", "itl", ["model_name"],
                             buckets=INTER_TOKEN_BUCKETS, registry=registry)
        self.e2e = Histogram("sglang:e2e_request_latency_seconds", "e2e", ["model_name"], buckets=E2E_BUCKETS,
                             registry=registry)
        self.queue = Gauge("sglang:num_queue_reqs", "queue", ["model_name"], registry=registry)
        self.usage = Gauge("sglang:token_usage", "kv", ["model_name"], registry=registry)
        # SGLang's HTTP middleware: no base labels.
        self.responses = Counter("sglang:http_responses_total", "responses", ["endpoint", "status_code", "method"],
                                 registry=registry)
        self.queue.labels("m").set(0)
        self.usage.labels("m").set(0)
        self.finished.labels("m")

    def serve(self, finished: int = 0, aborted: int = 0, ttft: float = 0.3, itl: float = 0.02, failed: int = 0) -> None:
        """`finished` served well; `failed` ended by the scheduler with HTTP 500 (SGLang counts them
        finished too); `aborted` by clients gone (counted aborted, no response)."""
        for _ in range(finished):
            self.finished.labels("m").inc()
            self.ttft.labels("m").observe(ttft)
            self.itl.labels("m").observe(itl)
            self.e2e.labels("m").observe(ttft + 100 * itl)
        if aborted:
            self.aborted.labels("m").inc(aborted)
        chat = {"endpoint": "/v1/chat/completions", "method": "POST"}
        if finished:
            self.responses.labels(status_code="200", **chat).inc(finished)
        if failed:
            self.finished.labels("m").inc(failed)
            self.responses.labels(status_code="500", **chat).inc(failed)
        # Probes: GETs, all fine, as many as the requests; they must not dilute the HTTP error rate.
        self.responses.labels(endpoint="/health", status_code="200", method="GET").inc(finished + aborted + failed)

    def page(self) -> str:
        return (generate_openmetrics if self.openmetrics else generate_latest)(self.registry).decode()


def pod(name: str, revision: str) -> dict:
    return {"metadata": {"name": name, "namespace": NAMESPACE, "labels": {api.LABEL_REVISION: revision},
                         "annotations": {f"{api.GROUP}/sim-endpoint": f"http://{name}"}}}


class Fleet:
    """Replicas by pod name, scraped through the scraper's fetch seam."""

    def __init__(self, **revisions: list[Replica]) -> None:
        self.replicas = {f"{revision}-{i}": replica for revision, replicas in revisions.items()
                         for i, replica in enumerate(replicas)}
        self.pods = [pod(name, name.rsplit("-", 1)[0]) for name in self.replicas]
        self.scraper = RolloutScraper(fetch=lambda url: self.replicas[url.split("//")[1].split("/")[0]].page())

    @property
    def provider(self) -> InProcessAnalysisProvider:
        return self.scraper.provider

    def scrape(self, now: float) -> int:
        return self.scraper.scrape_worker(NAMESPACE, WORKER, self.pods, now)


def queries(revision: str, window: float = 10, **kwargs) -> dict[str, MetricQuery]:
    return revision_queries(revision_matchers(NAMESPACE, WORKER, revision), window, **kwargs)


@pytest.mark.parametrize("openmetrics", [False, True])
def test_counts_error_rate_and_latency_of_each_revision_over_the_window(openmetrics):
    fleet = Fleet(stable=[Replica(openmetrics), Replica(openmetrics)], canary=[Replica(openmetrics)])
    stable_a, stable_b, canary = fleet.replicas.values()
    # Before the window: lots of slow traffic that must not count.
    for replica in (stable_a, stable_b, canary):
        replica.serve(finished=500, aborted=7, ttft=9.0)
    fleet.scrape(100.0)
    stable_a.serve(finished=60, ttft=0.3)
    stable_b.serve(finished=40, ttft=0.3)
    canary.serve(finished=43, failed=5, aborted=2, ttft=1.5)
    assert fleet.scrape(110.0) == 3

    stable = fleet.provider.measure_all(queries("stable", http_errors=HttpErrorSource()), at=110.0)
    bad = fleet.provider.measure_all(queries("canary", http_errors=HttpErrorSource()), at=110.0)
    assert stable[REQUEST_COUNT].value == 100 and stable[ERROR_RATE].value == 0
    assert bad[REQUEST_COUNT].value == 50 and bad[ERROR_RATE].value == pytest.approx(7 / 50)
    # Failed: 2 aborted + 5 answered 500 of 50 ended; the HTTP view: 5 non-2xx of 48 POST answers.
    assert stable[HTTP_ERROR_RATE].value == 0 and bad[HTTP_ERROR_RATE].value == pytest.approx(5 / 48)
    assert stable[REQUEST_RATE].value == pytest.approx(10.0)  # 100 finished in 10 s
    assert 0.2 < stable[TTFT_P95].value <= 0.4  # only the window's observations: all 0.3 s
    assert 1.0 < bad[TTFT_P95].value <= 2.0
    assert 2.0 < bad[E2E_P95].value <= 4.0
    assert all(m.series_count == 1 and m.error is None for m in (*stable.values(), *bad.values()))

    spec = AnalysisSpec(min_requests=20, max_error_rate=0.02, max_ttft_p95_ratio=1.5, max_http_error_rate=0.05)
    run = judge_run(spec, measure_run(fleet.provider, spec, revision_matchers(NAMESPACE, WORKER, "canary"),
                                      revision_matchers(NAMESPACE, WORKER, "stable"), at=110.0))
    assert run.verdict is Verdict.FAILED
    assert {c.name for c in run.checks if c.verdict is Verdict.FAILED} == {
        "maxErrorRate", "maxTTFTP95Ratio", "maxHTTPErrorRate"}


def test_a_healthy_canary_passes():
    fleet = Fleet(stable=[Replica()], canary=[Replica(openmetrics=True)])
    fleet.scrape(0.0)
    for t in (5.0, 10.0):
        for replica in fleet.replicas.values():
            replica.serve(finished=15, ttft=0.25)
        fleet.scrape(t)
    spec = AnalysisSpec(min_requests=20, max_error_rate=0.02)
    run = judge_run(spec, measure_run(fleet.provider, spec, revision_matchers(NAMESPACE, WORKER, "canary"),
                                      revision_matchers(NAMESPACE, WORKER, "stable"), at=10.0))
    assert run.verdict is Verdict.SUCCESSFUL, run.message


def test_the_window_starts_at_the_last_scrape_before_it_and_restarts_count_from_zero():
    replica = Replica()
    fleet = Fleet(canary=[replica])
    for t, served in ((0.0, 100), (10.0, 30), (20.0, 20), (30.0, 10)):
        replica.serve(finished=served)
        fleet.scrape(t)
    assert fleet.provider.measure(queries("canary", window=15)[REQUEST_COUNT], at=30.0).value == 30  # 10..30
    assert fleet.provider.measure(queries("canary", window=25)[REQUEST_COUNT], at=30.0).value == 60  # 0..30
    # The replica restarts: its counters start again from zero.
    fresh = Replica()
    fleet.replicas["canary-0"] = fresh
    fresh.serve(finished=4, aborted=1)
    fleet.scrape(40.0)
    count = fleet.provider.measure(queries("canary", window=15)[REQUEST_COUNT], at=40.0)
    assert count.value == 10 + 5
    assert fleet.provider.measure(queries("canary", window=15)[ERROR_RATE], at=40.0).value == pytest.approx(1 / 15)
    # Bucket increases across the restart too: 10 + 4 observations, all 0.3 s.
    assert 0.2 < fleet.provider.measure(queries("canary", window=15)[TTFT_P95], at=40.0).value <= 0.4


def test_queue_is_the_worst_replicas_average_and_kv_usage_its_maximum():
    fleet = Fleet(stable=[Replica(), Replica()])
    first, second = fleet.replicas.values()
    for t, (q1, q2, u1, u2) in enumerate([(2, 0, 0.2, 0.5), (4, 1, 0.9, 0.4), (6, 1, 0.3, 0.6)]):
        first.queue.labels("m").set(q1), second.queue.labels("m").set(q2)
        first.usage.labels("m").set(u1), second.usage.labels("m").set(u2)
        fleet.scrape(float(t))
    measured = fleet.provider.measure_all(queries("stable", window=10), at=2.0)
    assert measured[QUEUE_LENGTH].value == pytest.approx(4.0)
    assert measured[KV_USAGE].value == pytest.approx(0.9)


def test_missing_data_is_never_a_number_and_never_a_pass():
    fleet = Fleet(stable=[Replica()], canary=[Replica()])
    spec = AnalysisSpec(min_requests=0, max_error_rate=0.02, max_ttft_p95_ratio=1.5)

    def run(at: float):
        return judge_run(spec, measure_run(fleet.provider, spec, revision_matchers(NAMESPACE, WORKER, "canary"),
                                           revision_matchers(NAMESPACE, WORKER, "stable"), at=at))

    # Never scraped: a provider error, like an unreachable Prometheus.
    never = fleet.provider.measure(queries("canary")[ERROR_RATE], at=5.0)
    assert never.value is None and "no in-process scrape" in never.error
    assert run(5.0).verdict is Verdict.INCONCLUSIVE and run(5.0).metrics_unavailable

    fleet.scrape(0.0)  # one scrape: no increase yet
    one = fleet.provider.measure(queries("canary")[REQUEST_COUNT], at=0.0)
    assert (one.value, one.series_count, one.error) == (None, 0, None)
    assert run(0.0).verdict is Verdict.INCONCLUSIVE

    fleet.scrape(5.0)  # two scrapes, no traffic: 0 requests, error rate 0/0, no TTFT observations
    idle = fleet.provider.measure_all(queries("canary"), at=5.0)
    assert idle[REQUEST_COUNT].value == 0
    assert idle[ERROR_RATE].value is None and idle[ERROR_RATE].series_count == 1
    assert idle[TTFT_P95].value is None
    assert run(5.0).verdict is Verdict.INCONCLUSIVE

    # A revision without pods, a hand-written query, a regex matcher, a metric SGLang does not export.
    assert fleet.provider.measure(queries("gone")[REQUEST_COUNT], at=5.0).series_count == 0
    assert fleet.provider.measure(MetricQuery("x", "vector(1)"), at=5.0).error
    regex = revision_queries({"namespace": NAMESPACE, "digitalworker_io_instance": WORKER,
                              "digitalworker_io_revision": ("=~", "canary|stable")}, 10)[REQUEST_COUNT]
    assert fleet.provider.measure(regex, at=5.0).error
    idle_http = fleet.provider.measure(queries("canary", http_errors=HttpErrorSource())[HTTP_ERROR_RATE], at=5.0)
    assert idle_http.value is None and idle_http.error is None  # no POST answered: 0/0
    gateway = HttpErrorSource("http_requests_total", "code", sglang=False, method=None)
    assert "hand-written" in fleet.provider.measure(queries("canary", http_errors=gateway)[HTTP_ERROR_RATE], at=5.0).error

    # Pods exist but none answers: after a window without a successful scrape, metrics are unavailable.
    fleet.scraper.fetch = lambda url: (_ for _ in ()).throw(ConnectionRefusedError(url))
    assert fleet.scrape(30.0) == 0
    assert "no in-process scrape" in fleet.provider.measure(queries("canary")[REQUEST_COUNT], at=30.0).error


def test_structured_fields_leave_the_promql_and_prometheus_provider_as_they_were():
    query = queries("canary")[TTFT_P95]
    assert query.measurement == TTFT_P95 and query.window_seconds == 10 and query.quantile == 0.95
    assert query.matcher_values() == revision_matchers(NAMESPACE, WORKER, "canary")
    assert query.promql.startswith("histogram_quantile(0.95, sum by (le) (rate({__name__=~")
    assert queries("canary")[REQUEST_COUNT].quantile is None
    # PrometheusProvider reads only the PromQL: an unreachable one still answers with an error.
    measured = PrometheusProvider("http://127.0.0.1:9", timeout=0.5).measure(query, at=1.0)
    assert measured.value is None and measured.error


def test_revision_measurement_is_pure_and_sums_pods():
    replica = Replica()
    fleet = Fleet(canary=[replica])
    fleet.scrape(0.0)
    replica.serve(finished=10)
    fleet.scrape(1.0)
    samples = {pod: list(series) for pod, series in fleet.provider._samples[(NAMESPACE, WORKER, "canary")].items()}
    doubled = {"a": samples["canary-0"], "b": samples["canary-0"]}
    assert revision_measurement(doubled, REQUEST_COUNT, 5, 1.0) == (20, 1)
    assert revision_measurement({}, REQUEST_COUNT, 5, 1.0) == (None, 0)
    assert math.isclose(revision_measurement(doubled, REQUEST_RATE, 5, 1.0)[0], 20.0)


def rollout_body(name: str, phase: str | None, window: float = 10) -> dict:
    return {"metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"rollout": {"canary": {"steps": [{"analysis": {"windowSeconds": window}}]},
                                 "analysis": {"windowSeconds": 60}}},
            "status": {"rollout": {"phase": phase}} if phase else {}}


def test_only_rollouts_in_progress_are_scraped_at_a_cadence_from_their_window():
    scraper = RolloutScraper()
    bodies = [rollout_body("a", "Progressing"), rollout_body("b", "Completed"), rollout_body("c", None),
              rollout_body("d", "Progressing", window=600)]
    assert scrape_interval(bodies[0]["spec"]) == 2.0  # the shortest window / 5
    assert scrape_interval(bodies[3]["spec"]) == 10.0  # never rarer than every 10 s
    blue_green = {"rollout": {"strategy": "BlueGreen", "blueGreen": {"postPromotionAnalysis": {"windowSeconds": 20}}}}
    assert scrape_interval(blue_green) == 4.0
    assert scraper.due(bodies, 100.0) == [(NAMESPACE, "a"), (NAMESPACE, "d")]
    assert scraper.due(bodies, 101.0) == []
    assert scraper.due(bodies, 102.0) == [(NAMESPACE, "a")]
    # "a" finishes its rollout: its samples are dropped.
    scraper.provider.record(NAMESPACE, "a", "r1", "p", parse_sglang_exposition([Replica().page()], 102.0))
    assert scraper.provider.revisions() == [(NAMESPACE, "a", "r1")]
    bodies[0]["status"]["rollout"]["phase"] = "Completed"
    assert scraper.due(bodies, 104.0) == []
    assert scraper.provider.revisions() == []


async def test_a_tick_never_waits_for_slow_scrapes_and_never_overlaps_them():
    import asyncio
    import threading

    release = threading.Event()
    calls = []
    fleet = Fleet(canary=[Replica()])

    def list_pods(namespace, instance):
        calls.append(instance)
        release.wait(5)  # pods that take seconds to answer
        return fleet.pods

    async def run_sync(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    scraper = fleet.scraper
    bodies = [rollout_body(WORKER, "Progressing")]
    await asyncio.wait_for(scraper.tick_all(bodies, list_pods, run_sync, now=100.0), 0.5)
    await asyncio.wait_for(scraper.tick_all(bodies, list_pods, run_sync, now=110.0), 0.5)  # due, but in flight
    await asyncio.sleep(0.1)
    assert calls == [WORKER]
    release.set()
    for _ in range(50):
        if fleet.provider.revisions():
            break
        await asyncio.sleep(0.05)
    assert fleet.provider.revisions() == [(NAMESPACE, WORKER, "canary")]
