"""GPU faults on the emulated cluster, end to end: the real node agent code (collector, XID watcher,
exposition, HTTP) runs for each emulated GPU node on the fake NVML, attributing GPUs to the emulated
pods; a fault injected on one replica's GPU makes the kopf operator's GPU health loop delete that
pod (the pod simulator starts a new one on a healthy GPU), taint the node and say so in
status.gpuHealth and Events. Once with the operator reading the agents directly (no Prometheus),
once through a real Prometheus scraping `scrape_targets()`."""
from __future__ import annotations

import pytest
from devfleet_support import wait_until, worker_status
from digital_worker.operator import schema as api
from digital_worker.operator.emulator import EmulatedCluster, SimulatedNode
from digital_worker.operator.gpu_health import TAINT_KEY
from digital_worker.operator.kube import KubeClient
from digital_worker.operator.simnodes import (
    allocate_gpus,
    gpu_request,
    start_simulated_node_agents,
)
from dwtest_support import example_worker

pytestmark = pytest.mark.e2e
NAMESPACE = "team"
NODES = ("gpu-node-1", "gpu-node-2")


def worker(name: str) -> dict:
    body = example_worker(name, NAMESPACE, replicas=4, fallback=None)  # one story at a time: no fallback's pods
    body["spec"]["runtime"].update(tensorParallelSize=1, gpusPerReplica=1)
    return body


def live_pods(kube: KubeClient, name: str) -> list[dict]:
    return [p for p in kube.list("v1", "pods", NAMESPACE, f"{api.LABEL_INSTANCE}={name}")
            if not p["metadata"].get("deletionTimestamp")]


def run_fault_story(prometheus=None, ecc: bool = False) -> None:
    from digital_worker.operator.runner import OperatorThread

    name = "gpu-bot"
    env = {"DW_PROMETHEUS_URL": prometheus.url if prometheus else ""}
    with EmulatedCluster(nodes=[SimulatedNode(n, gpus=4) for n in NODES], namespaces=("default", NAMESPACE),
                         pod_startup_seconds=0.2) as cluster, \
            OperatorThread(str(cluster.operator_kubeconfig_path), resync_seconds=5, env=env), \
            start_simulated_node_agents(cluster, interval=0.5) as agents:
        kube = KubeClient.from_kubeconfig(str(cluster.kubeconfig_path))
        kube.create(worker(name))
        wait_until(lambda: worker_status(kube, NAMESPACE, name).get("readyReplicas") == 4, message="4 replicas ready")
        assignments = wait_until(lambda: (a := agents.gpu_assignments()) and
                                 sum(1 for key in a if key[0] == NAMESPACE) == 4 and a, message="GPUs attributed")
        if prometheus is not None:
            for target in agents.scrape_targets():
                prometheus.set_targets(f"gpu-agent-{target['labels']['node']}", target["targets"], target["labels"])
            prometheus.wait_for(f'DCGM_FI_DEV_GPU_UTIL{{pod=~"{name}-.*"}}', timeout=30,
                                predicate=lambda result: len(result) == 4)

        victim = min(p["metadata"]["name"] for p in live_pods(kube, name) if p["spec"]["nodeName"] == NODES[0])
        fault = agents.inject_gpu_fault(f"{NAMESPACE}/{victim}", ecc=ecc)
        assert (fault.node, fault.pod, fault.gpu) == (NODES[0], victim, assignments[(NAMESPACE, victim)][1][0])

        wait_until(lambda: victim not in {p["metadata"]["name"] for p in live_pods(kube, name)}, timeout=45,
                   message="the operator deletes the replica on the faulty GPU")
        taints = (kube.get("v1", "nodes", None, NODES[0])["spec"] or {}).get("taints") or []
        assert [(t["key"], t["value"], t["effect"]) for t in taints] == \
            [(TAINT_KEY, "ecc-uncorrectable" if ecc else "79", "NoSchedule")]
        assert not (kube.get("v1", "nodes", None, NODES[1])["spec"] or {}).get("taints")
        health = wait_until(lambda: worker_status(kube, NAMESPACE, name).get("gpuHealth"), message="status.gpuHealth")
        assert victim in health["replacedPods"] and NODES[0] in health["taintedNodes"]
        wait_until(lambda: worker_status(kube, NAMESPACE, name).get("readyReplicas") == 4,
                   message="the Deployment brings the replica back")
        # The replacement holds a healthy GPU; the broken one is held by nobody any more.
        now = wait_until(lambda: (a := agents.gpu_assignments()) and (NAMESPACE, victim) not in a and
                         sum(1 for key in a if key[0] == NAMESPACE) == 4 and a, message="replacement attributed")
        assert all(not (node == fault.node and fault.gpu in gpus) for node, gpus in now.values())
        reasons = {e["reason"] for e in kube.list("v1", "events", NAMESPACE)}
        assert "GpuFaultReplaced" in reasons


def test_a_gpu_fault_replaces_the_replica_without_prometheus():
    run_fault_story()


def test_an_uncorrectable_ecc_fault_replaces_the_replica_through_prometheus(prometheus):
    run_fault_story(prometheus, ecc=True)


def test_the_device_manager_keeps_allocations_and_skips_unhealthy_gpus():
    pod = {"spec": {"containers": [{"name": "sglang", "resources": {"limits": {"nvidia.com/gpu": "2"}}},
                                   {"name": "sidecar"}]}}
    assert gpu_request(pod) == 2 and gpu_request({"spec": {}}) == 0
    first = allocate_gpus({}, {"a": 2, "b": 1}, 4)
    assert first == {"a": (0, 1), "b": (2,)}
    # "a" is gone, GPU 0 went bad: "c" gets the lowest free healthy GPUs, "b" keeps its own.
    second = allocate_gpus(first, {"b": 1, "c": 2}, 4, unhealthy={0})
    assert second == {"b": (2,), "c": (1, 3)}
    assert allocate_gpus(second, {"b": 1, "c": 2, "d": 1}, 4, unhealthy={0}) == second  # no GPU left for "d"
