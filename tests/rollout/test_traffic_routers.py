"""Traffic routers (pure): replica-ratio targets and surge/unavailable steps, HTTPRoute rendering."""
from __future__ import annotations

import pytest
import yaml

from digital_worker.operator.traffic import (
    GatewayApiRouter,
    ParentRef,
    ReplicaCounts,
    ReplicaRatioRouter,
    TrafficRouter,
    canary_replicas_for_weight,
    resolve_int_or_percent,
    router_from_settings,
)


# ---------------------------------------------------------------- replica ratio targets


@pytest.mark.parametrize(
    ("total", "weight", "stable", "canary", "effective"),
    [
        (4, 25, 3, 1, 25.0),
        (4, 50, 2, 2, 50.0),
        (10, 10, 9, 1, 10.0),
        (10, 15, 8, 2, 20.0),  # nearest split, reported as 20%
        (3, 10, 2, 1, 33.33),  # never 0 canary pods for a weight above 0
        (1, 50, 1, 1, 50.0),  # a single replica: the stable keeps its pod
        (2, 90, 1, 1, 50.0),  # ...and keeps serving below 100%
        (4, 0, 4, 0, 0.0),
        (4, 100, 0, 4, 100.0),
        (0, 50, 0, 0, 0.0),
    ],
)
def test_replica_ratio_targets_and_effective_weight(total, weight, stable, canary, effective):
    plan = ReplicaRatioRouter().plan(total, weight)
    assert (plan.stable_replicas, plan.canary_replicas) == (stable, canary)
    assert plan.effective_weight == effective
    assert plan.exact is (effective == weight)
    assert plan.objects == () and plan.settled
    assert f"{effective:g}% of traffic for a requested {weight}%" in plan.message


def test_replica_ratio_effective_weight_error_is_bounded_by_half_a_replica():
    router = ReplicaRatioRouter()
    for total in range(2, 21):
        for weight in range(1, 100):
            plan = router.plan(total, weight)
            assert plan.canary_replicas >= 1 and plan.stable_replicas >= 1
            assert plan.stable_replicas + plan.canary_replicas == total
            if 100 / total <= weight <= 100 - 100 / total:
                assert abs(plan.effective_weight - weight) <= 50 / total + 0.01


def step_until_settled(router: ReplicaRatioRouter, total: int, weight: int, start: ReplicaCounts, max_steps=20):
    """Apply plans as if every pod became ready at once; return the sequence of counts."""
    counts = start
    seen = []
    for _ in range(max_steps):
        plan = router.plan(total, weight, counts)
        seen.append((plan.stable_replicas, plan.canary_replicas))
        counts = ReplicaCounts(plan.stable_replicas, plan.canary_replicas)
        if plan.settled:
            return seen
    raise AssertionError(f"never settled: {seen}")


@pytest.mark.parametrize(
    ("surge", "unavailable", "expected"),
    [
        (1, 0, [(4, 1), (3, 1)]),  # surge first, then the stable shrinks once the canary is ready
        (0, 1, [(3, 0), (3, 1)]),  # no surge: make room first
        ("25%", "25%", [(3, 1)]),
        (2, 0, [(4, 1), (3, 1)]),
    ],
)
def test_replica_ratio_steps_honour_surge_and_unavailable(surge, unavailable, expected):
    router = ReplicaRatioRouter(max_surge=surge, max_unavailable=unavailable)
    assert step_until_settled(router, 4, 25, ReplicaCounts(4, 0)) == expected


def test_replica_ratio_full_rollout_never_exceeds_bounds():
    total, surge, unavailable = 8, 2, 1
    router = ReplicaRatioRouter(max_surge=surge, max_unavailable=unavailable)
    counts = ReplicaCounts(total, 0)
    for weight in (10, 25, 50, 75, 100):
        for stable, canary in step_until_settled(router, total, weight, counts):
            assert stable + canary <= total + surge
            assert stable + canary >= total - unavailable
            counts = ReplicaCounts(stable, canary)
    assert (counts.stable, counts.canary) == (0, total)


def test_replica_ratio_waits_for_canary_readiness_before_shrinking_stable():
    router = ReplicaRatioRouter(max_surge=1, max_unavailable=0)
    first = router.plan(4, 25, ReplicaCounts(4, 0))
    assert (first.stable_replicas, first.canary_replicas) == (4, 1) and not first.settled
    assert first.effective_weight == 20.0 and "stepping towards" in first.message
    waiting = router.plan(4, 25, ReplicaCounts(4, 1, stable_ready=4, canary_ready=0))
    assert (waiting.stable_replicas, waiting.canary_replicas) == (4, 1)
    ready = router.plan(4, 25, ReplicaCounts(4, 1, stable_ready=4, canary_ready=1))
    assert (ready.stable_replicas, ready.canary_replicas) == (3, 1) and ready.settled


def test_replica_ratio_abort_brings_the_stable_back_first():
    router = ReplicaRatioRouter(max_surge=1, max_unavailable=0)
    steps = step_until_settled(router, 4, 0, ReplicaCounts(2, 2))
    assert steps == [(3, 2), (3, 1), (4, 1), (4, 0)]


def test_replica_ratio_refuses_zero_surge_and_zero_unavailable():
    with pytest.raises(ValueError, match="maxSurge and maxUnavailable"):
        ReplicaRatioRouter(max_surge=0, max_unavailable=0).plan(4, 25, ReplicaCounts(4, 0))


@pytest.mark.parametrize(("total", "weight"), [(-1, 10), (4, 101), (4, -1), (4, 12.5), (True, 10)])
def test_routers_refuse_bad_inputs(total, weight):
    with pytest.raises(ValueError):
        ReplicaRatioRouter().plan(total, weight)
    with pytest.raises(ValueError):
        gateway_router().plan(total, weight)


@pytest.mark.parametrize(
    ("value", "total", "round_up", "expected"),
    [(1, 10, True, 1), ("25%", 10, True, 3), ("25%", 10, False, 2), ("0%", 10, True, 0), ("3", 10, True, 3),
     (None, 10, True, 0)],
)
def test_int_or_percent(value, total, round_up, expected):
    assert resolve_int_or_percent(value, total, round_up, "maxSurge") == expected


@pytest.mark.parametrize("value", [-1, "-5%", "abc", "x%", True])
def test_int_or_percent_rejects(value):
    with pytest.raises(ValueError, match="maxSurge"):
        resolve_int_or_percent(value, 10, True, "maxSurge")


# ---------------------------------------------------------------- Gateway API


def gateway_router(**overrides) -> GatewayApiRouter:
    settings = dict(
        http_route="helpdesk", namespace="team-a", parent_ref=ParentRef("public", "gateways"),
        stable_service="helpdesk-stable", canary_service="helpdesk-canary", port=30000,
    )
    settings.update(overrides)
    return GatewayApiRouter(**settings)


@pytest.mark.parametrize(("weight", "canary"), [(0, 0), (1, 1), (10, 1), (25, 1), (30, 2), (50, 2), (100, 4)])
def test_gateway_router_exact_weights_and_canary_capacity(weight, canary):
    plan = gateway_router().plan(4, weight)
    assert plan.exact and plan.effective_weight == weight and plan.settled
    assert plan.canary_replicas == canary == canary_replicas_for_weight(4, weight)
    # The stable keeps its full size until the canary takes everything.
    assert plan.stable_replicas == (4 if weight < 100 else 0)
    (route,) = plan.objects
    backends = route["spec"]["rules"][0]["backendRefs"]
    assert [(b["name"], b["weight"]) for b in backends] == [
        ("helpdesk-stable", 100 - weight), ("helpdesk-canary", weight)]


def test_gateway_route_manifest():
    router = gateway_router(hostnames=("helpdesk.example.com",), labels={"digitalworker.io/instance": "helpdesk"},
                            owner_references=({"apiVersion": "digitalworker.io/v1alpha1", "kind": "DigitalWorker",
                                               "name": "helpdesk", "uid": "u-1", "controller": True},))
    route = router.plan(10, 20).objects[0]
    # Round-trips through YAML (what kubectl / the API receive) unchanged.
    assert yaml.safe_load(yaml.safe_dump(route)) == route
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1" and route["kind"] == "HTTPRoute"
    assert route["metadata"]["name"] == "helpdesk" and route["metadata"]["namespace"] == "team-a"
    assert route["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "digital-worker",
                                           "digitalworker.io/instance": "helpdesk"}
    assert route["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    assert route["spec"]["parentRefs"] == [
        {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "public", "namespace": "gateways"}]
    assert route["spec"]["hostnames"] == ["helpdesk.example.com"]
    for backend in route["spec"]["rules"][0]["backendRefs"]:
        assert backend["kind"] == "Service" and backend["group"] == "" and backend["port"] == 30000
    assert sum(b["weight"] for b in route["spec"]["rules"][0]["backendRefs"]) == 100


def test_gateway_route_only_weights_change_between_steps():
    router = gateway_router()
    first, second = router.render_route(10), router.render_route(50)
    first_backends = first["spec"]["rules"][0].pop("backendRefs")
    second_backends = second["spec"]["rules"][0].pop("backendRefs")
    assert first == second
    assert [b["weight"] for b in first_backends] == [90, 10] and [b["weight"] for b in second_backends] == [50, 50]


# ---------------------------------------------------------------- settings


def test_router_from_settings_picks_the_router():
    common = dict(namespace="team-a", stable_service="s", canary_service="c")
    assert isinstance(router_from_settings({}, **common), ReplicaRatioRouter)
    assert isinstance(router_from_settings(None, **common), ReplicaRatioRouter)
    ratio = router_from_settings({}, max_surge="50%", max_unavailable=1, **common)
    assert ratio == ReplicaRatioRouter(max_surge="50%", max_unavailable=1)
    gateway = router_from_settings(
        {"gatewayAPI": {"httpRoute": "r", "parentRef": {"name": "gw", "namespace": "infra"}}}, port=8080, **common)
    assert isinstance(gateway, GatewayApiRouter) and isinstance(gateway, TrafficRouter)
    assert gateway.parent_ref == ParentRef("gw", "infra") and gateway.port == 8080
    assert gateway.plan(2, 50).objects[0]["spec"]["parentRefs"][0]["namespace"] == "infra"


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"istio": {}}, "trafficRouting.istio"),
        ({"gatewayAPI": "r"}, "trafficRouting.gatewayAPI"),
        ({"gatewayAPI": {"parentRef": {"name": "gw"}}}, "trafficRouting.gatewayAPI.httpRoute"),
        ({"gatewayAPI": {"httpRoute": "r"}}, "trafficRouting.gatewayAPI.parentRef.name"),
        ({"gatewayAPI": {"httpRoute": "r", "parentRef": {"name": "gw", "namespace": 3}}},
         "trafficRouting.gatewayAPI.parentRef.namespace"),
        ({"gatewayAPI": {"httpRoute": "r", "parentRef": {"name": "gw"}, "hostnames": "h"}},
         "trafficRouting.gatewayAPI.hostnames"),
    ],
)
def test_router_from_settings_names_the_bad_field(settings, field):
    with pytest.raises(ValueError) as error:
        router_from_settings(settings, namespace="n", stable_service="s", canary_service="c")
    assert str(error.value).startswith(field + ":")


def test_router_from_settings_validates_surge_early():
    with pytest.raises(ValueError, match="maxSurge"):
        router_from_settings({}, namespace="n", stable_service="s", canary_service="c", max_surge="lots")


# ---------------------------------------------------------------- readiness and held counts


def test_gateway_weight_climbs_with_ready_canary_pods():
    router = gateway_router()
    weights = []
    for ready in (0, 1, 2):
        plan = router.plan(4, 50, ReplicaCounts(4, 2, stable_ready=4, canary_ready=ready))
        backends = plan.objects[0]["spec"]["rules"][0]["backendRefs"]
        assert backends[1]["weight"] == plan.effective_weight and backends[0]["weight"] == 100 - plan.effective_weight
        assert (plan.stable_replicas, plan.canary_replicas) == (4, 2)
        weights.append((plan.effective_weight, plan.exact, plan.settled))
    assert weights == [(0.0, False, False), (25.0, False, False), (50.0, True, True)]
    assert "1 ready canary replica(s)" in router.plan(4, 50, ReplicaCounts(4, 2, 4, 1)).message


def test_gateway_full_promotion_keeps_the_stable_until_the_canary_is_ready():
    router = gateway_router()
    waiting = router.plan(4, 100, ReplicaCounts(4, 4, stable_ready=4, canary_ready=2))
    assert (waiting.stable_replicas, waiting.canary_replicas, waiting.effective_weight) == (4, 4, 50.0)
    done = router.plan(4, 100, ReplicaCounts(4, 4, stable_ready=4, canary_ready=4))
    assert (done.stable_replicas, done.canary_replicas, done.effective_weight, done.settled) == (0, 4, 100.0, True)


def test_for_counts_reports_what_held_replicas_achieve():
    ratio = ReplicaRatioRouter()
    held = ratio.for_counts(4, 50, stable=3, canary=1)
    assert (held.effective_weight, held.exact, held.settled) == (25.0, False, False)
    assert ratio.for_counts(4, 50, stable=2, canary=2).settled
    gateway = gateway_router()
    held = gateway.for_counts(10, 30, stable=10, canary=1)  # 30% needs 3 canary replicas
    assert held.effective_weight == 10.0 and not held.exact and not held.settled
    assert held.objects[0]["spec"]["rules"][0]["backendRefs"][1]["weight"] == 10
    assert gateway.for_counts(10, 30, stable=10, canary=3).settled
    assert gateway.for_counts(10, 30, stable=10, canary=0).effective_weight == 0.0
