"""GPU capacity from node and pod lists, and the shift-or-wait planner (pure)."""
from __future__ import annotations

import pytest

from digital_worker.operator.capacity import (
    REASON_FITS,
    REASON_INSUFFICIENT_GPU,
    REASON_NOTHING_TO_ADD,
    REASON_SHIFTING,
    GpuCapacity,
    GpuNode,
    Toleration,
    gpu_capacity,
    parse_gpu_quantity,
    plan_capacity,
    pod_gpu_request,
)
from digital_worker.operator.traffic import ReplicaCounts, ReplicaRatioRouter

H100 = "nvidia-h100-80gb"


def node(name, gpus, gpu_type=H100, label="digitalworker.io/gpu-type", taints=(), unschedulable=False,
         ready=True, labels=None):
    return {
        "metadata": {"name": name, "labels": {label: gpu_type, **(labels or {})}},
        "spec": {"taints": list(taints), **({"unschedulable": True} if unschedulable else {})},
        "status": {
            "allocatable": {"cpu": "64", "nvidia.com/gpu": str(gpus)},
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def pod(node_name, gpus, phase="Running", init_gpus=None, request_style="limits"):
    resources = {request_style: {"nvidia.com/gpu": gpus}} if gpus is not None else {}
    spec = {"nodeName": node_name, "containers": [{"name": "sglang", "resources": resources},
                                                  {"name": "sidecar", "resources": {"limits": {"cpu": "1"}}}]}
    if init_gpus is not None:
        spec["initContainers"] = [{"name": "fetch", "resources": {"limits": {"nvidia.com/gpu": init_gpus}}}]
    return {"metadata": {"name": f"p-{node_name}-{gpus}"}, "spec": spec, "status": {"phase": phase}}


# ---------------------------------------------------------------- counting


def test_allocatable_minus_requested_on_matching_nodes():
    nodes = [node("a", 8), node("b", 8, label="nvidia.com/gpu.product"), node("c", 4, gpu_type="nvidia-l4")]
    pods = [pod("a", 2), pod("a", 2, request_style="requests"), pod("b", 4), pod("c", 4)]
    capacity = gpu_capacity(nodes, pods, gpu_type=H100)
    assert [(n.name, n.allocatable, n.requested, n.free) for n in capacity.nodes] == [("a", 8, 4, 4), ("b", 8, 4, 4)]
    assert capacity.free_gpus == 8 and capacity.largest_free_block == 4
    # Any GPU type: the L4 node counts too (and it is full).
    assert gpu_capacity(nodes, pods).free_gpus == 8 and len(gpu_capacity(nodes, pods).nodes) == 3


def test_terminated_pods_release_gpus_but_pending_and_terminating_ones_hold_them():
    terminating = pod("a", 2)
    terminating["metadata"]["deletionTimestamp"] = "2026-11-22T01:00:00Z"
    pods = [pod("a", 2, "Succeeded"), pod("a", 2, "Failed"), pod("a", 1, "Pending"), terminating,
            pod(None, 4, "Pending"), pod("elsewhere", 4)]
    capacity = gpu_capacity([node("a", 8)], pods)
    assert capacity.nodes[0].requested == 3 and capacity.free_gpus == 5


def test_init_containers_count_as_the_scheduler_counts_them():
    assert pod_gpu_request(pod("a", 1, init_gpus=4)) == 4
    assert pod_gpu_request(pod("a", 2, init_gpus=1)) == 2
    assert pod_gpu_request(pod("a", None)) == 0


def test_nodes_that_cannot_take_pods_are_excluded():
    gpu_taint = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
    nodes = [
        node("tainted", 8, taints=[gpu_taint]),
        node("noexecute", 8, taints=[{"key": "maintenance", "effect": "NoExecute"}]),
        node("prefer", 8, taints=[{"key": "spot", "effect": "PreferNoSchedule"}]),
        node("cordoned", 8, unschedulable=True),
        node("notready", 8, ready=False),
    ]
    capacity = gpu_capacity(nodes, [])
    excluded = {n.name: n.excluded for n in capacity.nodes}
    assert excluded["prefer"] == ""
    assert "nvidia.com/gpu=present:NoSchedule" in excluded["tainted"]
    assert "NoExecute" in excluded["noexecute"]
    assert "cordoned" in excluded["cordoned"] and excluded["notready"] == "not Ready"
    assert capacity.free_gpus == 8 and [n.name for n in capacity.usable_nodes] == ["prefer"]
    # Tolerating the GPU taint (as GPU workloads usually do) opens that node again.
    tolerated = gpu_capacity(nodes, [], tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists",
                                                      "effect": "NoSchedule"}])
    assert tolerated.free_gpus == 16


@pytest.mark.parametrize(
    ("toleration", "tolerates"),
    [
        (Toleration("nvidia.com/gpu", "Exists"), True),
        (Toleration(None, "Exists"), True),  # tolerates everything
        (Toleration("nvidia.com/gpu", "Equal", "present", "NoSchedule"), True),
        (Toleration("nvidia.com/gpu", "Equal", "absent", "NoSchedule"), False),
        (Toleration("nvidia.com/gpu", "Exists", effect="NoExecute"), False),
        (Toleration("other", "Exists"), False),
    ],
)
def test_toleration_matching(toleration, tolerates):
    assert toleration.tolerates({"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}) is tolerates


def test_node_selector_and_client_style_snake_case_dicts():
    nodes = [node("a", 8, labels={"zone": "x"}), node("b", 8, labels={"zone": "y"})]
    assert [n.name for n in gpu_capacity(nodes, [], node_selector={"zone": "y"}).nodes] == ["b"]
    # kubernetes-client `to_dict()` style: snake_case keys in spec/status.
    client_pod = {"metadata": {"name": "p"}, "spec": {"node_name": "a", "containers": [
        {"resources": {"limits": {"nvidia.com/gpu": "2"}}}], "init_containers": None}, "status": {"phase": "Running"}}
    assert gpu_capacity(nodes, [client_pod]).nodes[0].requested == 2


@pytest.mark.parametrize(("value", "gpus"), [("4", 4), (4, 4), ("0", 0), (None, 0), ("bad", 0), ("1k", 1000), (-1, 0)])
def test_parse_gpu_quantity(value, gpus):
    assert parse_gpu_quantity(value) == gpus


def test_fits_counts_whole_replicas_per_node():
    # 3 + 3 GPUs free on two nodes: six single-GPU replicas, but only two 2-GPU replicas and no 4-GPU one.
    capacity = gpu_capacity([node("a", 8), node("b", 8)], [pod("a", 5), pod("b", 5)])
    assert capacity.free_gpus == 6
    assert capacity.fits(6, 1) and not capacity.fits(7, 1)
    assert capacity.fits(2, 2) and not capacity.fits(3, 2)
    assert not capacity.fits(1, 4)
    assert capacity.fits(0, 8)
    with pytest.raises(ValueError):
        capacity.fits(1, 0)


def deployment(revision, replicas, gpus=2, namespace="ai"):
    labels = {"app": "bot", "rev": revision}
    return {"metadata": {"name": f"bot-{revision}", "namespace": namespace},
            "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels},
                                  "spec": {"containers": [{"resources": {"limits": {"nvidia.com/gpu": gpus}}}]}}}}


def replica_pod(revision, node_name, gpus=2, namespace="ai", deleting=False, phase="Running"):
    made = pod(node_name, gpus, phase=phase)
    made["metadata"].update(namespace=namespace, labels={"app": "bot", "rev": revision})
    if deleting:
        made["metadata"]["deletionTimestamp"] = "2026-11-22T01:00:00Z"
    return made


def test_replicas_a_deployment_asks_for_without_a_bound_pod_are_not_free():
    """A shift scaled the stable 4 -> 3 and the canary 0 -> 1: the stable's pod is gone, the
    canary's not created (or not scheduled) yet. Its 2 GPUs are promised, not free."""
    from digital_worker.operator.capacity import unbound_replicas

    nodes = [node("a", 4), node("b", 4)]
    pods = [replica_pod("s", "a"), replica_pod("s", "b"), replica_pod("s", "a")]
    deployments = [deployment("s", 3), deployment("c", 1)]
    assert gpu_capacity(nodes, pods).free_gpus == 2  # what counting pods alone sees
    assert unbound_replicas(deployments, pods) == [(1, 2)]
    assert gpu_capacity(nodes, pods, deployments=deployments).free_gpus == 0
    pending = pods + [replica_pod("c", None, phase="Pending")]
    assert gpu_capacity(nodes, pending, deployments=deployments).free_gpus == 0
    bound = pods + [replica_pod("c", "b")]  # scheduled: counted once, as a pod
    assert unbound_replicas(deployments, bound) == []
    assert gpu_capacity(nodes, bound, deployments=deployments).free_gpus == 0
    # A terminating pod holds its GPUs but is no replica; pods elsewhere are not this Deployment's.
    others = pods + [replica_pod("c", "b", deleting=True), replica_pod("c", "b", namespace="other")]
    assert unbound_replicas(deployments, others) == [(1, 2)]
    assert unbound_replicas([deployment("c", 0), deployment("x", 2, gpus=0)], []) == []


def test_reserving_places_like_the_scheduler_and_never_frees_what_is_promised():
    capacity = cap(3, 6)
    placed = capacity.reserve(2, 2)
    assert [n.free for n in placed.nodes] == [3, 2]  # most free first, one pod at a time
    assert [n.free for n in capacity.reserve(3, 2).nodes] == [1, 2]
    # Nowhere fits a 4-GPU pod on (3, 2): it waits Pending and takes the first GPUs to free up.
    assert placed.reserve(1, 4).free_gpus < placed.free_gpus
    assert capacity.reserve(0, 2) is capacity


def test_planning_from_the_promised_view_never_oversells_the_nodes():
    """The rollout state above, planned by the replica-ratio router (maxSurge 1, maxUnavailable 1)
    and the capacity planner: from pods alone a second canary replica 'fits' (3 + 2 replicas of 2
    GPUs on 8); from what is promised it does not."""
    from digital_worker.operator.capacity import plan_rollout_step

    router = ReplicaRatioRouter(max_surge=1, max_unavailable=1)
    nodes = [node("a", 4), node("b", 4)]
    pods = [replica_pod("s", "a"), replica_pod("s", "b"), replica_pod("s", "a")]
    current = ReplicaCounts(stable=3, canary=1, stable_ready=3, canary_ready=0)
    naive = plan_rollout_step(router, gpu_capacity(nodes, pods), 4, 50, current, 2, max_unavailable=1)
    assert (naive.traffic.stable_replicas + naive.traffic.canary_replicas) * 2 == 10
    step = plan_rollout_step(router, gpu_capacity(nodes, pods, deployments=[deployment("s", 3), deployment("c", 1)]),
                             4, 50, current, 2, max_unavailable=1)
    assert (step.traffic.stable_replicas + step.traffic.canary_replicas) * 2 <= 8


def test_a_shift_waits_for_the_replicas_an_earlier_shift_left_starting():
    """maxUnavailable 1 and one canary pod of the last shift not ready yet: shifting another stable
    replica now would leave 2 of 4 serving. Hold (not a wait for GPUs) until it is ready."""
    from digital_worker.operator.capacity import REASON_STARTING, plan_rollout_step

    held = plan_capacity(cap(0), 3, 1, 3, 2, gpus_per_canary_replica=2, max_unavailable=1, unavailable=1)
    assert (held.action, held.stable_replicas, held.canary_replicas) == ("Hold", 3, 1)
    assert held.reason == REASON_STARTING and not held.waiting and "not ready" in held.message
    wider = plan_capacity(cap(0), 3, 1, 3, 3, gpus_per_canary_replica=2, max_unavailable=2, unavailable=1)
    assert (wider.action, wider.stable_replicas, wider.canary_replicas) == ("Shift", 2, 2)
    router = ReplicaRatioRouter(max_surge=1, max_unavailable=1)
    starting = plan_rollout_step(router, cap(0), 4, 50, ReplicaCounts(3, 1, 3, 0), 2, max_unavailable=1)
    assert (starting.traffic.stable_replicas, starting.traffic.canary_replicas) == (3, 1)
    assert not starting.waiting and not starting.traffic.settled


@pytest.mark.parametrize("startup_ticks", [1, 3])
def test_replica_ratio_rollout_on_full_nodes_keeps_max_unavailable_while_pods_start(startup_ticks):
    """8 GPUs, 4 stable replicas of 2 GPUs, replica ratio with maxSurge 1 / maxUnavailable 1, to 50%
    then 100%; a new pod is ready `startup_ticks` ticks after it is created. At every tick the
    Deployments ask for at most 8 GPUs and at least 3 of the 4 replicas are ready."""
    from digital_worker.operator.capacity import plan_rollout_step

    router = ReplicaRatioRouter(max_surge=1, max_unavailable=1)
    total, gpus, node_gpus = 4, 2, 8
    stable, canary_ages = 4, []  # ages (ticks since creation) of the canary's pods
    for weight in (50, 100):
        for _ in range(40):
            ready_canary = sum(1 for age in canary_ages if age >= startup_ticks)
            counts = ReplicaCounts(stable, len(canary_ages), stable, ready_canary)
            promised = GpuCapacity(None, (GpuNode("n0", node_gpus, (stable + len(canary_ages)) * gpus),))
            step = plan_rollout_step(router, promised, total, weight, counts, gpus, max_unavailable=1)
            plan = step.traffic
            assert not step.waiting, step.capacity.message
            assert (plan.stable_replicas + plan.canary_replicas) * gpus <= node_gpus
            stable = plan.stable_replicas
            canary_ages = sorted(canary_ages, reverse=True)[:plan.canary_replicas]
            canary_ages += [0] * (plan.canary_replicas - len(canary_ages))
            assert stable + sum(1 for age in canary_ages if age >= startup_ticks) >= total - 1
            done = plan.settled and ready_canary >= plan.canary_replicas and \
                (plan.stable_replicas, plan.canary_replicas) == (counts.stable, counts.canary)
            canary_ages = [age + 1 for age in canary_ages]
            if done:
                break
        assert done, (weight, stable, canary_ages)
    assert (stable, len(canary_ages)) == (0, 4)


# ---------------------------------------------------------------- planner


def cap(*free_per_node: int) -> GpuCapacity:
    return GpuCapacity(None, tuple(GpuNode(f"n{i}", 8, 8 - free) for i, free in enumerate(free_per_node)))


def test_plan_proceeds_when_the_canary_fits():
    decision = plan_capacity(cap(4), current_stable=4, current_canary=0, target_stable=4, target_canary=2,
                             gpus_per_canary_replica=2)
    assert (decision.action, decision.stable_replicas, decision.canary_replicas) == ("Proceed", 4, 2)
    assert decision.reason == REASON_FITS and not decision.waiting


def test_plan_adds_what_fits_and_leaves_the_rest():
    decision = plan_capacity(cap(2, 1), 4, 0, 4, 3, gpus_per_canary_replica=2)
    assert (decision.action, decision.stable_replicas, decision.canary_replicas) == ("Proceed", 4, 1)
    assert "1 of 3" in decision.message


def test_plan_counts_gpus_freed_by_the_steps_own_scale_down():
    # Replica ratio without surge: the stable gives one replica back for the canary's one.
    decision = plan_capacity(cap(0), 4, 0, 3, 1, gpus_per_canary_replica=2)
    assert (decision.action, decision.stable_replicas, decision.canary_replicas) == ("Proceed", 3, 1)
    assert "release their GPUs" in decision.message


def test_plan_waits_with_insufficient_gpu_when_nothing_can_move():
    decision = plan_capacity(cap(0), 4, 0, 4, 1, gpus_per_canary_replica=2, max_unavailable=0)
    assert decision.waiting and decision.reason == REASON_INSUFFICIENT_GPU
    assert (decision.stable_replicas, decision.canary_replicas) == (4, 0)
    assert "needs 2 more GPU(s)" in decision.message and "maxUnavailable" in decision.message


def test_plan_shifts_when_the_rollout_may_run_a_replica_short():
    decision = plan_capacity(cap(0), 4, 0, 4, 2, gpus_per_canary_replica=2, max_unavailable=1)
    assert (decision.action, decision.stable_replicas, decision.canary_replicas) == ("Shift", 3, 1)
    assert decision.reason == REASON_SHIFTING and "4->3" in decision.message
    wider = plan_capacity(cap(0), 4, 0, 4, 2, gpus_per_canary_replica=2, max_unavailable=3)
    # Never frees more than the canary still needs (2), even when allowed 3.
    assert (wider.stable_replicas, wider.canary_replicas) == (2, 2)


def test_plan_never_shifts_when_freed_gpus_cannot_host_a_canary_replica():
    # Canary needs 4 GPUs per replica (bigger tensor parallel), stable frees 2 per replica: freeing
    # stable pods on different nodes could leave both revisions short. Wait instead.
    decision = plan_capacity(cap(0, 0), 4, 0, 4, 1, gpus_per_canary_replica=4, gpus_per_stable_replica=2,
                             max_unavailable=2)
    assert decision.waiting and "strand" in decision.message
    # The other way round, one freed 4-GPU stable pod hosts two 2-GPU canary pods.
    decision = plan_capacity(cap(0), 4, 0, 4, 2, gpus_per_canary_replica=2, gpus_per_stable_replica=4,
                             max_unavailable=1)
    assert (decision.action, decision.stable_replicas, decision.canary_replicas) == ("Shift", 3, 2)


def test_plan_keeps_the_last_stable_pod_while_it_serves():
    decision = plan_capacity(cap(0), 1, 0, 1, 1, gpus_per_canary_replica=1, max_unavailable=1)
    assert decision.waiting and "cannot give up more replicas" in decision.message
    # Down to an explicit floor (what the stable needs for its share), not below.
    floored = plan_capacity(cap(0), 4, 0, 4, 3, gpus_per_canary_replica=1, max_unavailable=4, stable_floor=2)
    assert (floored.action, floored.stable_replicas, floored.canary_replicas) == ("Shift", 2, 2)


def test_plan_abort_grows_the_stable_into_what_the_canary_frees():
    decision = plan_capacity(cap(0), 2, 2, 4, 0, gpus_per_canary_replica=2)
    assert (decision.action, decision.stable_replicas, decision.canary_replicas) == ("Proceed", 4, 0)


def test_plan_with_nothing_to_add_and_with_both_growing():
    assert plan_capacity(cap(0), 4, 1, 3, 1, 2).reason == REASON_NOTHING_TO_ADD
    both = plan_capacity(cap(4, 2), 2, 1, 3, 2, gpus_per_canary_replica=4, gpus_per_stable_replica=2)
    assert (both.action, both.stable_replicas, both.canary_replicas) == ("Proceed", 3, 2)
    too_much = plan_capacity(cap(2, 2), 2, 1, 3, 2, gpus_per_canary_replica=4, gpus_per_stable_replica=2)
    assert too_much.waiting and (too_much.stable_replicas, too_much.canary_replicas) == (2, 1)


def test_plan_rejects_bad_inputs():
    with pytest.raises(ValueError):
        plan_capacity(cap(1), 1, 0, 1, 1, gpus_per_canary_replica=0)
    with pytest.raises(ValueError):
        plan_capacity(cap(1), -1, 0, 1, 1, gpus_per_canary_replica=1)


def test_full_cluster_canary_rollout_never_strands_both_revisions():
    """Tick by tick: a full 8-GPU node runs 4 stable replicas of 2 GPUs; the canary goes 25 -> 50 ->
    100% through the replica-ratio router, each plan checked by the capacity planner, pods bound
    as GPUs allow. At every tick, stable + canary replicas that hold GPUs serve >= 3 replicas' worth."""
    router = ReplicaRatioRouter(max_surge=1, max_unavailable=1)
    total, gpus = 4, 2
    counts = ReplicaCounts(stable=4, canary=0)
    node_gpus = 8
    history = []
    for weight in (25, 50, 100):
        for _ in range(10):
            plan = router.plan(total, weight, counts)
            used = (counts.stable + counts.canary) * gpus
            capacity = GpuCapacity(None, (GpuNode("n0", node_gpus, used),))
            decision = plan_capacity(capacity, counts.stable, counts.canary, plan.stable_replicas,
                                     plan.canary_replicas, gpus, max_unavailable=1)
            assert not decision.waiting, decision.message
            counts = ReplicaCounts(decision.stable_replicas, decision.canary_replicas)
            assert (counts.stable + counts.canary) * gpus <= node_gpus
            assert counts.stable + counts.canary >= total - 1
            history.append((counts.stable, counts.canary))
            if (counts.stable, counts.canary) == (plan.stable_replicas, plan.canary_replicas) and plan.settled:
                break
    assert history[-1] == (0, 4)
    assert (3, 1) in history and (2, 2) in history


def test_real_kubernetes_client_objects_both_serializations():
    """Nodes and pods built with the kubernetes client's models, read as `to_dict()` (snake_case,
    None everywhere) and as the API's JSON (`sanitize_for_serialization`, camelCase)."""
    kubernetes = pytest.importorskip("kubernetes")
    m = kubernetes.client

    def k8s_node(name, gpus, taints=None, unschedulable=None):
        return m.V1Node(
            metadata=m.V1ObjectMeta(name=name, labels={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}),
            spec=m.V1NodeSpec(taints=taints, unschedulable=unschedulable),
            status=m.V1NodeStatus(allocatable={"nvidia.com/gpu": str(gpus), "cpu": "96"},
                                  conditions=[m.V1NodeCondition(type="Ready", status="True")]),
        )

    def k8s_pod(node_name, gpus, phase="Running", init_gpus=None):
        containers = [m.V1Container(name="sglang", resources=m.V1ResourceRequirements(
            limits={"nvidia.com/gpu": str(gpus)}, requests={"nvidia.com/gpu": str(gpus)}))]
        init = [m.V1Container(name="fetch", resources=m.V1ResourceRequirements(
            limits={"nvidia.com/gpu": str(init_gpus)}))] if init_gpus else None
        return m.V1Pod(metadata=m.V1ObjectMeta(name=f"p-{node_name}"),
                       spec=m.V1PodSpec(node_name=node_name, containers=containers, init_containers=init),
                       status=m.V1PodStatus(phase=phase))

    nodes = [k8s_node("gpu-1", 8), k8s_node("gpu-2", 8, taints=[m.V1Taint(key="nvidia.com/gpu", effect="NoSchedule")]),
             k8s_node("gpu-3", 8, unschedulable=True)]
    pods = [k8s_pod("gpu-1", 2), k8s_pod("gpu-1", 1, init_gpus=3), k8s_pod("gpu-1", 4, phase="Succeeded"),
            k8s_pod("gpu-2", 4)]
    tolerations = [m.V1Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule").to_dict()]
    serializer = m.ApiClient()
    for convert in (lambda obj: obj.to_dict(), serializer.sanitize_for_serialization):
        capacity = gpu_capacity([convert(n) for n in nodes], [convert(p) for p in pods],
                                gpu_type="NVIDIA-H100-80GB-HBM3", tolerations=tolerations)
        free = {node.name: (node.free, node.excluded) for node in capacity.nodes}
        assert free == {"gpu-1": (3, ""), "gpu-2": (4, ""), "gpu-3": (0, "cordoned (unschedulable)")}
        # 3 free on gpu-1 hold one 2-GPU replica, 4 on gpu-2 hold two.
        assert capacity.fits(3, 2) is True and capacity.fits(4, 2) is False


# ---------------------------------------------------------------- router + capacity together


def test_rollout_step_on_a_full_cluster_holds_the_gateway_weight_to_the_canary_pods():
    from digital_worker.operator.capacity import plan_rollout_step
    from digital_worker.operator.traffic import GatewayApiRouter, ParentRef

    router = GatewayApiRouter("r", "ns", ParentRef("gw"), "stable", "canary")
    full = GpuCapacity(None, (GpuNode("n0", 8, 8),))
    waiting = plan_rollout_step(router, full, 4, 50, ReplicaCounts(4, 0), gpus_per_canary_replica=2)
    assert waiting.waiting and waiting.capacity.reason == REASON_INSUFFICIENT_GPU
    assert waiting.traffic.effective_weight == 0.0 and waiting.traffic.canary_replicas == 0
    shifted = plan_rollout_step(router, full, 4, 50, ReplicaCounts(4, 0), 2, max_unavailable=1)
    assert shifted.capacity.action == "Shift"
    assert (shifted.traffic.stable_replicas, shifted.traffic.canary_replicas) == (3, 1)
    assert shifted.traffic.effective_weight == 0.0  # the new canary pod is not ready yet


def test_gateway_rollout_tick_by_tick_on_a_full_node():
    """8 GPUs, 4 stable replicas of 2 GPUs, Gateway API, maxUnavailable 1: the canary goes to 50%
    then 100%. Pods become ready one tick after they are created. At every tick the canary's
    weight is covered by its ready pods, serving pods never drop below total - maxUnavailable,
    and GPUs are not oversold."""
    from digital_worker.operator.capacity import plan_rollout_step
    from digital_worker.operator.traffic import GatewayApiRouter, ParentRef

    router = GatewayApiRouter("r", "ns", ParentRef("gw"), "stable", "canary")
    total, gpus, node_gpus = 4, 2, 8
    counts = ReplicaCounts(4, 0, 4, 0)
    seen = []
    for weight in (50, 100):
        for _ in range(12):
            capacity = GpuCapacity(None, (GpuNode("n0", node_gpus, (counts.stable + counts.canary) * gpus),))
            step = plan_rollout_step(router, capacity, total, weight, counts, gpus, max_unavailable=1)
            plan = step.traffic
            assert not step.waiting, step.capacity.message
            assert (plan.stable_replicas + plan.canary_replicas) * gpus <= node_gpus
            canary_weight = plan.effective_weight
            # The weight sent to the canary is covered by its ready pods (each pod 25% here), but
            # for the one-replica-short moment maxUnavailable allows when the stable's last pod
            # makes room for the canary's last one.
            short = 1 if plan.stable_replicas == 0 else 0
            assert canary_weight <= 100 * (counts.ready_canary + short) / total
            serving_stable = min(counts.ready_stable, plan.stable_replicas)
            assert serving_stable + counts.ready_canary >= total - 1
            if canary_weight < 100:
                assert serving_stable >= 1
            seen.append((plan.stable_replicas, plan.canary_replicas, canary_weight))
            # Pods that exist now are ready at the next tick.
            counts = ReplicaCounts(plan.stable_replicas, plan.canary_replicas,
                                   min(counts.ready_stable, plan.stable_replicas), plan.canary_replicas)
            if step.complete:
                break
        assert step.complete and plan.effective_weight == weight
    assert seen == [(3, 1, 0.0), (2, 2, 25.0), (2, 2, 50.0), (1, 3, 50.0), (0, 4, 100.0)]
