"""A bad canary is rolled back by analysis: kopf operator + emulated API + simulated SGLang replicas
(the new revision injected with errors) scraped by a real Prometheus + load. The healthy stable
revision is the baseline; the canary fails its error-rate check and the stable takes all traffic back."""
from __future__ import annotations

import copy
import threading

from digital_worker.operator import render, schema as api, spec as dw_spec
from digital_worker.operator.emulator import EmulatedCluster
from digital_worker.operator.kube import KubeClient
from digital_worker.operator.simpods import SimulatedSglangPods
from dwtest_support import example_worker
from operator_support import load, sync_targets_by_revision, wait_until


def test_bad_canary_is_aborted_by_analysis(prometheus):
    from digital_worker.operator.runner import OperatorThread

    body = example_worker("ana-bot", "ai", replicas=4, rollout={
        "strategy": "Canary",
        "canary": {"steps": [{"setWeight": 25}, {"analysis": {}}, {"setWeight": 100}], "maxSurge": 1},
        # 30 canary requests before the first verdict: with 5, a canary aborting 30% of its requests
        # shows none aborted one time in six (0.7^5) and passes; with 30, P = 0.7^30 = 2e-5. The canary
        # gets a quarter of 15 req/s, so the 20 s window holds them after ~8 s.
        "analysis": {"intervalSeconds": 5, "windowSeconds": 20, "minRequests": 30, "failureLimit": 1,
                     "inconclusiveLimit": 6, "maxErrorRate": 0.02, "maxHTTPErrorRate": 0.02},
    })
    bad = copy.deepcopy(body["spec"])
    bad["model"]["revision"] = "v2-bad"
    bad_revision = render.revision_hash(dw_spec.normalize_spec(bad)[0])

    runtime = SimulatedSglangPods()
    runtime.inject(bad_revision, error_rate=0.3)
    with EmulatedCluster(runtime=runtime, pod_startup_seconds=0.2, namespaces=("default", "ai")) as cluster, \
            OperatorThread(str(cluster.operator_kubeconfig_path), resync_seconds=5, env={"DW_PROMETHEUS_URL": prometheus.url}):
        kube = KubeClient.from_kubeconfig(str(cluster.kubeconfig_path))
        kube.create(body)
        stable = wait_until(lambda: (s := (kube.get(api.API_VERSION, api.PLURAL, "ai", "ana-bot").get("status") or {}))
                            .get("phase") == "Ready" and s, timeout=30, message="Ready")
        stop = threading.Event()
        threads = [threading.Thread(target=sync_targets_by_revision, args=(kube, prometheus, "ana-bot", stop), daemon=True),
                   threading.Thread(target=load, args=(kube, "ana-bot", 15.0, stop), daemon=True)]
        for thread in threads:
            thread.start()
        try:
            kube.patch(api.API_VERSION, api.PLURAL, "ai", "ana-bot", {"spec": {"model": {"revision": "v2-bad"}}})
            final = wait_until(lambda: (s := (kube.get(api.API_VERSION, api.PLURAL, "ai", "ana-bot").get("status") or {}))
                               .get("rollout", {}).get("phase") == "Aborted" and s, timeout=90, interval=1,
                               message=lambda: kube.get(api.API_VERSION, api.PLURAL, "ai", "ana-bot").get("status"))
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
        assert final["currentRevision"] == bad_revision
        assert final["stableRevision"] == stable["currentRevision"]
        assert "analysis failed" in final["rollout"]["abortReason"]
        checks = {c["name"]: c for c in final["rollout"]["analysis"]["checks"]}
        assert checks and any(c["verdict"] == "Failed" for c in checks.values())
        # SGLang's HTTP response counter, scraped by Prometheus, shows the same failures (POST 500s).
        assert checks["maxHTTPErrorRate"]["verdict"] == "Failed" and checks["maxHTTPErrorRate"]["value"] > 0.02
        wait_until(lambda: {d["metadata"]["labels"][api.LABEL_REVISION]: d["spec"]["replicas"] for d in
                            kube.list("apps/v1", "deployments", "ai", f"{api.LABEL_INSTANCE}=ana-bot")}
                   == {stable["currentRevision"]: 4, bad_revision: 0}, message="all traffic back on stable")
        assert any(e["reason"] == "RolloutAborted" and e["type"] == "Warning" for e in kube.list("v1", "events", "ai"))
