"""GPU health end to end: node agents (real processes, fake NVML) -> real Prometheus -> fetch_gpu_health
-> decide -> the emulated Kubernetes API: the pod on the XID-79 GPU is replaced, its node tainted,
Events recorded."""
from __future__ import annotations

import os
import time

import pytest
from agent_process import AgentProcess
from kubelet_fake import FakeKubelet

from digital_worker.operator.gpu_health import (
    TAINT_KEY, GpuHealthContext, GpuHealthState, PodInfo, apply_gpu_health_decision, decide, fetch_gpu_health)

pytestmark = pytest.mark.e2e
NAMESPACE = "team"
NODES = ("gpu-node-1", "gpu-node-2")
GPUS_PER_NODE = 4


def fake_uuid(node_number: int, index: int) -> str:
    return f"GPU-fa4e{node_number:04x}-0000-4000-8000-{index:012d}"


def test_fetch_gpu_health_from_prometheus_scraping_the_agent(tmp_path, prometheus):
    with AgentProcess(tmp_path, fake_gpus=2, node_name="gpu-node-9") as agent:
        prometheus.set_targets("gpu-agent", [f"127.0.0.1:{agent.port}"])
        prometheus.wait_for("digital_worker_gpu_healthy", timeout=30, predicate=lambda r: len(r) == 2)
        samples = fetch_gpu_health(prometheus.url)
        assert {(s.node, s.gpu, s.xid, s.healthy) for s in samples} == {("gpu-node-9", "0", 0, True),
                                                                       ("gpu-node-9", "1", 0, True)}
        agent.inject_xid(1, 48)
        prometheus.wait_for("DCGM_FI_DEV_XID_ERRORS == 48", timeout=30)
        prometheus.wait_for("digital_worker_gpu_healthy == 0", timeout=30)
        faulty = [s for s in fetch_gpu_health(prometheus.url) if s.fault()]
        assert [(s.gpu, s.uuid, s.fault()) for s in faulty] == [("1", fake_uuid(0, 1), "48")]


def test_fetch_gpu_health_reports_an_unreachable_prometheus():
    from agent_process import free_port
    from digital_worker.operator.gpu_health import GpuHealthUnavailable

    with pytest.raises(GpuHealthUnavailable):
        fetch_gpu_health(f"http://127.0.0.1:{free_port()}", timeout=2)


def _ready(pod) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in (pod.status.conditions or []))


def test_injected_xid_replaces_the_pod_taints_the_node_and_records_events(tmp_path, prometheus):
    kubernetes = pytest.importorskip("kubernetes")
    from digital_worker.operator.emulator import EmulatedCluster, SimulatedNode

    with EmulatedCluster(nodes=[SimulatedNode(name, gpus=GPUS_PER_NODE) for name in NODES],
                         namespaces=("default", NAMESPACE), pod_startup_seconds=0.2) as cluster:
        api_client = kubernetes.config.new_client_from_config(config_file=str(cluster.kubeconfig_path))
        core = kubernetes.client.CoreV1Api(api_client)
        apps = kubernetes.client.AppsV1Api(api_client)
        labels = {"app": "worker"}
        apps.create_namespaced_deployment(NAMESPACE, {
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "worker", "namespace": NAMESPACE},
            "spec": {"replicas": 4, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels},
                                  "spec": {"containers": [{"name": "sglang", "image": "sglang:test",
                                                           "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}}},
        })

        def worker_pods():
            return [p for p in core.list_namespaced_pod(NAMESPACE, label_selector="app=worker").items
                    if not p.metadata.deletion_timestamp]

        def pod_infos():
            return tuple(PodInfo(p.metadata.name, p.spec.node_name, _ready(p)) for p in worker_pods())

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and sum(_ready(p) for p in worker_pods()) < 4:
            time.sleep(0.2)
        assert sum(_ready(p) for p in worker_pods()) == 4

        sockets = {node: f"/tmp/dw-e2e-{os.getpid()}-{n}.sock" for n, node in enumerate(NODES, start=1)}
        kubelets = {node: FakeKubelet(path) for node, path in sockets.items()}

        def sync_kubelets():
            """Each node's kubelet hands its GPUs to the worker pods scheduled there, in name order."""
            for number, node in enumerate(NODES, start=1):
                on_node = sorted(p.metadata.name for p in worker_pods() if p.spec.node_name == node)
                kubelets[node].servicer.set_pods([(name, NAMESPACE, "sglang", "nvidia.com/gpu",
                                                   [fake_uuid(number, index)]) for index, name in enumerate(on_node)])

        sync_kubelets()
        agents = [AgentProcess(tmp_path, fake_gpus=GPUS_PER_NODE, node_name=node, pod_resources_socket=sockets[node],
                               fake_config={"uuid_seed": number}) for number, node in enumerate(NODES, start=1)]
        for kubelet in kubelets.values():
            kubelet.__enter__()
        try:
            for agent in agents:
                agent.__enter__()
            prometheus.set_targets("gpu-agent", [f"127.0.0.1:{a.port}" for a in agents])
            prometheus.wait_for('DCGM_FI_DEV_GPU_UTIL{pod=~"worker-.*"}', timeout=30,
                                predicate=lambda r: len(r) == 4)

            victim = sorted(p.metadata.name for p in worker_pods() if p.spec.node_name == "gpu-node-1")[0]
            agents[0].inject_xid(0, 79)  # GPU 0 of gpu-node-1 belongs to `victim`
            prometheus.wait_for("DCGM_FI_DEV_XID_ERRORS == 79", timeout=30)

            # The operator's reconcile, as the lead wires it: fetch, decide, apply, keep the state.
            state = GpuHealthState()
            deleted: list[str] = []
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not deleted:
                tainted = frozenset(n.metadata.name for n in core.list_node().items
                                    if any(t.key == TAINT_KEY for t in (n.spec.taints or [])))
                decision, state = decide(GpuHealthContext(
                    namespace=NAMESPACE, pods=pod_infos(), samples=tuple(fetch_gpu_health(prometheus.url)),
                    tainted_nodes=tainted, replicas=4, max_unavailable_share=0.25, state=state))
                apply_gpu_health_decision(core, NAMESPACE, decision)
                deleted += [r.pod for r in decision.delete_pods]
                time.sleep(0.5)
            assert deleted == [victim]

            node = core.read_node("gpu-node-1")
            assert [(t.key, t.value, t.effect) for t in node.spec.taints] == [(TAINT_KEY, "79", "NoSchedule")]
            assert not core.read_node("gpu-node-2").spec.taints

            # The Deployment brings the replica back (the pod simulator plays the controller).
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                names = {p.metadata.name for p in worker_pods() if _ready(p)}
                if len(names) == 4 and victim not in names:
                    break
                time.sleep(0.2)
            assert len(names) == 4 and victim not in names

            pod_events = [e for e in core.list_namespaced_event(NAMESPACE).items if e.reason == "GpuFaultReplaced"]
            assert [(e.involved_object.kind, e.involved_object.name) for e in pod_events] == [("Pod", victim)]
            assert "XID 79" in pod_events[0].message
            node_events = [e for e in core.list_namespaced_event("default").items if e.reason == "GpuUnhealthy"]
            assert [(e.involved_object.kind, e.involved_object.name) for e in node_events] == [("Node", "gpu-node-1")]

            # Another reconcile with the same samples changes nothing: no second delete, taint or Event.
            decision, state = decide(GpuHealthContext(
                namespace=NAMESPACE, pods=pod_infos(), samples=tuple(fetch_gpu_health(prometheus.url)),
                tainted_nodes=frozenset({"gpu-node-1"}), replicas=4, state=state))
            assert decision.idle
        finally:
            for agent in agents:
                if agent.process is not None:
                    agent.__exit__()
            for kubelet in kubelets.values():
                kubelet.__exit__()
            api_client.close()


def test_fetch_gpu_load_from_attributed_agent(tmp_path, prometheus):
    from digital_worker.operator.gpu_health import fetch_gpu_load

    socket_path = f"/tmp/dw-load-{os.getpid()}.sock"
    with FakeKubelet(socket_path) as kubelet:
        kubelet.servicer.set_pods([("worker-a", NAMESPACE, "sglang", "nvidia.com/gpu", [fake_uuid(0, 0)]),
                                   ("worker-b", NAMESPACE, "sglang", "nvidia.com/gpu", [fake_uuid(0, 1)])])
        with AgentProcess(tmp_path, fake_gpus=3, pod_resources_socket=socket_path,
                          fake_config={"gpu": {"0": {"gpu_util": 90}, "1": {"gpu_util": 30}}}) as agent:
            prometheus.set_targets("gpu-agent", [f"127.0.0.1:{agent.port}"])
            prometheus.wait_for('DCGM_FI_DEV_GPU_UTIL{pod=~"worker-.*"}', timeout=30, predicate=lambda r: len(r) == 2)
            load = fetch_gpu_load(prometheus.url, NAMESPACE, ["worker-a", "worker-b"])
    assert load.gpus == 2 and load.mean_utilisation == 0.6
    assert load.max_memory_used_fraction == round(60000 / 81559, 4)


def test_apply_keeps_other_taints_and_tolerates_gone_pods():
    kubernetes = pytest.importorskip("kubernetes")
    from digital_worker.operator.emulator import EmulatedCluster, SimulatedNode
    from digital_worker.operator.gpu_health import GpuHealthDecision, GpuHealthEvent, NodeTaint, PodReplacement

    with EmulatedCluster(nodes=[SimulatedNode("gpu-node-1")], namespaces=("default", NAMESPACE),
                         pod_simulator=False) as cluster:
        api_client = kubernetes.config.new_client_from_config(config_file=str(cluster.kubeconfig_path))
        core = kubernetes.client.CoreV1Api(api_client)
        try:
            core.patch_node("gpu-node-1", {"spec": {"taints": [
                {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]}})
            first = GpuHealthDecision(
                taint_nodes=(NodeTaint("gpu-node-1", "79"),),
                delete_pods=(PodReplacement("already-gone", "gpu-node-1", "79", "0", "GPU-0"),),
                events=(GpuHealthEvent("Node", "gpu-node-1", "GpuUnhealthy", "GPU 0 reported fatal XID 79"),))
            apply_gpu_health_decision(core, NAMESPACE, first)
            # A later fault with another XID on the same node replaces our taint's value, never duplicates it.
            apply_gpu_health_decision(core, NAMESPACE, GpuHealthDecision(taint_nodes=(NodeTaint("gpu-node-1", "48"),)))
            taints = [(t.key, t.value, t.effect) for t in core.read_node("gpu-node-1").spec.taints]
            assert taints == [("nvidia.com/gpu", "present", "NoSchedule"), (TAINT_KEY, "48", "NoSchedule")]
            events = core.list_namespaced_event("default").items
            assert [(e.reason, e.type, e.source.component) for e in events] == [
                ("GpuUnhealthy", "Warning", "digital-worker-operator")]
        finally:
            api_client.close()
