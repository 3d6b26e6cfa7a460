"""The fallback step inside a reconcile pass, against the emulated API (no kopf): the warm fallback
Deployment, the Service's selector through Closed -> Open -> HalfOpen -> Open -> HalfOpen -> Closed,
status and Events, idempotence and removal. The clock is passed in; the primary's error rate comes
from a metric provider the test sets (the in-process provider's place), its readiness from the
Deployment status written through the API. The real-Prometheus path is
tests/operator/test_operator_fallback_e2e.py."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from digital_worker.operator import fallback, reconcile, render, schema as api
from digital_worker.operator.emulator import EmulatedCluster
from digital_worker.operator.kube import KubeClient
from digital_worker.operator.metric_providers import ERROR_RATE, REQUEST_COUNT, Measurement, MetricProvider

EXAMPLE = yaml.safe_load((Path(__file__).resolve().parents[2] / "examples" / "digitalworker.yaml").read_text())
NS = "default"
DEFAULT_SELECTOR = {api.LABEL_INSTANCE: "fb", api.LABEL_NAME: api.APP_NAME}


class SetProvider(MetricProvider):
    """Answers the breaker's two queries with what the test sets; None: no data (Prometheus down)."""

    def __init__(self) -> None:
        self.error_rate: float | None = 0.0
        self.requests = 100.0
        self.queries = []

    def measure(self, query, at=None) -> Measurement:
        self.queries.append(query)
        value = {ERROR_RATE: self.error_rate, REQUEST_COUNT: self.requests}[query.name]
        return Measurement(query, value, 1 if value is not None else 0)


@pytest.fixture(scope="module")
def kube():
    with EmulatedCluster(pod_simulator=False) as cluster:
        yield KubeClient.from_kubeconfig(str(cluster.kubeconfig_path))


class Worker:
    def __init__(self, kube: KubeClient, name: str = "fb") -> None:
        body = copy.deepcopy(EXAMPLE)
        body["metadata"] = {"name": name, "namespace": NS}
        body["spec"].pop("rollout")
        body["spec"]["fallback"].update(unhealthySeconds=20, errorRateThreshold=0.5)
        self.kube = kube
        self.body = kube.create(body)
        self.provider = SetProvider()
        self.events: list[str] = []

    def reconcile(self, now: float) -> reconcile.Result:
        """One pass, as reconcile.reconcile() runs it, with the breaker on the test's clock."""
        ctx = reconcile.Context(body=self.body, client=self.kube, now=reconcile.utc_now,
                                analysis_provider=self.provider,
                                observed=reconcile.observe(self.kube, NS, self.body["metadata"]["name"]))
        for step in (reconcile.reconcile_spec, reconcile.reconcile_strategy,
                     lambda c: fallback.reconcile_fallback(c, now=now), reconcile.reconcile_service):
            step(ctx)
        status = reconcile.build_status(ctx)
        self.body = self.kube.patch(api.API_VERSION, api.PLURAL, NS, self.body["metadata"]["name"],
                                    {"status": status}, subresource="status")
        self.events += [event.reason for event in ctx.events if event.reason.startswith("Fallback")]
        return reconcile.Result(status, ctx.events, ctx.changes)

    def set_ready(self, deployment: str, ready: int) -> None:
        self.kube.patch("apps/v1", "deployments", NS, deployment,
                        {"status": {"replicas": ready, "readyReplicas": ready}}, subresource="status")

    def selector(self) -> dict:
        return self.kube.get("v1", "services", NS, self.body["metadata"]["name"])["spec"]["selector"]


def test_breaker_routes_the_service_through_a_whole_incident(kube):
    worker = Worker(kube)
    worker.reconcile(0)
    revision = worker.body["status"]["currentRevision"]
    primary = render.revision_name("fb", revision)
    worker.set_ready(primary, 2)
    worker.set_ready("fb-fallback", 1)
    worker.reconcile(1)
    worker.reconcile(1.5)  # the pass after the first Ready one judges the now stable revision
    status = worker.body["status"]
    assert status["stableRevision"] == revision and status["phase"] == "Ready"
    assert status["fallback"]["phase"] == "Closed" and status["fallback"]["active"] is False
    assert [r["deployment"] for r in status["revisions"]] == [primary]  # the fallback is no revision
    assert worker.selector() == DEFAULT_SELECTOR
    assert "FallbackCreated" in worker.events
    # The error rate asked for is the stable revision's, over the breaker's window.
    assert 'digitalworker_io_revision="%s"' % revision in worker.provider.queries[-1].promql
    assert worker.provider.queries[-1].window_seconds == 20

    assert worker.reconcile(2).changes == 0  # idempotent while healthy

    worker.provider.error_rate = 0.8
    worker.reconcile(10)
    worker.reconcile(25)
    assert worker.selector() == DEFAULT_SELECTOR  # bad for 15 s < unhealthySeconds
    worker.reconcile(30)
    assert worker.selector() == {api.LABEL_INSTANCE: "fb.fallback"}
    status = worker.body["status"]["fallback"]
    assert status["active"] is True and status["phase"] == "Open" and "error rate 80.0%" in status["reason"]
    assert worker.events[-1] == "FallbackActivated"
    assert worker.reconcile(31).changes == 0  # open: nothing to change, nothing measured
    queries = len(worker.provider.queries)
    worker.reconcile(40)
    assert len(worker.provider.queries) == queries

    worker.reconcile(50)  # open period (20 s) over: on trial, sharing with the fallback
    assert worker.selector() == {api.LABEL_WORKER: "fb"} and worker.events[-1] == "FallbackTrial"
    worker.reconcile(55)  # still bad, but the window reaches back before the trial: no verdict
    assert worker.body["status"]["fallback"]["phase"] == "HalfOpen"
    worker.reconcile(61)
    assert worker.selector() == {api.LABEL_INSTANCE: "fb.fallback"} and worker.events[-1] == "FallbackTrialFailed"
    assert worker.body["status"]["fallback"]["state"]["open_seconds"] == 40

    worker.provider.error_rate = 0.01
    worker.reconcile(100)
    assert worker.selector() == {api.LABEL_INSTANCE: "fb.fallback"}  # next trial 40 s after the failed one
    worker.reconcile(101)
    assert worker.selector() == {api.LABEL_WORKER: "fb"}
    worker.reconcile(111)  # trial windows full from here on: good since 111
    worker.reconcile(125)
    assert worker.body["status"]["fallback"]["phase"] == "HalfOpen"
    worker.provider.error_rate = None  # Prometheus gone mid-trial: hold, never recover on no data
    worker.reconcile(140)
    assert worker.body["status"]["fallback"]["phase"] == "HalfOpen"
    worker.provider.error_rate = 0.01
    worker.reconcile(141)
    assert worker.selector() == DEFAULT_SELECTOR  # the stale digitalworker.io/instance key is gone
    assert worker.body["status"]["fallback"]["active"] is False and worker.events[-1] == "FallbackRecovered"

    # Removing spec.fallback removes the fallback and its status.
    worker.body = kube.patch(api.API_VERSION, api.PLURAL, NS, "fb", {"spec": {"fallback": None}})
    worker.reconcile(150)
    assert kube.get("apps/v1", "deployments", NS, "fb-fallback") is None
    assert kube.get("v1", "configmaps", NS, "fb-fallback") is None
    assert "fallback" not in worker.body["status"]
    assert [d["metadata"]["name"] for d in kube.list("apps/v1", "deployments", NS)] == [primary]


def test_no_ready_primary_trips_without_metrics(kube):
    worker = Worker(kube, "fb2")
    worker.provider = None  # no metrics source at all
    worker.reconcile(0)
    primary = render.revision_name("fb2", worker.body["status"]["currentRevision"])
    worker.set_ready(primary, 2)
    worker.set_ready("fb2-fallback", 1)
    worker.reconcile(1)
    worker.reconcile(100)
    assert worker.body["status"]["fallback"]["phase"] == "Closed"  # no data: hold
    worker.set_ready(primary, 0)
    worker.reconcile(101)
    worker.reconcile(121)
    assert worker.body["status"]["fallback"]["phase"] == "Open"
    assert kube.get("v1", "services", NS, "fb2")["spec"]["selector"] == {api.LABEL_INSTANCE: "fb2.fallback"}


def test_unreachable_prometheus_holds_and_is_not_asked_again_at_once(monkeypatch):
    from types import SimpleNamespace

    from dwtest_support import free_port

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    ctx = SimpleNamespace(prometheus_url=url, analysis_provider=None, namespace=NS, name="fb")
    rate, requests, missing = fallback.measure_error_rate(ctx, "abc", 10, 0.0)
    assert rate is None and requests is None and missing.startswith("ConnectionError")
    asked = []
    monkeypatch.setattr(fallback._prometheus_providers[url], "measure", lambda query, at=None: asked.append(query) or Measurement(query, None))
    assert fallback.measure_error_rate(ctx, "abc", 10, 0.0)[2] == "Prometheus unreachable (retrying shortly)"
    assert asked == []  # within the backoff: no query, no timeout paid
    monkeypatch.setitem(fallback._prometheus_down_until, url, 0.0)
    fallback.measure_error_rate(ctx, "abc", 10, 0.0)
    assert len(asked) == 1
