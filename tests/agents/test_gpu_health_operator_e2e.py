"""The operator itself acting on GPU faults: node agents (real processes, fake NVML, pod attribution
from a real gRPC kubelet) -> real Prometheus -> the kopf operator's periodic GPU health check -> the
emulated API: the DigitalWorker's replica on the XID-79 GPU is replaced, the node is tainted, status
and Events say so."""
from __future__ import annotations

import os
import time

import pytest
from agent_process import AgentProcess
from dwtest_support import example_worker
from kubelet_fake import FakeKubelet

pytestmark = pytest.mark.e2e
NAMESPACE = "team"
NODES = ("gpu-node-1", "gpu-node-2")


def fake_uuid(node_number: int, index: int) -> str:
    return f"GPU-fa4e{node_number:04x}-0000-4000-8000-{index:012d}"


def wait(predicate, timeout=40.0, message=""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out: {message}")


def test_operator_replaces_the_replica_on_a_faulty_gpu(tmp_path, prometheus):
    from digital_worker.operator import schema as api
    from digital_worker.operator.emulator import EmulatedCluster, SimulatedNode
    from digital_worker.operator.gpu_health import TAINT_KEY
    from digital_worker.operator.kube import KubeClient
    from digital_worker.operator.runner import OperatorThread

    body = example_worker("gpu-bot", NAMESPACE, replicas=4)
    body["spec"]["runtime"].update(tensorParallelSize=1, gpusPerReplica=1)

    with EmulatedCluster(nodes=[SimulatedNode(n, gpus=4) for n in NODES], namespaces=("default", NAMESPACE),
                         pod_startup_seconds=0.2) as cluster, \
            OperatorThread(str(cluster.operator_kubeconfig_path), resync_seconds=5,
                           env={"DW_PROMETHEUS_URL": prometheus.url}):
        kube = KubeClient.from_kubeconfig(str(cluster.kubeconfig_path))
        kube.create(body)

        def pods():
            return [p for p in kube.list("v1", "pods", NAMESPACE, f"{api.LABEL_INSTANCE}=gpu-bot")
                    if not p["metadata"].get("deletionTimestamp")]

        wait(lambda: (kube.get(api.API_VERSION, api.PLURAL, NAMESPACE, "gpu-bot").get("status") or {})
             .get("readyReplicas") == 4, message="4 replicas ready")
        sockets = {node: f"/tmp/dw-op-e2e-{os.getpid()}-{n}.sock" for n, node in enumerate(NODES, start=1)}
        kubelets = {node: FakeKubelet(path) for node, path in sockets.items()}
        for number, node in enumerate(NODES, start=1):
            on_node = sorted(p["metadata"]["name"] for p in pods() if p["spec"]["nodeName"] == node)
            kubelets[node].servicer.set_pods([(name, NAMESPACE, "sglang", "nvidia.com/gpu",
                                               [fake_uuid(number, index)]) for index, name in enumerate(on_node)])
        agents = [AgentProcess(tmp_path, fake_gpus=4, node_name=node, pod_resources_socket=sockets[node],
                               fake_config={"uuid_seed": number}) for number, node in enumerate(NODES, start=1)]
        for kubelet in kubelets.values():
            kubelet.__enter__()
        try:
            for agent in agents:
                agent.__enter__()
            prometheus.set_targets("gpu-agent", [f"127.0.0.1:{a.port}" for a in agents])
            prometheus.wait_for('DCGM_FI_DEV_GPU_UTIL{pod=~"gpu-bot-.*"}', timeout=30, predicate=lambda r: len(r) == 4)
            victim = sorted(p["metadata"]["name"] for p in pods() if p["spec"]["nodeName"] == "gpu-node-1")[0]
            agents[0].inject_xid(0, 79)

            wait(lambda: victim not in {p["metadata"]["name"] for p in pods()}, timeout=60,
                 message="the operator deletes the replica on the faulty GPU")
            node = kube.get("v1", "nodes", None, "gpu-node-1")
            assert [(t["key"], t["value"], t["effect"]) for t in node["spec"]["taints"]] == [(TAINT_KEY, "79", "NoSchedule")]
            assert not (kube.get("v1", "nodes", None, "gpu-node-2")["spec"] or {}).get("taints")
            status = wait(lambda: (kube.get(api.API_VERSION, api.PLURAL, NAMESPACE, "gpu-bot").get("status") or {})
                          .get("gpuHealth"), message="status.gpuHealth")
            assert victim in status["replacedPods"] and "gpu-node-1" in status["taintedNodes"]
            wait(lambda: (kube.get(api.API_VERSION, api.PLURAL, NAMESPACE, "gpu-bot").get("status") or {})
                 .get("readyReplicas") == 4, message="the Deployment brings the replica back")
            reasons = {e["reason"] for e in kube.list("v1", "events", NAMESPACE)}
            assert "GpuFaultReplaced" in reasons
        finally:
            for agent in agents:
                agent.__exit__(None, None, None)
            for kubelet in kubelets.values():
                kubelet.__exit__(None, None, None)
