"""The rollout stories of issue #4, each end to end in one process tree: emulated API + real kopf
operator + simulated SGLang replicas (faults injected per revision) + a real Prometheus scraping them +
open-loop load. A healthy canary survives an operator restart at every step; a canary with 5% errors
aborts at its first analysis; one with slower first tokens aborts on the check relative to the stable;
no traffic pauses (never promotes); Prometheus dying mid-analysis pauses."""
from __future__ import annotations

import copy
import threading

import pytest

from digital_worker.operator import render, schema as api, spec as dw_spec
from digital_worker.operator.emulator import EmulatedCluster
from digital_worker.operator.kube import KubeClient
from digital_worker.operator.runner import OperatorThread
from digital_worker.operator.simpods import SimulatedSglangPods
from dwtest_support import PrometheusServer, example_worker
from operator_support import load, sync_targets_by_revision, wait_until

NS = "ai"
ANALYSIS = {"intervalSeconds": 5, "windowSeconds": 20, "minRequests": 30, "failureLimit": 1,
            "inconclusiveLimit": 2, "maxErrorRate": 0.01, "maxTTFTP95Ratio": 1.5}


def worker(name: str, steps: list[dict], analysis: dict | None = None) -> dict:
    return example_worker(name, NS, replicas=4, fallback=None, rollout={
        "strategy": "Canary", "canary": {"steps": steps, "maxSurge": 2}, "analysis": {**ANALYSIS, **(analysis or {})}})


def revision_of(body: dict, model_revision: str) -> str:
    spec = copy.deepcopy(body["spec"])
    spec["model"]["revision"] = model_revision
    return render.revision_hash(dw_spec.normalize_spec(spec)[0])


def status(kube, name: str) -> dict:
    return (kube.get(api.API_VERSION, api.PLURAL, NS, name) or {}).get("status") or {}


def deployments(kube, name: str) -> dict[str, int]:
    return {d["metadata"]["labels"][api.LABEL_REVISION]: d["spec"]["replicas"]
            for d in kube.list("apps/v1", "deployments", NS, f"{api.LABEL_INSTANCE}={name}")}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """The cluster with simulated replicas and one Prometheus per test module (a test may kill its own)."""
    runtime = SimulatedSglangPods()
    with EmulatedCluster(runtime=runtime, pod_startup_seconds=0.2, namespaces=("default", NS)) as cluster:
        yield cluster, runtime, KubeClient.from_kubeconfig(str(cluster.kubeconfig_path))


class Story:
    """Load and Prometheus target discovery for one worker while a test runs."""

    def __init__(self, kube, prometheus, name: str, rate: float) -> None:
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=sync_targets_by_revision, args=(kube, prometheus, name, self.stop),
                                         daemon=True)]
        if rate:
            self.threads.append(threading.Thread(target=load, args=(kube, name, rate, self.stop), daemon=True))

    def __enter__(self) -> "Story":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)


def run_canary(fleet, prometheus, name: str, faults: dict | None, rate: float, until, steps=None,
               analysis=None, timeout: float = 90) -> dict:
    cluster, runtime, kube = fleet
    body = worker(name, steps or [{"setWeight": 50}, {"analysis": {}}, {"setWeight": 100}], analysis)
    if faults:
        runtime.inject(revision_of(body, f"v2-{name}"), **faults)  # a revision of its own: faults stay here
    with OperatorThread(str(cluster.operator_kubeconfig_path), resync_seconds=5, env={"DW_PROMETHEUS_URL": prometheus.url}):
        kube.create(body)
        try:
            wait_until(lambda: status(kube, name).get("phase") == "Ready", timeout=30,
                       message=lambda: (status(kube, name), kube.list("v1", "pods", NS)))
            with Story(kube, prometheus, name, rate):
                kube.patch(api.API_VERSION, api.PLURAL, NS, name, {"spec": {"model": {"revision": f"v2-{name}"}}})
                final = wait_until(lambda: until(status(kube, name)) and status(kube, name), timeout=timeout,
                                   interval=0.5, message=lambda: status(kube, name).get("rollout"))
                final["deployments"] = deployments(kube, name)
                return final
        finally:
            kube.delete(api.API_VERSION, api.PLURAL, NS, name)  # its GPUs go back for the next story


def aborted(s: dict) -> bool:
    return (s.get("rollout") or {}).get("phase") == "Aborted"


def test_five_percent_errors_abort_at_the_first_analysis(fleet, prometheus):
    # Judged on 30-40 requests, a 5% error rate shows no error at all about one time in six (0.95^35)
    # and the canary passes; 150 requests leave P(at most 1 error) = 0.4%. Waiting for them takes
    # longer than two runs' worth of inconclusive looks, hence the higher inconclusiveLimit.
    final = run_canary(fleet, prometheus, "errors-bot", {"error_rate": 0.05}, rate=20, until=aborted,
                       analysis={"minRequests": 150, "inconclusiveLimit": 6})
    analysis = final["rollout"]["analysis"]
    # The first run with enough requests to judge fails it (earlier ones may lack the window's data).
    assert analysis["successfulRuns"] == 0 and analysis["consecutiveFailures"] == 1
    assert analysis["lastVerdict"] == "Failed"
    failed = [c for c in analysis["checks"] if c["verdict"] == "Failed"]
    assert any("error" in c["name"].lower() for c in failed), failed
    # Abort gives all traffic back to the stable at once (the canary is scaled to zero in the same pass).
    assert final["deployments"] == {final["stableRevision"]: 4, final["currentRevision"]: 0}


def test_slower_first_tokens_abort_on_the_check_relative_to_the_stable(fleet, prometheus):
    final = run_canary(fleet, prometheus, "slow-bot", {"latency_factor": 2.0}, rate=20, until=aborted,
                       analysis={"maxErrorRate": 0.5, "minRequests": 10})
    failed = [c for c in final["rollout"]["analysis"]["checks"] if c["verdict"] == "Failed"]
    assert failed and all("ratio" in c["name"].lower() or "relative" in str(c).lower() for c in failed), failed


def test_no_traffic_pauses_and_never_promotes(fleet, prometheus):
    final = run_canary(fleet, prometheus, "quiet-bot", None, rate=0,
                       until=lambda s: (s.get("rollout") or {}).get("phase") == "Paused")
    assert final["rollout"]["step"] == 1 and final["rollout"]["analysis"]["lastVerdict"] == "Inconclusive"
    progressing = next(c for c in final["conditions"] if c["type"] == "Progressing")
    assert progressing["status"] == "False" and progressing["reason"] == "RolloutPaused"
    assert final["stableRevision"] != final["currentRevision"]


def test_prometheus_dying_mid_analysis_pauses(fleet, tmp_path):
    (tmp_path / "prometheus").mkdir()
    own = PrometheusServer(tmp_path / "prometheus")
    own.start()
    killer = threading.Timer(4.0, own.stop)  # after the canary's pods are up, before the first analysis run
    try:
        cluster, runtime, kube = fleet

        def started(s: dict) -> bool:
            if (s.get("rollout") or {}).get("step") == 1 and not killer.is_alive() and own.process is not None:
                killer.start()
            return (s.get("rollout") or {}).get("phase") == "Paused"

        final = run_canary(fleet, own, "blind-bot", None, rate=20, until=started)
    finally:
        killer.cancel()
        own.stop()
    analysis = final["rollout"]["analysis"]
    assert analysis["reason"] == "MetricsUnavailable" and final["rollout"]["step"] == 1
    assert final["stableRevision"] != final["currentRevision"]


def test_healthy_canary_survives_an_operator_restart_at_every_step(fleet, prometheus):
    """Operator killed after each step change: the rollout resumes from status.rollout, ends Completed,
    and there is never a duplicate, an orphaned or a third Deployment."""
    cluster, runtime, kube = fleet
    name = "restart-bot"
    body = worker(name, [{"setWeight": 25}, {"pause": {"duration": "1s"}}, {"setWeight": 50},
                         {"analysis": {}}, {"setWeight": 100}], analysis={"inconclusiveLimit": 8, "minRequests": 20})
    operator = OperatorThread(str(cluster.operator_kubeconfig_path), resync_seconds=5, env={"DW_PROMETHEUS_URL": prometheus.url})
    operator.start()
    restarts, seen_steps, most = 0, set(), 0
    try:
        kube.create(body)
        first = wait_until(lambda: (s := status(kube, name)).get("phase") == "Ready" and s, timeout=30)
        with Story(kube, prometheus, name, rate=20):
            kube.patch(api.API_VERSION, api.PLURAL, NS, name, {"spec": {"model": {"revision": f"v2-{name}"}}})

            def step_and_restart():
                nonlocal restarts, most, operator
                most = max(most, len(deployments(kube, name)))
                state = status(kube, name).get("rollout") or {}
                if state.get("phase") == "Completed":
                    return state
                step = state.get("step")
                if step is not None and step not in seen_steps:
                    seen_steps.add(step)
                    operator.stop()
                    restarts += 1
                    operator = OperatorThread(str(cluster.operator_kubeconfig_path), resync_seconds=5,
                                              env={"DW_PROMETHEUS_URL": prometheus.url})
                    operator.start()
                return None

            done = wait_until(step_and_restart, timeout=150, interval=0.3, message=lambda: status(kube, name))
        final = wait_until(lambda: (s := status(kube, name)).get("phase") == "Ready" and s, timeout=30)
        final_deployments = wait_until(lambda: len(d := deployments(kube, name)) == 1 and d, timeout=15)
    finally:
        kube.delete(api.API_VERSION, api.PLURAL, NS, name)
        operator.stop()
    assert done["phase"] == "Completed" and restarts >= 4, (restarts, seen_steps)
    assert final["stableRevision"] == final["currentRevision"] != first["currentRevision"]
    assert final_deployments == {final["currentRevision"]: 4}
    assert most <= 2
