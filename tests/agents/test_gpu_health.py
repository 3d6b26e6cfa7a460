"""Pure GPU health decisions: which pods to replace, which nodes to taint, what is held back."""
from __future__ import annotations

import dataclasses

import pytest

from digital_worker.operator.gpu_health import (
    FATAL_XIDS, GpuHealthContext, GpuHealthSample, GpuHealthState, PodInfo, decide, max_unavailable,
    samples_from_query_result)

NS = "team"


def sample(node, gpu, pod=None, **fields) -> GpuHealthSample:
    return GpuHealthSample(node=node, gpu=str(gpu), uuid=f"GPU-{node}-{gpu}", pod=pod,
                           namespace=NS if pod else None, **fields)


def pods(*specs) -> tuple[PodInfo, ...]:
    return tuple(PodInfo(name, node, ready) for name, node, ready in specs)


def context(pod_list, samples, replicas=None, **kwargs) -> GpuHealthContext:
    return GpuHealthContext(namespace=NS, pods=pod_list, samples=tuple(samples),
                            replicas=len(pod_list) if replicas is None else replicas, **kwargs)


def test_healthy_gpus_decide_nothing():
    decision, state = decide(context(pods(("w-1", "n1", True)), [sample("n1", 0, "w-1"), sample("n1", 1)]))
    assert decision.idle and not decision.held_back
    assert state == GpuHealthState()


@pytest.mark.parametrize("fields,fault", [
    ({"xid": 79}, "79"), ({"xid": 48}, "48"), ({"xid": 94}, "94"),
    ({"uncorrectable_ecc": 1.0}, "ecc-uncorrectable"), ({"remap_failure": True}, "row-remap-failure"),
    ({"healthy": False}, "gpu-unhealthy"),
])
def test_each_fault_replaces_the_pod_and_taints_the_node(fields, fault):
    pod_list = pods(("w-1", "n1", True), ("w-2", "n2", True), ("w-3", "n3", True), ("w-4", "n4", True))
    decision, state = decide(context(pod_list, [sample("n2", 3, "w-2", **fields), sample("n1", 0, "w-1")]))
    assert [(r.pod, r.node, r.fault, r.gpu) for r in decision.delete_pods] == [("w-2", "n2", fault, "3")]
    assert [t.as_dict() for t in decision.taint_nodes] == [
        {"key": "digitalworker.io/gpu-unhealthy", "value": fault, "effect": "NoSchedule"}]
    assert decision.taint_nodes[0].node == "n2"
    assert {(e.involved_kind, e.involved_name, e.reason) for e in decision.events} == {
        ("Node", "n2", "GpuUnhealthy"), ("Pod", "w-2", "GpuFaultReplaced")}
    assert all(e.type == "Warning" for e in decision.events)
    assert state.replaced_pods == {"w-2"}


def test_non_fatal_xid_is_left_alone():
    assert 13 not in FATAL_XIDS and 31 not in FATAL_XIDS
    decision, _ = decide(context(pods(("w-1", "n1", True)), [sample("n1", 0, "w-1", xid=13, healthy=True)]))
    assert decision.idle


def test_the_event_names_the_xid_and_gpu():
    decision, _ = decide(context(pods(("w-1", "n1", True), ("w-2", "n1", True)), [sample("n1", 6, "w-1", xid=79)]))
    pod_event = next(e for e in decision.events if e.involved_kind == "Pod")
    assert "XID 79" in pod_event.message and "GPU 6" in pod_event.message and "GPU-n1-6" in pod_event.message
    node_event = next(e for e in decision.events if e.involved_kind == "Node")
    assert "digitalworker.io/gpu-unhealthy=79:NoSchedule" in node_event.message


def test_already_tainted_node_is_not_tainted_again_but_its_pod_is_replaced():
    decision, _ = decide(context(pods(("w-1", "n1", True), ("w-2", "n2", True)),
                                 [sample("n1", 0, "w-1", xid=79)], tainted_nodes=frozenset({"n1"})))
    assert decision.taint_nodes == ()
    assert [r.pod for r in decision.delete_pods] == ["w-1"]


def test_fault_without_pod_attribution_taints_but_deletes_nothing():
    # No PodResources socket on that node: we cannot know whose GPU it is.
    decision, _ = decide(context(pods(("w-1", "n1", True)), [sample("n1", 2, xid=79)]))
    assert [t.node for t in decision.taint_nodes] == ["n1"] and decision.delete_pods == ()


def test_pods_of_other_workers_or_namespaces_are_never_touched():
    other_ns = GpuHealthSample(node="n1", gpu="0", uuid="u0", pod="w-1", namespace="elsewhere", xid=79)
    stranger = sample("n1", 1, "not-ours", xid=79)
    decision, _ = decide(context(pods(("w-1", "n1", True), ("w-2", "n2", True)), [other_ns, stranger]))
    assert decision.delete_pods == ()
    assert [t.node for t in decision.taint_nodes] == ["n1"]  # the node is still bad for everyone


def test_one_taint_per_node_from_its_first_faulty_gpu():
    decision, _ = decide(context(pods(("w-1", "n1", True), ("w-2", "n1", True), ("w-3", "n2", True),
                                      ("w-4", "n3", True), ("w-5", "n4", True), ("w-6", "n5", True),
                                      ("w-7", "n6", True), ("w-8", "n7", True)),
                                 [sample("n1", 7, "w-2", xid=94), sample("n1", 2, "w-1", xid=79)]))
    assert [(t.node, t.value) for t in decision.taint_nodes] == [("n1", "79")]
    assert sorted(r.pod for r in decision.delete_pods) == ["w-1", "w-2"]


def test_a_flood_of_faults_never_drains_more_than_the_share():
    # 8 replicas on 8 nodes, every GPU reports XID 79 at once; 25% -> at most 2 down.
    pod_list = pods(*[(f"w-{i}", f"n{i}", True) for i in range(8)])
    samples = [sample(f"n{i}", 0, f"w-{i}", xid=79) for i in range(8)]
    decision, state = decide(context(pod_list, samples, max_unavailable_share=0.25))
    assert decision.max_unavailable == 2
    assert [r.pod for r in decision.delete_pods] == ["w-0", "w-1"]
    assert sorted(r.pod for r in decision.held_back) == [f"w-{i}" for i in range(2, 8)]
    assert len(decision.taint_nodes) == 8  # tainting evicts nothing: every bad node is tainted
    held_events = [e for e in decision.events if e.reason == "GpuFaultReplacementHeld"]
    assert len(held_events) == 6 and "at most 2 of 8" in held_events[0].message

    # Next reconcile: w-0/w-1 terminating (still listed), replacements not ready yet: nothing more.
    pod_list2 = pod_list + pods(("w-new-a", "n9", False), ("w-new-b", "n9", False))
    decision2, state2 = decide(context(pod_list2, samples, replicas=8, state=state,
                                       tainted_nodes=frozenset(f"n{i}" for i in range(8))))
    assert decision2.delete_pods == () and len(decision2.held_back) == 6
    assert decision2.events == ()  # held-back pods were already announced
    assert state2.replaced_pods == {"w-0", "w-1"}

    # Replacements ready, old pods gone: the next two go.
    pod_list3 = pods(*[(f"w-{i}", f"n{i}", True) for i in range(2, 8)], ("w-new-a", "n9", True),
                     ("w-new-b", "n9", True))
    decision3, state3 = decide(context(pod_list3, samples, replicas=8, state=state2,
                                       tainted_nodes=frozenset(f"n{i}" for i in range(8))))
    assert [r.pod for r in decision3.delete_pods] == ["w-2", "w-3"]
    assert state3.replaced_pods == {"w-2", "w-3"}  # gone pods pruned


def test_a_pod_that_is_already_down_is_replaced_without_using_the_budget():
    pod_list = pods(("w-0", "n0", False), ("w-1", "n1", True), ("w-2", "n2", True), ("w-3", "n3", True))
    samples = [sample("n0", 0, "w-0", xid=79), sample("n1", 0, "w-1", xid=79), sample("n2", 0, "w-2", xid=79)]
    decision, _ = decide(context(pod_list, samples, max_unavailable_share=0.25))
    # Budget 1, already one down -> no ready pod may go, but the dead one is replaced.
    assert [r.pod for r in decision.delete_pods] == ["w-0"]
    assert sorted(r.pod for r in decision.held_back) == ["w-1", "w-2"]


def test_missing_replicas_count_against_the_budget():
    pod_list = pods(("w-1", "n1", True), ("w-2", "n2", True), ("w-3", "n3", True))
    decision, _ = decide(context(pod_list, [sample("n1", 0, "w-1", xid=79)], replicas=4,
                                 max_unavailable_share=0.25))
    assert decision.delete_pods == () and [r.pod for r in decision.held_back] == ["w-1"]


def test_a_single_replica_on_a_dead_gpu_is_still_replaced():
    assert max_unavailable(1, 0.25) == 1 and max_unavailable(8, 0.25) == 2 and max_unavailable(10, 0.5) == 5
    assert max_unavailable(3, 0.0) == 1
    decision, _ = decide(context(pods(("w-1", "n1", True)), [sample("n1", 0, "w-1", xid=79)]))
    assert [r.pod for r in decision.delete_pods] == ["w-1"]


def test_decisions_are_frozen():
    decision, state = decide(context(pods(("w-1", "n1", True)), [sample("n1", 0, "w-1", xid=79)]))
    with pytest.raises(dataclasses.FrozenInstanceError):
        decision.delete_pods = ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.replaced_pods = frozenset()


def test_query_result_folds_into_one_sample_per_gpu():
    def series(name, value, **labels):
        return {"metric": {"__name__": name, **labels}, "value": [1700000000.0, str(value)]}

    base = {"Hostname": "n1", "gpu": "3", "UUID": "GPU-3", "pod": "w-1", "namespace": NS}
    result = [
        series("DCGM_FI_DEV_XID_ERRORS", 79, **base),
        series("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", 0, **base),
        series("DCGM_FI_DEV_ROW_REMAP_FAILURE", 0, **base),
        series("digital_worker_gpu_healthy", 0, **base),
        # Scraped without honorLabels: the owner's labels come as exported_*.
        series("DCGM_FI_DEV_XID_ERRORS", 0, Hostname="n2", gpu="0", UUID="GPU-0", pod="agent-xyz",
               namespace="gpu-system", exported_pod="w-2", exported_namespace=NS),
        series("digital_worker_gpu_healthy", "NaN", Hostname="n2", gpu="0", UUID="GPU-0"),
    ]
    samples = samples_from_query_result(result)
    by_uuid = {s.uuid: s for s in samples}
    assert by_uuid["GPU-3"] == GpuHealthSample(node="n1", gpu="3", uuid="GPU-3", pod="w-1", namespace=NS, xid=79,
                                               uncorrectable_ecc=0.0, remap_failure=False, healthy=False)
    assert by_uuid["GPU-0"].pod == "w-2" and by_uuid["GPU-0"].namespace == NS and by_uuid["GPU-0"].healthy is None
    assert by_uuid["GPU-3"].fault() == "79" and by_uuid["GPU-0"].fault() is None


def test_gpu_load_of_a_workers_pods():
    from digital_worker.operator.gpu_health import gpu_load_from_query_result

    def series(name, value, pod, gpu, namespace=NS, node="n1"):
        return {"metric": {"__name__": name, "pod": pod, "namespace": namespace, "gpu": gpu, "UUID": f"{node}-{gpu}",
                           "Hostname": node}, "value": [0, str(value)]}

    result = [
        series("DCGM_FI_DEV_GPU_UTIL", 80, "w-1", "0"), series("DCGM_FI_DEV_FB_USED", 60000, "w-1", "0"),
        series("DCGM_FI_DEV_FB_FREE", 20000, "w-1", "0"),
        series("DCGM_FI_DEV_GPU_UTIL", 40, "w-2", "1"), series("DCGM_FI_DEV_FB_USED", 40000, "w-2", "1"),
        series("DCGM_FI_DEV_FB_FREE", 40000, "w-2", "1"),
        series("DCGM_FI_DEV_GPU_UTIL", 100, "someone-else", "2"),
        series("DCGM_FI_DEV_GPU_UTIL", 100, "w-1", "3", namespace="other"),
    ]
    load = gpu_load_from_query_result(result, NS, ["w-1", "w-2"])
    assert (load.gpus, load.mean_utilisation, load.max_memory_used_fraction) == (2, 0.6, 0.75)
    assert gpu_load_from_query_result(result, NS, ["w-9"]) is None


def test_terminating_pods_are_neither_deleted_again_nor_counted_available():
    # After an operator restart the state is empty, but the API still shows the pod terminating.
    pod_list = (PodInfo("w-0", "n0", True, terminating=True),) + pods(("w-1", "n1", True), ("w-2", "n2", True),
                                                                      ("w-3", "n3", True))
    samples = [sample("n0", 0, "w-0", xid=79), sample("n1", 0, "w-1", xid=79)]
    decision, state = decide(context(pod_list, samples, replicas=4, max_unavailable_share=0.25,
                                     tainted_nodes=frozenset({"n0"})))
    assert decision.delete_pods == ()  # w-0 is going already and uses the one-replica budget
    assert [r.pod for r in decision.held_back] == ["w-1"]
    assert state.replaced_pods == {"w-0"}
