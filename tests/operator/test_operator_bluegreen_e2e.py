"""Blue-green rollouts and GPU-capacity waits through the real operator on the emulated API, with
simulated SGLang replicas (warm-up requests really reach them). Each test gets its own small cluster,
so GPU capacity is exactly what the test says."""
from __future__ import annotations

import copy
import subprocess
import sys
import urllib.request

import pytest

from digital_worker.operator import schema as api
from digital_worker.operator.emulator import EmulatedCluster, SimulatedNode
from digital_worker.operator.kube import KubeClient
from digital_worker.operator.runner import OperatorThread
from digital_worker.operator.simpods import SimulatedSglangPods
from dwtest_support import example_worker
from operator_support import wait_until

NS = "ai"


@pytest.fixture
def small_cluster(request):
    """A cluster of `gpus_per_node` x 2 nodes (parametrize indirectly; default 8)."""
    gpus = getattr(request, "param", 8)
    with EmulatedCluster(runtime=SimulatedSglangPods(), pod_startup_seconds=0.2, namespaces=("default", NS),
                         nodes=[SimulatedNode(f"gpu-node-{i}", gpus=gpus) for i in (1, 2)]) as cluster, \
            OperatorThread(str(cluster.operator_kubeconfig_path), resync_seconds=2):
        yield cluster, KubeClient.from_kubeconfig(str(cluster.kubeconfig_path))


def make(kube, rollout: dict, replicas: int = 2) -> dict:
    body = example_worker("bot", NS, replicas=replicas, fallback=None, rollout=rollout)
    kube.create(body)
    return wait_until(lambda: (s := status(kube)).get("phase") == "Ready" and s, timeout=30, message="Ready")


def status(kube) -> dict:
    return (kube.get(api.API_VERSION, api.PLURAL, NS, "bot") or {}).get("status") or {}


def rollout_state(kube) -> dict:
    return status(kube).get("rollout") or {}


def deployments(kube) -> dict[str, dict]:
    return {d["metadata"]["labels"][api.LABEL_REVISION]: d
            for d in kube.list("apps/v1", "deployments", NS, f"{api.LABEL_INSTANCE}=bot")}


def selector(kube, service: str = "bot") -> dict:
    return ((kube.get("v1", "services", NS, service) or {}).get("spec") or {}).get("selector") or {}


def new_revision(kube, tag: str = "v2") -> None:
    kube.patch(api.API_VERSION, api.PLURAL, NS, "bot", {"spec": {"model": {"revision": tag}}})


def reasons(kube) -> list[str]:
    return [e["reason"] for e in kube.list("v1", "events", NS)]


def cli(cluster, *args):
    return subprocess.run([sys.executable, "-m", "digital_worker", *args, "-n", NS,
                           "--kubeconfig", str(cluster.kubeconfig_path)], capture_output=True, text=True, timeout=60)


def requests_served(kube, revision: str) -> float:
    """Requests the revision's simulated replicas finished, read from their /metrics."""
    total = 0.0
    for pod in kube.list("v1", "pods", NS, f"{api.LABEL_INSTANCE}=bot,{api.LABEL_REVISION}={revision}"):
        endpoint = (pod["metadata"].get("annotations") or {}).get(f"{api.GROUP}/sim-endpoint")
        if not endpoint:
            continue
        text = urllib.request.urlopen(endpoint + "/metrics", timeout=5).read().decode()
        total += sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                     if line.startswith(("sglang:num_requests_total", "sglang_num_requests_total")))
    return total


def gpus_in_use(kube) -> int:
    """GPUs the Deployments ask for (the emulator's pod simulator does not schedule by GPUs, so the
    operator's decisions are what is checked)."""
    return sum(int(d["spec"]["replicas"]) * int(c["resources"]["limits"]["nvidia.com/gpu"])
               for d in deployments(kube).values() for c in d["spec"]["template"]["spec"]["containers"])


def test_bluegreen_previews_warms_switches_and_keeps_the_old_revision_warm(small_cluster):
    cluster, kube = small_cluster
    first = make(kube, {"strategy": "BlueGreen", "blueGreen": {"warmupRequests": 3, "scaleDownDelaySeconds": 4}})
    old = first["currentRevision"]
    assert selector(kube) == {api.LABEL_INSTANCE: "bot", api.LABEL_REVISION: old}
    new_revision(kube)
    switched = wait_until(lambda: (r := rollout_state(kube)).get("active") not in (None, old) and r, timeout=40,
                          message=lambda: rollout_state(kube))
    new = switched["revision"]
    # The preview Service selected the new revision, the warm-up reached it before any user traffic.
    assert selector(kube, "bot-preview") == {api.LABEL_INSTANCE: "bot", api.LABEL_REVISION: new}
    assert requests_served(kube, new) >= 3
    assert selector(kube) == {api.LABEL_INSTANCE: "bot", api.LABEL_REVISION: new}
    # The old revision stays warm at full size for the scale-down delay.
    both = deployments(kube)
    assert both[old]["spec"]["replicas"] == 2 and both[new]["spec"]["replicas"] == 2
    done = wait_until(lambda: (s := status(kube)).get("phase") == "Ready" and s, timeout=30,
                      message=lambda: status(kube))
    assert done["stableRevision"] == new and done["rollout"]["phase"] == "Completed"
    assert list(deployments(kube)) == [new]
    assert kube.get("v1", "services", NS, "bot-preview") is None
    assert {"RolloutStarted", "ActiveSwitched", "RolloutCompleted"} <= set(reasons(kube))
    assert "DriftRepaired" not in reasons(kube), "a traffic switch is not drift"


def test_bluegreen_undo_during_the_delay_is_instant(small_cluster):
    _, kube = small_cluster
    first = make(kube, {"strategy": "BlueGreen", "blueGreen": {"scaleDownDelaySeconds": 600}})
    old = first["currentRevision"]
    new_revision(kube)
    wait_until(lambda: rollout_state(kube).get("active") not in (None, old), timeout=40,
               message=lambda: rollout_state(kube))
    new_revision(kube, "main")  # apply the previous spec again
    wait_until(lambda: selector(kube).get(api.LABEL_REVISION) == old, timeout=10, message=lambda: selector(kube))
    back = wait_until(lambda: list(deployments(kube)) == [old] and status(kube), timeout=20,
                      message=lambda: deployments(kube).keys())
    assert back["currentRevision"] == old and back["phase"] == "Ready"


def test_bluegreen_manual_gate_abort_retry_and_promote(small_cluster):
    cluster, kube = small_cluster
    first = make(kube, {"strategy": "BlueGreen", "blueGreen": {"autoPromotionEnabled": False,
                                                                "scaleDownDelaySeconds": 0}})
    old = first["currentRevision"]
    new_revision(kube)
    gate = wait_until(lambda: (r := rollout_state(kube)).get("phase") == "Paused" and r, timeout=40,
                      message=lambda: rollout_state(kube))
    assert "promote" in gate["message"] and selector(kube)[api.LABEL_REVISION] == old
    assert cli(cluster, "abort", "bot").returncode == 0
    aborted = wait_until(lambda: (s := status(kube)).get("phase") == "Degraded" and s, timeout=30,
                         message=lambda: status(kube))
    assert aborted["rollout"]["phase"] == "Aborted"
    wait_until(lambda: deployments(kube)[aborted["currentRevision"]]["spec"]["replicas"] == 0, message="new scaled down")
    assert selector(kube)[api.LABEL_REVISION] == old
    assert cli(cluster, "retry", "bot").returncode == 0
    wait_until(lambda: rollout_state(kube).get("phase") == "Paused", timeout=40, message=lambda: rollout_state(kube))
    assert cli(cluster, "promote", "bot").returncode == 0
    done = wait_until(lambda: (s := status(kube)).get("phase") == "Ready" and s, timeout=40,
                      message=lambda: status(kube))
    assert done["stableRevision"] == done["currentRevision"] != old
    assert selector(kube)[api.LABEL_REVISION] == done["currentRevision"]
    assert list(deployments(kube)) == [done["currentRevision"]]


@pytest.mark.parametrize("small_cluster", [4], indirect=True)
def test_bluegreen_waits_for_gpus_instead_of_squeezing_the_stable(small_cluster):
    _, kube = small_cluster
    make(kube, {"strategy": "BlueGreen", "blueGreen": {"scaleDownDelaySeconds": 0}}, replicas=3)  # 6 of 8 GPUs
    new_revision(kube)
    waiting = wait_until(lambda: (s := status(kube)).get("rollout", {}).get("waitingFor") and s, timeout=30,
                         message=lambda: status(kube))
    progressing = next(c for c in waiting["conditions"] if c["type"] == "Progressing")
    assert (progressing["status"], progressing["reason"]) == ("False", "InsufficientGPU")
    assert "InsufficientGPU" in reasons(kube)
    assert gpus_in_use(kube) <= 8 and deployments(kube)[waiting["stableRevision"]]["spec"]["replicas"] == 3


@pytest.mark.parametrize("small_cluster", [4], indirect=True)
def test_canary_waits_for_gpus_then_shifts_when_max_unavailable_allows(small_cluster):
    _, kube = small_cluster
    first = make(kube, {"strategy": "Canary", "canary": {"steps": [{"setWeight": 50}, {"pause": {}}],
                                                          "maxSurge": 1, "maxUnavailable": 0}}, replicas=4)
    new_revision(kube)
    wait_until(lambda: rollout_state(kube).get("waitingFor") == "InsufficientGPU", timeout=30,
               message=lambda: rollout_state(kube))
    assert deployments(kube)[first["currentRevision"]]["spec"]["replicas"] == 4
    kube.patch(api.API_VERSION, api.PLURAL, NS, "bot", {"spec": {"rollout": {"canary": {"maxUnavailable": 1}}}})
    peak = 0

    def at_half() -> dict | None:
        nonlocal peak
        peak = max(peak, gpus_in_use(kube))
        state = rollout_state(kube)
        return state if state.get("step") == 1 and state.get("phase") == "Paused" else None

    state = wait_until(at_half, timeout=60, message=lambda: rollout_state(kube))
    counts = {rev: d["spec"]["replicas"] for rev, d in deployments(kube).items()}
    assert counts == {first["currentRevision"]: 2, state["revision"]: 2} and state["weight"] == 50
    assert peak <= 8, "never more GPUs requested than the nodes have"


@pytest.mark.parametrize("phase", ["prePromotionAnalysis", "postPromotionAnalysis"])
def test_bluegreen_analysis_failure_keeps_or_puts_traffic_back_on_the_stable(phase, prometheus):
    """A preview answering half its requests with errors: judged before the switch (warm-up requests
    are its first traffic) it never gets the active Service; judged after, the active Service goes
    straight back to the still-warm stable. Real Prometheus, simulated replicas, real load."""
    import threading

    from operator_support import load, sync_targets_by_revision

    name = "bg-" + phase[:4].lower()
    runtime = SimulatedSglangPods()
    with EmulatedCluster(runtime=runtime, pod_startup_seconds=0.2, namespaces=("default", NS)) as cluster, \
            OperatorThread(str(cluster.operator_kubeconfig_path), resync_seconds=2, env={"DW_PROMETHEUS_URL": prometheus.url}):
        kube = KubeClient.from_kubeconfig(str(cluster.kubeconfig_path))
        body = example_worker(name, NS, replicas=2, fallback=None, rollout={"strategy": "BlueGreen", "blueGreen": {
            "warmupRequests": 40, "scaleDownDelaySeconds": 600,
            phase: {"intervalSeconds": 5, "windowSeconds": 20, "minRequests": 10, "maxErrorRate": 0.05,
                    "failureLimit": 1, "inconclusiveLimit": 6}}})
        kube.create(body)
        first = wait_until(lambda: (s := (kube.get(api.API_VERSION, api.PLURAL, NS, name) or {}).get("status") or {})
                           .get("phase") == "Ready" and s, timeout=30)
        old = first["currentRevision"]
        stop = threading.Event()
        threads = [threading.Thread(target=sync_targets_by_revision, args=(kube, prometheus, name, stop), daemon=True),
                   threading.Thread(target=load, args=(kube, name, 10.0, stop), daemon=True)]
        for thread in threads:
            thread.start()
        switched_seen = []
        try:
            spec = copy.deepcopy(body["spec"])
            spec["model"]["revision"] = "v2"
            from digital_worker.operator import render, spec as dw_spec

            runtime.inject(render.revision_hash(dw_spec.normalize_spec(spec)[0]), error_rate=0.5)
            kube.patch(api.API_VERSION, api.PLURAL, NS, name, {"spec": {"model": {"revision": "v2"}}})

            def aborted():
                state = ((kube.get(api.API_VERSION, api.PLURAL, NS, name) or {}).get("status") or {}).get("rollout") or {}
                if state.get("active") not in (None, old):
                    switched_seen.append(state["step"])
                return state if state.get("phase") == "Aborted" else None

            state = wait_until(aborted, timeout=90, interval=0.3, message=lambda: kube.get(
                api.API_VERSION, api.PLURAL, NS, name).get("status"))
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
        assert "analysis failed" in state["abortReason"] and state[phase]["lastVerdict"] == "Failed"
        assert state["active"] == old
        assert bool(switched_seen) == (phase == "postPromotionAnalysis"), switched_seen
        selector_now = kube.get("v1", "services", NS, name)["spec"]["selector"]
        assert selector_now[api.LABEL_REVISION] == old
        wait_until(lambda: {d["metadata"]["labels"][api.LABEL_REVISION]: d["spec"]["replicas"] for d in
                            kube.list("apps/v1", "deployments", NS, f"{api.LABEL_INSTANCE}={name}")}
                   == {old: 2, state["revision"]: 0}, message="new revision scaled down")
