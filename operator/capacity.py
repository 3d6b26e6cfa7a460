"""GPU capacity: can the cluster host more replicas of a revision, and how to roll out when it cannot.

Inputs are plain dicts as the Kubernetes API returns them (`list_node().to_dict()` style or raw
JSON: both `camelCase` and `snake_case` keys are read). A replica asking for N GPUs must land on
one node (tensor parallelism stays inside a node), so capacity is counted per node in whole replicas,
not as a cluster-wide GPU sum.

`plan_capacity` is a pure policy: given what is free, where the rollout is and where it wants to be,
it either proceeds, shifts capacity (scale the stable down only by what provably makes room for the
same step's canary pods, so no rollout strands both revisions half-sized), or waits with reason
`InsufficientGPU`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

GPU_RESOURCE = "nvidia.com/gpu"
GPU_TYPE_LABELS = ("digitalworker.io/gpu-type", "nvidia.com/gpu.product")
# Effects that keep new pods off a node unless tolerated (PreferNoSchedule only discourages).
BLOCKING_TAINT_EFFECTS = ("NoSchedule", "NoExecute")
TERMINATED_POD_PHASES = ("Succeeded", "Failed")

REASON_INSUFFICIENT_GPU = "InsufficientGPU"
REASON_FITS = "CapacityAvailable"
REASON_SHIFTING = "ShiftingCapacity"
REASON_NOTHING_TO_ADD = "NoScaleUp"


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
) -> GpuCapacity:
    """Allocatable GPUs on matching nodes minus what non-terminated pods on them request."""
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
    requested = {name: 0 for name in matching}
    for pod in pods:
        node_name = _pod_holds_node(pod)
        if node_name in requested:
            requested[node_name] += pod_gpu_request(pod)
    return GpuCapacity(
        gpu_type,
        tuple(GpuNode(name, allocatable, requested[name], excluded)
              for name, (allocatable, excluded) in sorted(matching.items())),
    )


# ---------------------------------------------------------------- the planner (pure)


@dataclass(frozen=True)
class CapacityDecision:
    # "Proceed": scale to the counts below; "Shift": scale the stable down to make room, the
    # canary up in the same step; "Wait": nothing fits now (condition Progressing=False).
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
) -> CapacityDecision:
    """Decide the next replica counts of a step that wants (target_stable, target_canary).

    One revision grows (the canary while progressing, the stable while aborting), the other
    shrinks or stays. Each pod the other revision gives up frees its GPUs on one node, so it is
    guaranteed to host `its GPUs // growing pod's GPUs` growing pods; nothing else is assumed.
    1. Every added pod fits in free GPUs plus what the step's own scale-down frees: proceed.
    2. Some fit: proceed with those, shrinking the other revision only as much as they need.
    3. None fit, `max_unavailable` >= 1 (the rollout may run a replica short while a pod
       starts): shift: take up to `max_unavailable` pods from the other revision (never its last
       one while it should still serve) and add the growing pods they make room for.
    4. Otherwise wait, reason InsufficientGPU, saying what is missing.
    The other revision never shrinks by more than the growing one can provably use, so a rollout
    cannot end with both revisions half-sized and the freed GPUs unusable.
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
        needed = add_canary * gpus_per_canary_replica + add_stable * stable_gpus
        return CapacityDecision("Wait", current_stable, current_canary, REASON_INSUFFICIENT_GPU,
                                f"needs {needed} more GPU(s) for {add_canary} canary and {add_stable} stable "
                                f"replica(s); {capacity.describe()}")

    growing_is_canary = add_canary > 0
    growing = _Side("canary", current_canary, target_canary, gpus_per_canary_replica)
    other = _Side("stable", current_stable, target_stable, stable_gpus)
    if not growing_is_canary:
        growing, other = _Side("stable", current_stable, target_stable, stable_gpus), \
            _Side("canary", current_canary, target_canary, gpus_per_canary_replica)

    def decide(action: str, grown: int, other_count: int, reason: str, message: str) -> CapacityDecision:
        if growing_is_canary:
            return CapacityDecision(action, other_count, grown, reason, message)
        return CapacityDecision(action, grown, other_count, reason, message)

    add = growing.target - growing.current
    fit_now = capacity.replicas_that_fit(growing.gpus)
    per_freed = other.gpus // growing.gpus
    planned_shrink = max(0, other.current - other.target)
    guaranteed = fit_now + planned_shrink * per_freed

    if add <= guaranteed:
        relying = "" if add <= fit_now else f" once {planned_shrink} {other.name} replica(s) release their GPUs"
        return decide("Proceed", growing.target, other.target, REASON_FITS,
                      f"{add} {growing.name} replica(s) of {growing.gpus} GPU(s) fit{relying}: {capacity.describe()}")

    if guaranteed > 0:
        shrink = _ceil_div(guaranteed - fit_now, per_freed) if guaranteed > fit_now else 0
        return decide("Proceed", growing.current + guaranteed, other.current - shrink, REASON_FITS,
                      f"{guaranteed} of {add} {growing.name} replica(s) fit now; the rest wait for GPUs: "
                      f"{capacity.describe()}")

    # Keep the other revision's last pod while it is meant to serve (target above 0).
    keep = 1 if other.target > 0 else 0
    shiftable = max(0, other.current - keep)
    if max_unavailable >= 1 and per_freed >= 1 and shiftable > 0:
        shrink = min(max_unavailable, shiftable, _ceil_div(add, per_freed))
        grow = min(add, shrink * per_freed)
        return decide(
            "Shift", growing.current + grow, other.current - shrink, REASON_SHIFTING,
            f"no free GPUs for the {growing.name} ({capacity.describe()}): scaling {other.name} "
            f"{other.current}->{other.current - shrink} to host {grow} {growing.name} replica(s) in its place",
        )

    why = ""
    if per_freed < 1:
        why = (f"; a {other.name} replica frees {other.gpus} GPU(s), less than one {growing.name} replica "
               f"needs ({growing.gpus}), so shifting could strand both revisions")
    elif max_unavailable < 1:
        why = f"; set maxUnavailable >= 1 to let the rollout shift GPUs from {other.name} to {growing.name}"
    elif shiftable == 0:
        why = f"; the {other.name} revision has no replica it can give up"
    return decide(
        "Wait", growing.current, other.current, REASON_INSUFFICIENT_GPU,
        f"needs {add * growing.gpus} more GPU(s) ({add} {growing.name} replica(s) x {growing.gpus}); "
        f"{capacity.describe()}{why}",
    )


@dataclass(frozen=True)
class _Side:
    name: str
    current: int
    target: int
    gpus: int


def _ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


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
