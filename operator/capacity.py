"""GPU capacity: can the cluster host more replicas of a revision, and how to roll out when it cannot.

Inputs are plain dicts as the Kubernetes API returns them (`list_node().to_dict()` style or raw
JSON: both `camelCase` and `snake_case` keys are read). A replica asking for N GPUs must land on
one node (tensor parallelism stays inside a node), so capacity is counted per node in whole replicas,
not as a cluster-wide GPU sum.

`plan_capacity` is a pure policy: given what is free, where the rollout is and where it wants to be,
it either proceeds, shifts capacity (scale the stable down only by what provably makes room for the
same step's canary pods, so no rollout strands both revisions half-sized), or waits with reason
`InsufficientGPU`. `plan_rollout_step` runs a traffic router's plan through it and recomputes the
traffic split for the replica counts actually reached, so the canary never gets more weight than
its pods can carry. Typical use in a canary step:

    capacity = gpu_capacity(nodes, pods, gpu_type="nvidia-h100-80gb", tolerations=pod_tolerations)
    step = plan_rollout_step(router, capacity, total_replicas=4, canary_weight=25,
                             current=ReplicaCounts(stable=4, canary=0, stable_ready=4, canary_ready=0),
                             gpus_per_canary_replica=2, max_unavailable=1)
    # scale to step.traffic.stable_replicas / canary_replicas, apply step.traffic.objects;
    # step.waiting -> condition Progressing=False, reason step.capacity.reason (InsufficientGPU);
    # step.complete -> the weight is in place: start the step's analysis / pause.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from digital_worker.operator.traffic import ReplicaCounts, TrafficPlan, TrafficRouter

GPU_RESOURCE = "nvidia.com/gpu"
GPU_TYPE_LABELS = ("digitalworker.io/gpu-type", "nvidia.com/gpu.product")
# Effects that keep new pods off a node unless tolerated (PreferNoSchedule only discourages).
BLOCKING_TAINT_EFFECTS = ("NoSchedule", "NoExecute")
TERMINATED_POD_PHASES = ("Succeeded", "Failed")

REASON_INSUFFICIENT_GPU = "InsufficientGPU"
REASON_FITS = "CapacityAvailable"
REASON_SHIFTING = "ShiftingCapacity"
REASON_NOTHING_TO_ADD = "NoScaleUp"
REASON_PARTIAL = "PartialCapacity"
REASON_STARTING = "ReplicasStarting"


def _get(obj: Mapping[str, Any] | None, *keys: str) -> Any:
    """The first of `keys` present in `obj` (camelCase from JSON, snake_case from the client)."""
    if not obj:
        return None
    for key in keys:
        if key in obj and obj[key] is not None:
            return obj[key]
    return None


def parse_gpu_quantity(value: Any) -> int:
    """Extended resources are whole numbers: "4", 4, "0". Anything else counts as 0 GPUs."""
    if value is None or isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(0, value)
    if isinstance(value, float):
        return max(0, int(value))
    text = str(value).strip()
    if text.endswith("k"):  # "1k" is legal Kubernetes quantity syntax, if unlikely for GPUs
        text, factor = text[:-1], 1000
    else:
        factor = 1
    try:
        return max(0, int(float(text) * factor))
    except ValueError:
        return 0


@dataclass(frozen=True)
class Toleration:
    key: str | None = None
    operator: str = "Equal"
    value: str | None = None
    effect: str | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Toleration":
        return cls(
            key=data.get("key") or None,
            operator=data.get("operator") or "Equal",
            value=data.get("value"),
            effect=data.get("effect") or None,
        )

    def tolerates(self, taint: Mapping[str, Any]) -> bool:
        if self.effect and self.effect != taint.get("effect"):
            return False
        if self.operator == "Exists":
            return self.key is None or self.key == taint.get("key")
        return self.key == taint.get("key") and (self.value or "") == (taint.get("value") or "")


@dataclass(frozen=True)
class GpuNode:
    name: str
    allocatable: int
    requested: int
    # Why the node cannot take new GPU pods ("" when it can).
    excluded: str = ""

    @property
    def free(self) -> int:
        return 0 if self.excluded else max(0, self.allocatable - self.requested)

    def replicas_that_fit(self, gpus_per_replica: int) -> int:
        return self.free // gpus_per_replica if gpus_per_replica > 0 else 0


@dataclass(frozen=True)
class GpuCapacity:
    gpu_type: str | None
    nodes: tuple[GpuNode, ...]

    @property
    def usable_nodes(self) -> tuple[GpuNode, ...]:
        return tuple(node for node in self.nodes if not node.excluded)

    @property
    def free_gpus(self) -> int:
        return sum(node.free for node in self.nodes)

    @property
    def largest_free_block(self) -> int:
        return max((node.free for node in self.nodes), default=0)

    def replicas_that_fit(self, gpus_per_replica: int) -> int:
        if gpus_per_replica <= 0:
            raise ValueError(f"gpus per replica must be at least 1, got {gpus_per_replica}")
        return sum(node.replicas_that_fit(gpus_per_replica) for node in self.nodes)

    def fits(self, extra_replicas: int, gpus_per_replica: int) -> bool:
        """Whether `extra_replicas` more pods of `gpus_per_replica` GPUs each can be scheduled."""
        if extra_replicas <= 0:
            return True
        return self.replicas_that_fit(gpus_per_replica) >= extra_replicas

    def reserve(self, replicas: int, gpus_per_replica: int) -> "GpuCapacity":
        """This capacity with `replicas` more pods of `gpus_per_replica` GPUs placed as the scheduler
        would (the usable node with the most free GPUs that fits, one pod at a time). A pod that fits
        nowhere stays Pending and takes the first GPUs that free up, so it is charged to the node
        with the most free GPUs all the same: what it is promised is never counted as free."""
        if replicas <= 0 or gpus_per_replica <= 0:
            return self
        requested = {node.name: node.requested for node in self.nodes}
        usable = [node for node in self.nodes if not node.excluded]
        for _ in range(replicas):
            if not usable:
                break
            free = {node.name: max(0, node.allocatable - requested[node.name]) for node in usable}
            fitting = [node for node in usable if free[node.name] >= gpus_per_replica] or usable
            target = max(fitting, key=lambda node: free[node.name])
            requested[target.name] += gpus_per_replica
        return GpuCapacity(self.gpu_type, tuple(GpuNode(node.name, node.allocatable, requested[node.name],
                                                        node.excluded) for node in self.nodes))

    def describe(self) -> str:
        selector = f"gpu type {self.gpu_type!r}" if self.gpu_type else "any GPU type"
        return (
            f"{self.free_gpus} GPU(s) free on {len(self.usable_nodes)} usable node(s) matching {selector} "
            f"(largest free block {self.largest_free_block} on one node)"
        )


def node_gpu_type(node: Mapping[str, Any]) -> str | None:
    labels = _get(node.get("metadata"), "labels") or {}
    for label in GPU_TYPE_LABELS:
        if labels.get(label):
            return str(labels[label])
    return None


def node_matches(node: Mapping[str, Any], gpu_type: str | None, node_selector: Mapping[str, str] | None) -> bool:
    labels = _get(node.get("metadata"), "labels") or {}
    if gpu_type and not any(labels.get(label) == gpu_type for label in GPU_TYPE_LABELS):
        return False
    return all(labels.get(key) == value for key, value in (node_selector or {}).items())


def _exclusion(node: Mapping[str, Any], tolerations: tuple[Toleration, ...]) -> str:
    spec = node.get("spec") or {}
    if spec.get("unschedulable"):
        return "cordoned (unschedulable)"
    for taint in spec.get("taints") or ():
        if taint.get("effect") in BLOCKING_TAINT_EFFECTS and not any(t.tolerates(taint) for t in tolerations):
            return f"taint {taint.get('key')}={taint.get('value') or ''}:{taint.get('effect')} not tolerated"
    for condition in _get(node.get("status"), "conditions") or ():
        if condition.get("type") == "Ready" and condition.get("status") != "True":
            return "not Ready"
    return ""


def pod_gpu_request(pod: Mapping[str, Any]) -> int:
    """GPUs a pod holds: as the scheduler counts it, max(sum over containers, any init container).
    For extended resources limits imply requests, so a limit alone counts."""

    def container_gpus(container: Mapping[str, Any]) -> int:
        resources = container.get("resources") or {}
        requests = resources.get("requests") or {}
        limits = resources.get("limits") or {}
        return parse_gpu_quantity(requests.get(GPU_RESOURCE, limits.get(GPU_RESOURCE)))

    spec = pod.get("spec") or {}
    main = sum(container_gpus(c) for c in spec.get("containers") or ())
    init = max((container_gpus(c) for c in _get(spec, "initContainers", "init_containers") or ()), default=0)
    return max(main, init)


def _pod_holds_node(pod: Mapping[str, Any]) -> str | None:
    """The node a pod occupies GPUs on, or None (unbound, or finished)."""
    phase = _get(pod.get("status"), "phase")
    if phase in TERMINATED_POD_PHASES:
        return None
    return _get(pod.get("spec"), "nodeName", "node_name")


def gpu_capacity(
    nodes: Iterable[Mapping[str, Any]],
    pods: Iterable[Mapping[str, Any]],
    gpu_type: str | None = None,
    tolerations: Iterable[Mapping[str, Any] | Toleration] = (),
    node_selector: Mapping[str, str] | None = None,
    deployments: Iterable[Mapping[str, Any]] = (),
) -> GpuCapacity:
    """Allocatable GPUs on matching nodes minus what non-terminated pods on them request, and minus
    what `deployments` ask for beyond their pods bound to a node (see `unbound_replicas`)."""
    parsed_tolerations = tuple(t if isinstance(t, Toleration) else Toleration.from_dict(t) for t in tolerations)
    matching: dict[str, tuple[int, str]] = {}
    for node in nodes:
        if not node_matches(node, gpu_type, node_selector):
            continue
        name = _get(node.get("metadata"), "name")
        allocatable = parse_gpu_quantity((_get(node.get("status"), "allocatable") or {}).get(GPU_RESOURCE))
        if name is None or allocatable <= 0:
            continue
        matching[name] = (allocatable, _exclusion(node, parsed_tolerations))
    pods = list(pods)
    requested = {name: 0 for name in matching}
    for pod in pods:
        node_name = _pod_holds_node(pod)
        if node_name in requested:
            requested[node_name] += pod_gpu_request(pod)
    capacity = GpuCapacity(
        gpu_type,
        tuple(GpuNode(name, allocatable, requested[name], excluded)
              for name, (allocatable, excluded) in sorted(matching.items())),
    )
    for replicas, gpus in sorted(unbound_replicas(deployments, pods), key=lambda item: -item[1]):
        capacity = capacity.reserve(replicas, gpus)
    return capacity


def _matches(labels: Mapping[str, Any] | None, selector: Mapping[str, Any] | None) -> bool:
    return bool(selector) and all((labels or {}).get(key) == value for key, value in selector.items())


def unbound_replicas(deployments: Iterable[Mapping[str, Any]], pods: Iterable[Mapping[str, Any]]
                     ) -> list[tuple[int, int]]:
    """(replicas, GPUs per replica) that Deployments ask for but that hold no GPUs on a node yet:
    `spec.replicas` minus the Deployment's live pods bound to a node. A Deployment just scaled up
    has no pods for the new replicas until its controller creates them, and a created pod holds
    nothing until it is scheduled; those GPUs are promised all the same, so a capacity check that
    counted only bound pods would hand them out twice."""
    pods = list(pods)
    unbound = []
    for deployment in deployments:
        spec = deployment.get("spec") or {}
        wanted = int(spec.get("replicas", 1) or 0)
        template = spec.get("template") or {}
        gpus = pod_gpu_request(template)
        if wanted <= 0 or gpus <= 0:
            continue
        namespace = _get(deployment.get("metadata"), "namespace")
        selector = _get(spec.get("selector"), "matchLabels", "match_labels") or \
            _get(template.get("metadata"), "labels")
        bound = sum(1 for pod in pods
                    if _get(pod.get("metadata"), "namespace") == namespace
                    and not _get(pod.get("metadata"), "deletionTimestamp", "deletion_timestamp")
                    and _matches(_get(pod.get("metadata"), "labels"), selector) and _pod_holds_node(pod))
        if wanted > bound:
            unbound.append((wanted - bound, gpus))
    return unbound


# ---------------------------------------------------------------- the planner (pure)


@dataclass(frozen=True)
class CapacityDecision:
    # "Proceed": scale to the counts below; "Shift": scale the stable down to make room, the
    # canary up in the same step; "Hold": a shift would be due but replicas still starting use the
    # maxUnavailable budget (keep the counts, not a wait for GPUs); "Wait": nothing fits now
    # (condition Progressing=False).
    action: str
    stable_replicas: int
    canary_replicas: int
    reason: str
    message: str

    @property
    def waiting(self) -> bool:
        return self.action == "Wait"


def plan_capacity(
    capacity: GpuCapacity,
    current_stable: int,
    current_canary: int,
    target_stable: int,
    target_canary: int,
    gpus_per_canary_replica: int,
    gpus_per_stable_replica: int | None = None,
    max_unavailable: int = 0,
    stable_floor: int | None = None,
    unavailable: int = 0,
) -> CapacityDecision:
    """Decide the next replica counts of a step that wants (target_stable, target_canary).

    Each pod a revision gives up frees its GPUs on one node, so it is guaranteed to host
    `its GPUs // the other pod's GPUs` pods of the other revision; nothing else is assumed.

    Canary growing (the rollout progressing):
    1. every new pod fits in free GPUs plus what the step's own stable scale-down frees: proceed;
    2. some fit: proceed with those, shrinking the stable only as much as they need;
    3. none fit and `max_unavailable` >= 1 (the rollout may run a replica short while a pod
       starts): shift up to `max_unavailable` stable pods to the canary, less the `unavailable`
       replicas (not ready now, e.g. canary pods of an earlier shift still starting), never below
       `stable_floor` (default: 1 while the stable should serve, i.e. target_stable > 0); with
       that budget used up, hold (reason ReplicasStarting, not a wait for GPUs) until they are ready;
    4. otherwise wait, reason InsufficientGPU, saying what is missing.
    The stable never shrinks by more than the canary can provably use, so a rollout cannot end
    with both revisions half-sized and the freed GPUs unusable. While the canary grows the
    stable does not grow back (an earlier shift) unless both fit.

    Stable growing (an abort, or regrowing after a shift): best effort, never waits: it grows
    into free GPUs and what the canary's scale-down frees.
    """
    stable_gpus = gpus_per_stable_replica or gpus_per_canary_replica
    if gpus_per_canary_replica <= 0 or stable_gpus <= 0:
        raise ValueError("gpus per replica must be at least 1")
    for name, value in (("current_stable", current_stable), ("current_canary", current_canary),
                        ("target_stable", target_stable), ("target_canary", target_canary)):
        if value < 0:
            raise ValueError(f"{name} must not be negative, got {value}")

    add_canary = max(0, target_canary - current_canary)
    add_stable = max(0, target_stable - current_stable)
    if add_canary == 0 and add_stable == 0:
        return CapacityDecision("Proceed", target_stable, target_canary, REASON_NOTHING_TO_ADD,
                                "no replicas to add")
    if add_canary > 0 and add_stable > 0:
        if _fits_both(capacity, add_canary, gpus_per_canary_replica, add_stable, stable_gpus):
            return CapacityDecision(
                "Proceed", target_stable, target_canary, REASON_FITS,
                f"{add_canary} canary and {add_stable} stable replica(s) fit: {capacity.describe()}")
        target_stable = current_stable  # the canary goes first; the stable waits for spare GPUs
    if add_canary > 0:
        floor = stable_floor if stable_floor is not None else (1 if target_stable > 0 else 0)
        return _grow_canary(capacity, current_stable, current_canary, target_stable, target_canary,
                            gpus_per_canary_replica, stable_gpus, max_unavailable, min(floor, current_stable),
                            max(0, unavailable))
    return _grow_stable(capacity, current_stable, current_canary, target_stable, target_canary,
                        gpus_per_canary_replica, stable_gpus)


def _grow_canary(capacity: GpuCapacity, stable: int, canary: int, target_stable: int, target_canary: int,
                 canary_gpus: int, stable_gpus: int, max_unavailable: int, stable_floor: int,
                 unavailable: int = 0) -> CapacityDecision:
    add = target_canary - canary
    fit_now = capacity.replicas_that_fit(canary_gpus)
    per_freed = stable_gpus // canary_gpus
    planned_shrink = max(0, stable - target_stable)
    guaranteed = fit_now + planned_shrink * per_freed
    if add <= guaranteed:
        relying = "" if add <= fit_now else f" once {planned_shrink} stable replica(s) release their GPUs"
        return CapacityDecision("Proceed", target_stable, target_canary, REASON_FITS,
                                f"{add} canary replica(s) of {canary_gpus} GPU(s) fit{relying}: {capacity.describe()}")
    if guaranteed > 0:
        shrink = _ceil_div(guaranteed - fit_now, per_freed) if guaranteed > fit_now else 0
        return CapacityDecision("Proceed", stable - shrink, canary + guaranteed, REASON_PARTIAL,
                                f"{guaranteed} of {add} canary replica(s) fit now; the rest wait for GPUs: "
                                f"{capacity.describe()}")
    shiftable = max(0, stable - stable_floor)
    if max_unavailable >= 1 and per_freed >= 1 and shiftable > 0:
        budget = max_unavailable - unavailable
        if budget < 1:
            return CapacityDecision(
                "Hold", stable, canary, REASON_STARTING,
                f"no free GPUs for the canary ({capacity.describe()}); {unavailable} replica(s) not ready yet "
                f"use the maxUnavailable budget ({max_unavailable}): shifting more waits until they are ready")
        shrink = min(budget, shiftable, _ceil_div(add, per_freed))
        grow = min(add, shrink * per_freed)
        return CapacityDecision(
            "Shift", stable - shrink, canary + grow, REASON_SHIFTING,
            f"no free GPUs for the canary ({capacity.describe()}): scaling stable {stable}->{stable - shrink} "
            f"to host {grow} canary replica(s) in its place",
        )
    if per_freed < 1:
        why = (f"; a stable replica frees {stable_gpus} GPU(s), less than one canary replica needs "
               f"({canary_gpus}), so shifting could strand both revisions")
    elif max_unavailable < 1:
        why = "; set maxUnavailable >= 1 to let the rollout shift GPUs from stable to canary"
    else:
        why = f"; the stable cannot give up more replicas (keeps {stable_floor} for its share of traffic)"
    return CapacityDecision(
        "Wait", stable, canary, REASON_INSUFFICIENT_GPU,
        f"needs {add * canary_gpus} more GPU(s) ({add} canary replica(s) x {canary_gpus}); "
        f"{capacity.describe()}{why}",
    )


def _grow_stable(capacity: GpuCapacity, stable: int, canary: int, target_stable: int, target_canary: int,
                 canary_gpus: int, stable_gpus: int) -> CapacityDecision:
    add = target_stable - stable
    fit_now = capacity.replicas_that_fit(stable_gpus)
    planned_shrink = max(0, canary - target_canary)
    guaranteed = fit_now + planned_shrink * (canary_gpus // stable_gpus)
    if add <= guaranteed:
        return CapacityDecision("Proceed", target_stable, target_canary, REASON_FITS,
                                f"{add} stable replica(s) of {stable_gpus} GPU(s) fit: {capacity.describe()}")
    return CapacityDecision(
        "Proceed", stable + guaranteed, target_canary, REASON_PARTIAL,
        f"{guaranteed} of {add} stable replica(s) fit now; the rest follow as GPUs free up: {capacity.describe()}",
    )


def _ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


@dataclass(frozen=True)
class RolloutStep:
    """One step of a canary: what to apply now, after both the router and GPU capacity had
    their say. `traffic` holds the replica counts, the weight achieved and the objects."""

    traffic: TrafficPlan
    capacity: CapacityDecision

    @property
    def waiting(self) -> bool:
        return self.capacity.waiting

    @property
    def complete(self) -> bool:
        """The step's weight is in place: the router's target reached, or (GPU capacity holding
        the stable below its preferred size) the exact weight applied with nothing waiting."""
        return not self.waiting and (self.traffic.settled or self.traffic.exact)


def plan_rollout_step(
    router: TrafficRouter,
    capacity: GpuCapacity,
    total_replicas: int,
    canary_weight: int,
    current: ReplicaCounts,
    gpus_per_canary_replica: int,
    gpus_per_stable_replica: int | None = None,
    max_unavailable: int = 0,
) -> RolloutStep:
    """The router's plan for the weight, checked against GPU capacity. When capacity holds the
    replicas below the plan (partial, shift or wait), the traffic split is recomputed for the
    counts actually reached, so the canary never gets more weight than its pods can carry."""
    wanted = router.plan(total_replicas, canary_weight, current)
    decision = plan_capacity(
        capacity, current.stable, current.canary, wanted.stable_replicas, wanted.canary_replicas,
        gpus_per_canary_replica, gpus_per_stable_replica, max_unavailable,
        stable_floor=router.stable_floor(total_replicas, canary_weight),
        unavailable=max(0, total_replicas - current.ready_stable - current.ready_canary),
    )
    if (decision.stable_replicas, decision.canary_replicas) == (wanted.stable_replicas, wanted.canary_replicas):
        return RolloutStep(wanted, decision)
    held = router.for_counts(total_replicas, canary_weight, decision.stable_replicas, decision.canary_replicas,
                             ready_canary=current.ready_canary)
    return RolloutStep(held, decision)


def _fits_both(capacity: GpuCapacity, canary: int, canary_gpus: int, stable: int, stable_gpus: int) -> bool:
    """Whether both sets of pods fit together, placing the larger pods first on each node."""
    free = sorted((node.free for node in capacity.nodes if node.free > 0), reverse=True)
    for count, size in sorted(((canary, canary_gpus), (stable, stable_gpus)), key=lambda item: -item[1]):
        for index, gpus in enumerate(free):
            if count <= 0:
                break
            placed = min(count, gpus // size)
            free[index] -= placed * size
            count -= placed
        if count > 0:
            return False
    return True
