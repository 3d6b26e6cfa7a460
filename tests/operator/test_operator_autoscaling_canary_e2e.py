"""Autoscaling during a canary rollout, end to end: kopf operator + emulated API + simulated SGLang
replicas + the in-process scraper + a load generator. The autoscaler sizes the total (it writes
spec.replicas through the scale subresource, measuring every revision's pods); the rollout splits
that total at the weight of the step it is paused on. Nothing strands: after promotion the new
revision carries the whole (scaled) total and the old one is gone."""
from __future__ import annotations

import math
import threading

import pytest

from digital_worker.operator import schema as api
from digital_worker.operator.kube import KubeClient
from operator_support import load, simulated_fleet, scaling_worker, wait_until

NAME = "canary-bot"


@pytest.fixture(scope="module")
def canary_cluster():
    with simulated_fleet(resync_seconds=2) as cluster:
        yield cluster


def body(kube):
    return kube.get(api.API_VERSION, api.PLURAL, "ai", NAME) or {}


def rollout(kube):
    return (body(kube).get("status") or {}).get("rollout") or {}


def sizes(kube) -> dict[str, int]:
    return {d["metadata"]["labels"][api.LABEL_REVISION]: int(d["spec"]["replicas"])
            for d in kube.list("apps/v1", "deployments", "ai", f"{api.LABEL_INSTANCE}={NAME}")}


# A canary paused between setWeight steps keeps its weight for whatever total the autoscaler sets.
def test_autoscaler_sizes_the_total_and_the_paused_canary_splits_it(canary_cluster):
    kube = KubeClient.from_kubeconfig(str(canary_cluster.kubeconfig_path))
    worker = scaling_worker(NAME, "Auto")
    worker["spec"]["replicas"] = 2
    worker["spec"]["autoscaling"]["maxReplicas"] = 6
    worker["spec"]["rollout"] = {"strategy": "Canary",
                                 "canary": {"steps": [{"setWeight": 50}, {"pause": {}}, {"setWeight": 100}],
                                            "maxSurge": 1}}
    kube.create(worker)
    first = wait_until(lambda: (s := body(kube).get("status") or {}).get("phase") == "Ready" and s,
                       timeout=30, message="Ready")
    stable = first["currentRevision"]
    kube.patch(api.API_VERSION, api.PLURAL, "ai", NAME, {"spec": {"model": {"revision": "v2"}}})
    paused = wait_until(lambda: (r := rollout(kube)).get("phase") == "Paused" and r, timeout=40,
                        message=lambda: rollout(kube))
    assert paused["step"] == 1 and paused["requestedWeight"] == 50
    canary = paused["revision"]
    assert canary != stable
    wait_until(lambda: sizes(kube) == {stable: 1, canary: 1}, message=lambda: sizes(kube))

    stop = threading.Event()
    generator = threading.Thread(target=load, args=(kube, NAME, 12.0, stop), daemon=True)
    generator.start()
    try:
        # The autoscaler raises the total (spec.replicas) while the canary stays paused at 50%.
        # A tick writes status.autoscaling just after it scales: wait for both.
        scaled = wait_until(lambda: (b := body(kube))["spec"]["replicas"] >= 4
                            and ((b.get("status") or {}).get("autoscaling") or {}).get("desiredReplicas", 0) >= 4 and b,
                            timeout=90, interval=1,
                            message=lambda: (body(kube).get("status") or {}).get("autoscaling"))
    finally:
        stop.set()
        generator.join(30)
    assert scaled["status"]["autoscaling"]["mode"] == "Auto"
    assert rollout(kube)["phase"] == "Paused" and rollout(kube)["step"] == 1

    def split_follows_the_total():
        total = body(kube)["spec"]["replicas"]
        current = sizes(kube)
        want_canary = math.ceil(total * 50 / 100)
        ok = current == {stable: total - want_canary, canary: want_canary}
        return ok and (total, current)

    total, split = wait_until(split_follows_the_total, timeout=30,
                              message=lambda: (body(kube)["spec"]["replicas"], sizes(kube), rollout(kube)))
    assert total >= 4 and sum(split.values()) == total
    assert rollout(kube)["phase"] == "Paused"  # scaling did not move the rollout on
    events = [e["reason"] for e in kube.list("v1", "events", "ai") if e["involvedObject"]["name"] == NAME]
    assert "Scaled" in events

    # Promote: the new revision takes the whole scaled total, the old one retires, nothing strands.
    kube.patch(api.API_VERSION, api.PLURAL, "ai", NAME, {"metadata": {"annotations": {"digitalworker.io/promote": "step"}}})
    done = wait_until(lambda: (r := rollout(kube)).get("phase") == "Completed" and r, timeout=60,
                      message=lambda: rollout(kube))
    assert done["revision"] == canary

    def only_the_new_revision():
        total = body(kube)["spec"]["replicas"]
        return sizes(kube) == {canary: total} and total

    final_total = wait_until(only_the_new_revision, timeout=30, message=lambda: (body(kube)["spec"], sizes(kube)))
    assert final_total >= 4
    pods = kube.list("v1", "pods", "ai", f"{api.LABEL_INSTANCE}={NAME}")
    wait_until(lambda: {p["metadata"]["labels"][api.LABEL_REVISION]
                        for p in kube.list("v1", "pods", "ai", f"{api.LABEL_INSTANCE}={NAME}")} == {canary},
               timeout=30, message=lambda: [p["metadata"]["name"] for p in pods])
