"""Rollout analysis on the embedded default, with no Prometheus anywhere: kopf operator + emulated API
+ simulated SGLang replicas + load; the operator scrapes the revisions of rollouts in progress itself
(inprocess_analysis.RolloutScraper on its periodic tick). Two workers roll out at once: one canary
with 30% of its requests aborted is rolled back by its analysis, the healthy one passes and
becomes stable."""
from __future__ import annotations

import copy
import threading

import pytest
from devfleet_support import load, wait_until, worker_status
from digital_worker.operator import render
from digital_worker.operator import schema as api
from digital_worker.operator import spec as dw_spec
from digital_worker.operator.emulator import EmulatedCluster
from digital_worker.operator.kube import KubeClient
from digital_worker.operator.simpods import SimulatedSglangPods
from dwtest_support import example_worker

pytestmark = pytest.mark.e2e
NAMESPACE = "ai"


def worker(name: str) -> dict:
    # One story at a time: no fallback model's pods. The first judged run must see enough requests:
    # with minRequests 5, a canary aborting 30% of its requests shows no error in 5 of them one time
    # in six (0.7^5) and passes maxErrorRate 0.05 on the point estimate; 40 requests leave
    # P(at most 2 errors) = 1e-4. The canary gets ~6 req/s, so the 15 s window holds them after ~7 s.
    return example_worker(name, NAMESPACE, replicas=2, fallback=None, rollout={
        "strategy": "Canary",
        "canary": {"steps": [{"setWeight": 50}, {"analysis": {}}, {"setWeight": 100}], "maxSurge": 1},
        "analysis": {"intervalSeconds": 5, "windowSeconds": 15, "minRequests": 40, "failureLimit": 1,
                     "inconclusiveLimit": 8, "maxErrorRate": 0.05, "maxHTTPErrorRate": 0.05,
                     "maxTTFTP95Ratio": 3.0, "maxITLP95Ratio": 3.0},
    })


def revision_of(body: dict, model_revision: str) -> str:
    spec = copy.deepcopy(body["spec"])
    spec["model"]["revision"] = model_revision
    return render.revision_hash(dw_spec.normalize_spec(spec)[0])


def test_analysis_without_prometheus_aborts_a_bad_canary_and_passes_a_good_one():
    from digital_worker.operator.runner import OperatorThread

    bad, good = worker("bad-bot"), worker("good-bot")
    bad_revision = revision_of(bad, "v2-bad")
    runtime = SimulatedSglangPods()
    runtime.inject(bad_revision, error_rate=0.3)
    with EmulatedCluster(runtime=runtime, pod_startup_seconds=0.2, namespaces=("default", NAMESPACE)) as cluster, \
            OperatorThread(str(cluster.operator_kubeconfig_path), resync_seconds=5, env={"DW_PROMETHEUS_URL": ""}):
        kube = KubeClient.from_kubeconfig(str(cluster.kubeconfig_path))
        kube.create(bad)
        kube.create(good)
        def reached(name: str, phase: str, key: str = "phase"):
            """The worker's status once `status[key]` (or `status.rollout.phase`) is `phase`."""
            def check():
                status = worker_status(kube, NAMESPACE, name)
                current = status.get("rollout", {}).get("phase") if key == "rollout" else status.get(key)
                return current == phase and status
            return check

        stable = {name: wait_until(reached(name, "Ready"), message=f"{name} Ready")["currentRevision"]
                  for name in ("bad-bot", "good-bot")}
        stop = threading.Event()
        threads = [threading.Thread(target=load, args=(kube, NAMESPACE, name, 12.0, stop), daemon=True)
                   for name in ("bad-bot", "good-bot")]
        for thread in threads:
            thread.start()
        try:
            kube.patch(api.API_VERSION, api.PLURAL, NAMESPACE, "bad-bot", {"spec": {"model": {"revision": "v2-bad"}}})
            kube.patch(api.API_VERSION, api.PLURAL, NAMESPACE, "good-bot", {"spec": {"model": {"revision": "v2"}}})
            finals = {}
            for name, phase in (("bad-bot", "Aborted"), ("good-bot", "Completed")):
                finals[name] = wait_until(reached(name, phase, "rollout"), timeout=60, interval=0.5,
                                          message=lambda n=name: worker_status(kube, NAMESPACE, n).get("rollout"))
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)

        aborted = finals["bad-bot"]["rollout"]
        assert finals["bad-bot"]["currentRevision"] == bad_revision
        assert finals["bad-bot"]["stableRevision"] == stable["bad-bot"]
        assert "analysis failed" in aborted["abortReason"]
        checks = {c["name"]: c for c in aborted["analysis"]["checks"]}
        assert checks["maxErrorRate"]["verdict"] == "Failed" and checks["maxErrorRate"]["value"] > 0.05
        # The same failures, as the replicas' own HTTP metrics count them (500s of POSTs).
        assert checks["maxHTTPErrorRate"]["verdict"] == "Failed" and checks["maxHTTPErrorRate"]["value"] > 0.05
        wait_until(lambda: {d["metadata"]["labels"][api.LABEL_REVISION]: d["spec"]["replicas"] for d in
                            kube.list("apps/v1", "deployments", NAMESPACE, f"{api.LABEL_INSTANCE}=bad-bot")}
                   == {stable["bad-bot"]: 2, bad_revision: 0}, message="all traffic back on stable")

        promoted = finals["good-bot"]
        assert promoted["stableRevision"] == promoted["currentRevision"] != stable["good-bot"]
        passed = {c["name"]: c for c in promoted["rollout"].get("analysis", {}).get("checks", [])} or None
        events = kube.list("v1", "events", NAMESPACE)
        assert any(e["reason"] == "AnalysisPassed" and e["involvedObject"]["name"] == "good-bot" for e in events)
        assert any(e["reason"] == "RolloutAborted" and e["involvedObject"]["name"] == "bad-bot" for e in events)
        assert passed is None or all(c["verdict"] == "Successful" for c in passed.values())
