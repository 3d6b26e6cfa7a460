"""GPU health without Prometheus, on a real node agent page: the agent's collector (fake NVML, one
module instance per simulated node) renders its exposition, the operator folds it into the same
samples Prometheus' answer gives, and `decide` replaces the pod on the broken GPU."""
from __future__ import annotations

import pytest
from digital_worker.agents.collector import GpuOwner
from digital_worker.agents.exposition import render
from digital_worker.operator import gpu_health
from digital_worker.operator.simnodes import _SimNode
from dwtest_support import free_port


def agent_page(sim: _SimNode, owners: dict) -> str:
    sim.agent.collector.collect()
    return render(sim.agent.collector.families(owners)).decode()


def test_an_agent_page_folds_like_prometheus_and_drives_the_same_decision():
    sim = _SimNode("gpu-node-1", gpus=2, seed=1, interval=1.0)
    other = _SimNode("gpu-node-2", gpus=2, seed=2, interval=1.0)
    collector = sim.agent.collector
    assert collector.start() and other.agent.collector.start()
    assert sim.uuid(0) != other.uuid(0)  # each simulated node has GPUs of its own
    owners = {sim.uuid(0): (GpuOwner("bot-a", "team", "sglang"),)}

    healthy = gpu_health.samples_from_exposition(agent_page(sim, owners), {"node": "gpu-node-1"})
    assert [(s.node, s.gpu, s.pod, s.namespace, s.fault()) for s in healthy] == [
        ("gpu-node-1", "0", "bot-a", "team", None), ("gpu-node-1", "1", None, None, None)]

    collector.record_xid(sim.uuid(0), 79)
    sim.nvml.fake_set(1, ecc_dbe_volatile=3)
    broken = {s.gpu: s for s in gpu_health.samples_from_exposition(agent_page(sim, owners), {"node": "gpu-node-1"})}
    assert broken["0"].xid == 79 and broken["0"].fault() == "79"
    assert broken["1"].uncorrectable_ecc == 3 and broken["1"].fault() == "ecc-uncorrectable"

    context = gpu_health.GpuHealthContext(
        namespace="team", pods=(gpu_health.PodInfo("bot-a", "gpu-node-1", True),
                                gpu_health.PodInfo("bot-b", "gpu-node-2", True)),
        samples=tuple(broken.values()), replicas=2, max_unavailable_share=0.5)
    decision, _ = gpu_health.decide(context)
    assert [r.pod for r in decision.delete_pods] == ["bot-a"]
    assert [(t.node, t.value) for t in decision.taint_nodes] == [("gpu-node-1", "79")]


def test_agents_are_found_on_their_nodes_and_unreachable_ones_are_unavailable():
    nodes = [{"metadata": {"name": "n1", "annotations": {gpu_health.AGENT_ENDPOINT_ANNOTATION: "http://127.0.0.1:1/"}}},
             {"metadata": {"name": "n2"}}]
    assert gpu_health.agent_endpoints(nodes) == [("http://127.0.0.1:1/metrics", {"node": "n1"})]
    assert gpu_health.fetch_gpu_health_from_agents([]) == []
    with pytest.raises(gpu_health.GpuHealthUnavailable):
        gpu_health.fetch_gpu_health_from_agents([(f"http://127.0.0.1:{free_port()}/metrics", {"node": "n1"})],
                                                timeout=1)
