"""Traffic routers: how a canary weight becomes replica counts and (optionally) routing objects.

One small interface, `TrafficRouter.plan(total_replicas, canary_weight, current) -> TrafficPlan`:
- `ReplicaRatioRouter` (default, no mesh): stable and canary pods sit behind the one shared Service,
  so the weight is approximated by replica counts and the plan says what was achieved (1 canary of
  4 replicas = 25%). It moves towards the target in steps that honour maxSurge / maxUnavailable.
- `GatewayApiRouter`: renders a Gateway API `HTTPRoute` (gateway.networking.k8s.io/v1) whose
  backendRefs weights split traffic exactly between the stable and canary Services; the canary
  gets enough replicas for its share and the stable keeps its full size.

Settings come from `spec.rollout.canary.trafficRouting`: `{}` (replica ratio) or
`{gatewayAPI: {httpRoute: NAME, parentRef: {name, namespace}}}`. Pure: plans and manifests only.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Mapping

from digital_worker.runtime.contract import DEFAULT_PORT

GATEWAY_API_VERSION = "gateway.networking.k8s.io/v1"
MANAGED_BY_LABEL = {"app.kubernetes.io/managed-by": "digital-worker"}


@dataclass(frozen=True)
class ReplicaCounts:
    """Replicas per revision; `*_ready` default to the counts when readiness is not known."""

    stable: int
    canary: int
    stable_ready: int | None = None
    canary_ready: int | None = None

    @property
    def ready_stable(self) -> int:
        return self.stable if self.stable_ready is None else min(self.stable_ready, self.stable)

    @property
    def ready_canary(self) -> int:
        return self.canary if self.canary_ready is None else min(self.canary_ready, self.canary)


@dataclass(frozen=True)
class TrafficPlan:
    stable_replicas: int
    canary_replicas: int
    requested_weight: int
    # Percent of requests the canary gets once this plan's pods are ready.
    effective_weight: float
    # The router achieves the requested weight exactly (not an approximation by replica counts).
    exact: bool
    # Manifests to apply (server-side apply / create-or-patch) for this plan.
    objects: tuple[dict[str, Any], ...] = ()
    # True when this plan is the final target for the weight (no more surge steps to come).
    settled: bool = True
    message: str = ""


class TrafficRouter(ABC):
    name: str = "router"

    @abstractmethod
    def plan(self, total_replicas: int, canary_weight: int, current: ReplicaCounts | None = None) -> TrafficPlan:
        """Replica counts and objects that give the canary `canary_weight` percent of traffic,
        for a DigitalWorker of `total_replicas`, starting from `current` (None: jump to target)."""

    @abstractmethod
    def stable_floor(self, total_replicas: int, canary_weight: int) -> int:
        """The fewest stable replicas that still carry the stable's share at this weight (what a
        GPU-constrained rollout may shift the stable down to)."""

    @abstractmethod
    def for_counts(self, total_replicas: int, canary_weight: int, stable: int, canary: int,
                   ready_canary: int | None = None) -> TrafficPlan:
        """The traffic split when the revisions are held at (stable, canary) replicas, e.g. by GPU
        capacity, instead of what `plan` asked for: never more weight than the canary's (ready)
        pods can carry."""


def _check_inputs(total_replicas: int, canary_weight: int) -> None:
    if isinstance(total_replicas, bool) or not isinstance(total_replicas, int) or total_replicas < 0:
        raise ValueError(f"total replicas must be a whole number >= 0, got {total_replicas!r}")
    if isinstance(canary_weight, bool) or not isinstance(canary_weight, int) or not 0 <= canary_weight <= 100:
        raise ValueError(f"canary weight must be a whole number in 0..100, got {canary_weight!r}")


def canary_replicas_for_weight(total_replicas: int, canary_weight: int) -> int:
    """Replicas the canary needs to carry `canary_weight` percent of `total_replicas`' load:
    rounded up, and never 0 for a weight above 0 (a canary that gets no pod tests nothing)."""
    if canary_weight <= 0 or total_replicas <= 0:
        return 0
    return max(1, math.ceil(total_replicas * canary_weight / 100))


def resolve_int_or_percent(value: int | str | None, total: int, round_up: bool, field_name: str) -> int:
    """Kubernetes' IntOrString for maxSurge (round up) / maxUnavailable (round down)."""
    if value is None:
        return 0
    if isinstance(value, bool):
        raise ValueError(f"{field_name}: must be a number or a percentage, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{field_name}: must not be negative, got {value}")
        return value
    text = str(value).strip()
    if text.endswith("%"):
        try:
            percent = float(text[:-1])
        except ValueError:
            raise ValueError(f"{field_name}: not a percentage: {value!r}") from None
        if percent < 0:
            raise ValueError(f"{field_name}: must not be negative, got {value!r}")
        scaled = total * percent / 100
        return math.ceil(scaled) if round_up else math.floor(scaled)
    try:
        number = int(text)
    except ValueError:
        raise ValueError(f"{field_name}: must be a number or a percentage, got {value!r}") from None
    if number < 0:
        raise ValueError(f"{field_name}: must not be negative, got {value!r}")
    return number


def _weight_of(stable: int, canary: int) -> float:
    total = stable + canary
    return round(100.0 * canary / total, 2) if total else 0.0


# ---------------------------------------------------------------- replica ratio


@dataclass(frozen=True)
class ReplicaRatioRouter(TrafficRouter):
    """Weights by replica counts on the shared Service. maxSurge / maxUnavailable are as in a
    Deployment (int or "25%" of total replicas) and bound every step between two plans."""

    max_surge: int | str = 1
    max_unavailable: int | str = 0
    name: str = field(default="replicaRatio", init=False)

    def target(self, total_replicas: int, canary_weight: int) -> ReplicaCounts:
        """The split of `total_replicas` nearest to the weight (rounding half up), with at least
        one canary pod for a weight above 0 and one stable pod for a weight below 100."""
        if total_replicas <= 0 or canary_weight <= 0:
            return ReplicaCounts(stable=total_replicas, canary=0)
        if canary_weight >= 100:
            return ReplicaCounts(stable=0, canary=total_replicas)
        nearest = math.floor(total_replicas * canary_weight / 100 + 0.5)
        canary = min(max(1, nearest), max(1, total_replicas - 1))
        # With a single replica the stable still keeps one pod: two pods, 50/50, reported as such.
        stable = max(1, total_replicas - canary)
        return ReplicaCounts(stable=stable, canary=canary)

    def plan(self, total_replicas: int, canary_weight: int, current: ReplicaCounts | None = None) -> TrafficPlan:
        _check_inputs(total_replicas, canary_weight)
        target = self.target(total_replicas, canary_weight)
        if current is None:
            stable, canary = target.stable, target.canary
        else:
            stable, canary = self._step(total_replicas, target, current)
        effective = _weight_of(stable, canary)
        settled = (stable, canary) == (target.stable, target.canary)
        exact = math.isclose(effective, float(canary_weight), abs_tol=0.005)
        message = (
            f"{canary} canary / {stable} stable replica(s) on the shared Service: "
            f"{effective:g}% of traffic for a requested {canary_weight}%"
        )
        if not settled:
            message += f" (stepping towards {target.canary} canary / {target.stable} stable)"
        return TrafficPlan(stable, canary, canary_weight, effective, exact, (), settled, message)

    def stable_floor(self, total_replicas: int, canary_weight: int) -> int:
        return self.target(total_replicas, canary_weight).stable

    def for_counts(self, total_replicas: int, canary_weight: int, stable: int, canary: int,
                   ready_canary: int | None = None) -> TrafficPlan:
        # The shared Service only routes to ready pods by itself: counts are what we report.
        _check_inputs(total_replicas, canary_weight)
        target = self.target(total_replicas, canary_weight)
        effective = _weight_of(stable, canary)
        exact = math.isclose(effective, float(canary_weight), abs_tol=0.005)
        settled = (stable, canary) == (target.stable, target.canary)
        message = (f"held at {canary} canary / {stable} stable replica(s): {effective:g}% of traffic "
                   f"for a requested {canary_weight}%")
        return TrafficPlan(stable, canary, canary_weight, effective, exact, (), settled, message)

    def _step(self, total: int, target: ReplicaCounts, current: ReplicaCounts) -> tuple[int, int]:
        """One Deployment-style step from `current` towards `target`: scale-ups use the surge
        budget (pods above `total`), scale-downs keep `total - maxUnavailable` ready pods."""
        surge = resolve_int_or_percent(self.max_surge, total, True, "maxSurge")
        unavailable = resolve_int_or_percent(self.max_unavailable, total, False, "maxUnavailable")
        if surge == 0 and unavailable == 0 and total > 0:
            raise ValueError("maxSurge and maxUnavailable: both are 0, so no replica could ever move")
        stable, canary = current.stable, current.canary

        # Scale up first, within the surge budget (the revision scaling up is the incoming one:
        # the canary while progressing, the stable while aborting).
        budget = max(0, total + surge - (stable + canary))
        if target.canary > canary:
            grow = min(target.canary - canary, budget)
            canary += grow
            budget -= grow
        if target.stable > stable:
            stable += min(target.stable - stable, budget)

        # Then scale down, keeping enough ready pods; only pods already ready count, so a canary
        # still starting does not let the stable shrink.
        min_available = max(0, total - unavailable)
        if target.stable < stable:
            stable = min(stable, max(target.stable, min_available - current.ready_canary))
        if target.canary < canary:
            ready_stable = min(current.ready_stable, stable)
            canary = min(canary, max(target.canary, min_available - ready_stable))
        return stable, canary


# ---------------------------------------------------------------- Gateway API


@dataclass(frozen=True)
class ParentRef:
    name: str
    namespace: str | None = None
    section_name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        ref: dict[str, Any] = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": self.name}
        if self.namespace:
            ref["namespace"] = self.namespace
        if self.section_name:
            ref["sectionName"] = self.section_name
        return ref


@dataclass(frozen=True)
class GatewayApiRouter(TrafficRouter):
    """Exact weights through an HTTPRoute's backendRefs to the stable and canary Services."""

    http_route: str
    namespace: str
    parent_ref: ParentRef
    stable_service: str
    canary_service: str
    port: int = DEFAULT_PORT
    hostnames: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    owner_references: tuple[Mapping[str, Any], ...] = ()
    name: str = field(default="gatewayAPI", init=False)

    def plan(self, total_replicas: int, canary_weight: int, current: ReplicaCounts | None = None) -> TrafficPlan:
        """Exact weights; with `current`, the route only sends the canary what its *ready* pods
        can carry (a Service without ready endpoints would answer errors), so the weight climbs
        to the requested one as canary pods become ready."""
        _check_inputs(total_replicas, canary_weight)
        canary = canary_replicas_for_weight(total_replicas, canary_weight)
        # The stable keeps its full size until the canary takes all traffic: its share may shrink
        # but its pods stay warm for an instant rollback.
        stable = total_replicas if canary_weight < 100 else 0
        weight = canary_weight
        if current is not None:
            weight = _weight_carried(canary_weight, canary, current.ready_canary)
            if canary_weight >= 100 and weight < 100:
                stable = max(stable, current.stable)  # keep serving until the canary can take it all
        carriers = current.ready_canary if current is not None else canary
        return self._plan(total_replicas, canary_weight, weight, stable, canary, weight == canary_weight,
                          f"{carriers} ready canary replica(s)")

    def stable_floor(self, total_replicas: int, canary_weight: int) -> int:
        return math.ceil(total_replicas * (100 - canary_weight) / 100)

    def for_counts(self, total_replicas: int, canary_weight: int, stable: int, canary: int,
                   ready_canary: int | None = None) -> TrafficPlan:
        _check_inputs(total_replicas, canary_weight)
        needed = canary_replicas_for_weight(total_replicas, canary_weight)
        carriers = canary if ready_canary is None else min(canary, ready_canary)
        weight = _weight_carried(canary_weight, needed, carriers)
        if stable == 0 and canary > 0:
            weight = 100  # the stable is gone (a shift at full promotion): nothing else to send to
        target_stable = total_replicas if canary_weight < 100 else 0
        settled = weight == canary_weight and (stable, canary) == (target_stable, needed)
        label = "canary replica(s)" if ready_canary is None else "ready canary replica(s)"
        return self._plan(total_replicas, canary_weight, weight, stable, canary, settled, f"{carriers} {label}")

    def _plan(self, total: int, requested: int, weight: int, stable: int, canary: int, settled: bool,
              carriers: str) -> TrafficPlan:
        message = (
            f"HTTPRoute {self.namespace}/{self.http_route}: {weight}% to {self.canary_service}, "
            f"{100 - weight}% to {self.stable_service}"
        )
        if weight != requested:
            message += f" (requested {requested}%: held to what {carriers} can carry)"
        return TrafficPlan(stable, canary, requested, float(weight), weight == requested,
                           (self.render_route(weight),), settled, message)

    def render_route(self, canary_weight: int) -> dict[str, Any]:
        metadata: dict[str, Any] = {
            "name": self.http_route,
            "namespace": self.namespace,
            "labels": {**MANAGED_BY_LABEL, **dict(self.labels)},
        }
        if self.owner_references:
            metadata["ownerReferences"] = [dict(reference) for reference in self.owner_references]
        spec: dict[str, Any] = {
            "parentRefs": [self.parent_ref.to_dict()],
            "rules": [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                    # Both backends are always listed, so changing the split only changes weights.
                    "backendRefs": [
                        self._backend(self.stable_service, 100 - canary_weight),
                        self._backend(self.canary_service, canary_weight),
                    ],
                }
            ],
        }
        if self.hostnames:
            spec["hostnames"] = list(self.hostnames)
        return {"apiVersion": GATEWAY_API_VERSION, "kind": "HTTPRoute", "metadata": metadata, "spec": spec}

    def _backend(self, service: str, weight: int) -> dict[str, Any]:
        return {"group": "", "kind": "Service", "name": service, "port": self.port, "weight": weight}


def _weight_carried(requested: int, needed: int, available: int) -> int:
    """The share `available` canary pods can carry of a weight that needs `needed` of them."""
    if needed <= 0 or available >= needed:
        return requested
    return requested * max(0, available) // needed


# ---------------------------------------------------------------- settings


def router_from_settings(
    traffic_routing: Mapping[str, Any] | None,
    *,
    namespace: str,
    stable_service: str,
    canary_service: str,
    port: int = DEFAULT_PORT,
    max_surge: int | str = 1,
    max_unavailable: int | str = 0,
    labels: Mapping[str, str] | None = None,
    owner_references: tuple[Mapping[str, Any], ...] = (),
) -> TrafficRouter:
    """The router `spec.rollout.canary.trafficRouting` asks for; ValueError names a bad field."""
    settings = dict(traffic_routing or {})
    unknown = sorted(set(settings) - {"gatewayAPI"})
    if unknown:
        raise ValueError(f"trafficRouting.{unknown[0]}: unknown router (known: gatewayAPI, or {{}} for replica ratio)")
    if "gatewayAPI" not in settings:
        # Validate now so a bad maxSurge is reported when the spec is read, not mid-rollout.
        resolve_int_or_percent(max_surge, 100, True, "maxSurge")
        resolve_int_or_percent(max_unavailable, 100, False, "maxUnavailable")
        return ReplicaRatioRouter(max_surge=max_surge, max_unavailable=max_unavailable)
    gateway = settings["gatewayAPI"]
    if not isinstance(gateway, Mapping):
        raise ValueError("trafficRouting.gatewayAPI: must be an object")
    route = gateway.get("httpRoute")
    if not isinstance(route, str) or not route:
        raise ValueError("trafficRouting.gatewayAPI.httpRoute: required (the HTTPRoute's name)")
    parent = gateway.get("parentRef")
    if not isinstance(parent, Mapping) or not isinstance(parent.get("name"), str) or not parent.get("name"):
        raise ValueError("trafficRouting.gatewayAPI.parentRef.name: required (the Gateway's name)")
    parent_namespace = parent.get("namespace")
    if parent_namespace is not None and not isinstance(parent_namespace, str):
        raise ValueError("trafficRouting.gatewayAPI.parentRef.namespace: must be a string")
    hostnames = gateway.get("hostnames") or ()
    if not isinstance(hostnames, (list, tuple)) or not all(isinstance(h, str) for h in hostnames):
        raise ValueError("trafficRouting.gatewayAPI.hostnames: must be a list of strings")
    return GatewayApiRouter(
        http_route=route,
        namespace=namespace,
        parent_ref=ParentRef(parent["name"], parent_namespace, parent.get("sectionName")),
        stable_service=stable_service,
        canary_service=canary_service,
        port=port,
        hostnames=tuple(hostnames),
        labels=dict(labels or {}),
        owner_references=tuple(owner_references),
    )
