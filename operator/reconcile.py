"""One reconcile pass for one DigitalWorker: level-triggered, idempotent, plain Python (no kopf).

`reconcile()` validates, then runs the steps in order (Argo Rollouts style); each step may end the
pass early. Children are applied idempotently: created when missing, patched only when what we
manage differs from what is there (drift), never touched otherwise. Status is built in memory and
returned; the caller patches it once and posts the events.

Interim rollout behaviour (until the rollout strategies take over): a new revision comes up beside
the old one at full size, and the old revision is deleted once the new one is fully ready.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any, Callable

from digital_worker.operator import render
from digital_worker.operator import schema as api
from digital_worker.operator.fallback import reconcile_fallback
from digital_worker.operator.kube import Conflict, KubeClient, NotFound
from digital_worker.operator.spec import normalize_spec, validate

CHILD_KINDS = (
    ("v1", "configmaps"),
    ("apps/v1", "deployments"),
    ("v1", "services"),
    ("policy/v1", "poddisruptionbudgets"),
)


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass
class Observed:
    """The children that exist now, by kind plural."""

    children: dict[str, list[dict[str, Any]]]

    def of(self, plural: str) -> list[dict[str, Any]]:
        return self.children.get(plural, [])

    def named(self, plural: str, name: str) -> dict[str, Any] | None:
        for obj in self.of(plural):
            if obj["metadata"]["name"] == name:
                return obj
        return None


@dataclass
class Context:
    body: dict[str, Any]
    client: KubeClient
    observed: Observed
    now: Callable[[], str]
    spec: dict[str, Any] = field(default_factory=dict)
    revision: str = ""
    status: dict[str, Any] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    changes: int = 0
    prometheus_url: str | None = None  # for rollout analysis
    # Rollout analysis without Prometheus (the embedded default's in-process scraper); with neither,
    # analyses cannot measure and pause.
    analysis_provider: Any = None
    # Which pods the stable Service selects; None: every pod of the worker (replica-ratio canary).
    # Set by steps that route traffic: blue-green (active revision), the fallback breaker.
    service_selector: dict[str, str] | None = None

    @property
    def name(self) -> str:
        return self.body["metadata"]["name"]

    @property
    def namespace(self) -> str:
        return self.body["metadata"]["namespace"]


@dataclass(frozen=True)
class Result:
    status: dict[str, Any]
    events: list[Event]
    changes: int
    # True after a first pass that only applied the revision (see `reconcile(first_pass=True)`): the
    # status and the rest of the children come with the next, full pass.
    partial: bool = False


def utc_now() -> str:
    return datetime.datetime.now(tz=datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def observe(client: KubeClient, namespace: str, name: str) -> Observed:
    selector = render.selector_string(name)
    return Observed({plural: client.list(api_version, plural, namespace, selector) for api_version, plural in CHILD_KINDS})


def reconcile(body: dict[str, Any], client: KubeClient, observed: Observed | None = None,
              now: Callable[[], str] = utc_now, prometheus_url: str | None = None,
              analysis_provider: Any = None, first_pass: bool = False) -> Result:
    """One pass. `first_pass` (a worker never reconciled) applies only what serves, the revision's
    ConfigMap and Deployment, so that with many new workers each gets its pods soon; the caller
    follows up with a full pass for the Service, PDB, status and Events."""
    meta = body["metadata"]
    ctx = Context(body=body, client=client, now=now, prometheus_url=prometheus_url,
                  analysis_provider=analysis_provider,
                  observed=observed or observe(client, meta["namespace"], meta["name"]))
    if first_pass:
        if reconcile_spec(ctx) is not STOP:
            reconcile_revision(ctx)
            return Result(status={}, events=ctx.events, changes=ctx.changes, partial=True)
        return Result(status=build_status(ctx), events=ctx.events, changes=ctx.changes)
    for step in (reconcile_spec, reconcile_strategy, reconcile_fallback, reconcile_service, reconcile_pdb):
        if step(ctx) is STOP:
            break
    return Result(status=build_status(ctx), events=ctx.events, changes=ctx.changes)


STOP = object()


# --- steps ------------------------------------------------------------------------------------

def reconcile_spec(ctx: Context) -> object | None:
    """Invalid specs stop the pass before anything is applied: no half-applied revision, ever."""
    if ctx.body["metadata"].get("deletionTimestamp"):
        ctx.status["deleting"] = True  # children go with it (ownerReferences): never recreate them now
        return STOP
    problems = validate(ctx.body)
    if problems:
        ctx.status["invalid"] = problems
        previous = (ctx.body.get("status") or {}).get("message", "")
        message = "invalid spec: " + "; ".join(problems)
        if previous != message:
            ctx.events.append(Event("Warning", "InvalidSpec", message))
        return STOP
    ctx.spec, _ = normalize_spec(ctx.body["spec"])
    ctx.revision = render.revision_hash(ctx.spec)
    if ctx.spec.get("paused"):
        ctx.status["paused"] = True
        return STOP
    return None


def reconcile_strategy(ctx: Context) -> object | None:
    """A rollout (canary or blue-green) when a stable revision serves and the spec asks for another;
    otherwise the plain path (the first revision, or an undo back to a still-warm one): the revision
    at full size, other revisions deleted once it is ready."""
    from digital_worker.operator import bluegreen, rollout

    strategy = (ctx.spec.get("rollout") or {}).get("strategy", rollout.CANARY)
    if strategy == rollout.BLUE_GREEN:
        ctx.service_selector = bluegreen.active_selector(ctx.name, ctx.revision)
    stable = rollout_from(ctx)
    if stable is not None:
        delete_intermediate_revisions(ctx, stable)
        if strategy == rollout.BLUE_GREEN:
            bluegreen.reconcile_bluegreen(ctx, stable)
        else:
            rollout.reconcile_canary(ctx, stable)
        return None
    reconcile_revision(ctx)
    if strategy == rollout.CANARY and (ctx.spec.get("rollout", {}).get("canary") or {}).get("trafficRouting"):
        ready = (ctx.observed.named("deployments", render.revision_name(ctx.name, ctx.revision)) or {})
        if (ready.get("status") or {}).get("readyReplicas"):  # route only once something can answer
            rollout._apply_route(ctx, rollout.canary_router(ctx), ctx.revision, 0)
    return reconcile_old_revisions(ctx)


def rollout_from(ctx: Context) -> str | None:
    """The stable revision a rollout starts from, or None when no rollout applies."""
    if not ctx.spec.get("rollout"):
        return None
    stable = (ctx.body.get("status") or {}).get("stableRevision")
    if not stable or stable == ctx.revision:
        return None
    if ctx.observed.named("deployments", render.revision_name(ctx.name, stable)) is None:
        return None  # the stable revision is gone: nothing to protect, roll straight to the new one
    return stable


def delete_intermediate_revisions(ctx: Context, stable: str) -> None:
    """A spec changed again mid-rollout: the revision in between serves nobody any more."""
    keep = {render.revision_name(ctx.name, stable), render.revision_name(ctx.name, ctx.revision)}
    for deployment in list(ctx.observed.of("deployments")):
        name = deployment["metadata"]["name"]
        if name not in keep:
            ctx.client.delete("apps/v1", "deployments", ctx.namespace, name)
            ctx.client.delete("v1", "configmaps", ctx.namespace, name)
            ctx.observed.children["deployments"].remove(deployment)
            ctx.changes += 1
            ctx.events.append(Event("Normal", "RevisionReplaced",
                                    f"revision {revision_of(deployment)} superseded by {ctx.revision} mid-rollout"))


def reconcile_revision(ctx: Context) -> object | None:
    """The current revision's ConfigMap and Deployment, at the desired size."""
    apply(ctx, render.render_configmap(ctx.body, ctx.spec, ctx.revision))
    desired = render.render_deployment(ctx.body, ctx.spec, ctx.revision, desired_replicas(ctx))
    created = apply(ctx, desired)
    if created and not already_applied(ctx):
        ctx.events.append(Event("Normal", "RevisionCreated",
                                f"revision {ctx.revision} ({desired['metadata']['name']}) created with "
                                f"{desired['spec']['replicas']} replica(s)"))
    return None


def reconcile_old_revisions(ctx: Context) -> object | None:
    """Interim strategy: old revisions go once the current one is fully ready (or wanted at size 0)."""
    current_name = render.revision_name(ctx.name, ctx.revision)
    old = [d for d in ctx.observed.of("deployments") if d["metadata"]["name"] != current_name]
    if not old:
        return None
    current = ctx.observed.named("deployments", current_name)
    wanted = desired_replicas(ctx)
    ready = (current or {}).get("status", {}).get("readyReplicas", 0) or 0
    if current is None or ready < wanted:
        return None
    for deployment in old:
        old_name = deployment["metadata"]["name"]
        ctx.client.delete("apps/v1", "deployments", ctx.namespace, old_name)
        ctx.client.delete("v1", "configmaps", ctx.namespace, old_name)
        ctx.changes += 1
        ctx.events.append(Event("Normal", "RevisionReplaced",
                                f"revision {revision_of(deployment)} replaced by {ctx.revision}"))
    ctx.observed.children["deployments"] = [d for d in ctx.observed.of("deployments") if d not in old]
    return None


def reconcile_service(ctx: Context) -> object | None:
    """The stable Service, selecting what the routing steps chose (ctx.service_selector). A selector
    change is a traffic switch (blue-green, the fallback breaker), not drift: it is patched whole,
    with the keys no longer wanted set to null (a merge patch would keep them and pin traffic)."""
    desired = render.render_service(ctx.body, ctx.service_selector)
    name = desired["metadata"]["name"]
    actual = ctx.observed.named("services", name)
    wanted = desired["spec"]["selector"]
    current = ((actual or {}).get("spec") or {}).get("selector") or {}
    if actual is not None and current != wanted:
        ctx.client.patch("v1", "services", ctx.namespace, name,
                         {"spec": {"selector": {**{key: None for key in current if key not in wanted}, **wanted}}})
        ctx.changes += 1
        switched = {**actual, "spec": {**(actual.get("spec") or {}), "selector": dict(wanted)}}
        ctx.observed.children["services"] = [switched if s is actual else s for s in ctx.observed.of("services")]
    apply(ctx, desired)
    return None


def reconcile_pdb(ctx: Context) -> object | None:
    apply(ctx, render.render_pdb(ctx.body))
    return None


# --- helpers ------------------------------------------------------------------------------------

def desired_replicas(ctx: Context) -> int:
    return int(ctx.spec.get("replicas", 1))


def revision_of(obj: dict[str, Any]) -> str:
    return (obj["metadata"].get("labels") or {}).get(api.LABEL_REVISION, "")


def is_subset(desired: Any, actual: Any) -> bool:
    """Whether everything we manage (desired) is present and equal in actual; extra fields are fine."""
    if isinstance(desired, dict):
        return isinstance(actual, dict) and all(is_subset(v, actual.get(k)) for k, v in desired.items())
    if isinstance(desired, list):
        return isinstance(actual, list) and len(desired) == len(actual) and \
            all(is_subset(d, a) for d, a in zip(desired, actual))
    if isinstance(desired, (int, float)) and isinstance(actual, str) or isinstance(desired, str) and isinstance(actual, (int, float)):
        return str(desired) == str(actual)
    return desired == actual


def _managed(obj: dict[str, Any]) -> dict[str, Any]:
    """The parts of a child we own: everything we render except status."""
    return {key: value for key, value in obj.items() if key not in ("status",)}


def apply(ctx: Context, desired: dict[str, Any]) -> bool:
    """Create `desired` or bring the live object back to it. Returns True when it was created."""
    from digital_worker.operator.kube import plural_of

    plural = plural_of(desired["kind"])
    name = desired["metadata"]["name"]
    actual = ctx.observed.named(plural, name)
    if actual is None:
        try:
            created = ctx.client.create(desired)
        except Conflict:  # created meanwhile (our view lagged): fall through to a patch
            actual = ctx.client.get(desired["apiVersion"], plural, ctx.namespace, name) or {}
        else:
            ctx.observed.children.setdefault(plural, []).append(created or desired)
            ctx.changes += 1
            if already_applied(ctx):
                ctx.events.append(Event("Normal", "DriftRepaired", f"{desired['kind']} {name} was missing: recreated"))
            return True
    managed = _managed(desired)
    if is_subset(managed, actual):
        return False
    try:
        ctx.client.patch(desired["apiVersion"], plural, ctx.namespace, name, managed)
    except NotFound:
        ctx.client.create(desired)
    ctx.changes += 1
    # A new replica count is scaling (spec.replicas, the autoscaler, a rollout step), not drift.
    if already_applied(ctx) and not is_subset(_without_replicas(managed), _without_replicas(actual)):
        ctx.events.append(Event("Normal", "DriftRepaired", f"{desired['kind']} {name} had drifted: restored"))
    return False


def _without_replicas(obj: dict[str, Any]) -> dict[str, Any]:
    spec = obj.get("spec")
    if not isinstance(spec, dict) or "replicas" not in spec:
        return obj
    return {**obj, "spec": {key: value for key, value in spec.items() if key != "replicas"}}


def already_applied(ctx: Context) -> bool:
    """Whether an earlier pass applied this revision: then a missing or different child is drift."""
    return (ctx.body.get("status") or {}).get("currentRevision") == ctx.revision


# --- status ---------------------------------------------------------------------------------------

def _condition(ctx: Context, type_: str, status: bool, reason: str, message: str) -> dict[str, Any]:
    previous = {c.get("type"): c for c in (ctx.body.get("status") or {}).get("conditions", [])}
    value = "True" if status else "False"
    old = previous.get(type_)
    changed = old is None or old.get("status") != value
    return {
        "type": type_, "status": value, "reason": reason, "message": message,
        "lastTransitionTime": ctx.now() if changed else old.get("lastTransitionTime", ctx.now()),
        "observedGeneration": ctx.body["metadata"].get("generation", 1),
    }


def build_status(ctx: Context) -> dict[str, Any]:
    """The whole status, from what was observed and done in this pass (fields say who sets them in the CRD)."""
    old_status = ctx.body.get("status") or {}
    if ctx.status.get("deleting"):
        return old_status
    generation = ctx.body["metadata"].get("generation", 1)
    base = {
        "observedGeneration": generation,
        "selector": render.selector_string(ctx.name),
        "endpoint": render.endpoint_url(ctx.body),
    }
    if "invalid" in ctx.status:
        message = "invalid spec: " + "; ".join(ctx.status["invalid"])
        return {
            **base,
            "phase": "Degraded",
            "message": message,
            "replicas": old_status.get("replicas", 0), "readyReplicas": old_status.get("readyReplicas", 0),
            "desiredReplicas": old_status.get("desiredReplicas", 0),
            "conditions": [
                _condition(ctx, "Available", bool(old_status.get("readyReplicas")), "InvalidSpec",
                           "previous revision keeps serving" if old_status.get("readyReplicas") else "nothing serves"),
                _condition(ctx, "Progressing", False, "InvalidSpec", "fix the spec to continue"),
                _condition(ctx, "Degraded", True, "InvalidSpec", message),
            ],
        }
    deployments = ctx.observed.of("deployments")
    revisions = []
    total = ready = 0
    for deployment in sorted(deployments, key=lambda d: d["metadata"]["name"]):
        status = deployment.get("status") or {}
        replicas, ready_replicas = status.get("replicas", 0) or 0, status.get("readyReplicas", 0) or 0
        total += replicas
        ready += ready_replicas
        revisions.append({"revision": revision_of(deployment), "deployment": deployment["metadata"]["name"],
                          "replicas": (deployment.get("spec") or {}).get("replicas", 0),
                          "readyReplicas": ready_replicas})
    desired = desired_replicas(ctx)
    current = next((r for r in revisions if r["revision"] == ctx.revision), None)
    current_ready = current["readyReplicas"] if current else 0
    rolled_out = current is not None and current_ready >= desired and len(revisions) == 1
    stable = ctx.revision if rolled_out else old_status.get("stableRevision") or (
        next((r["revision"] for r in revisions if r["revision"] != ctx.revision and r["readyReplicas"]), None))
    if ctx.status.get("paused"):
        phase, message = "Progressing" if not rolled_out else "Ready", "reconcile paused by spec.paused"
    elif rolled_out:
        phase, message = "Ready", f"{ready}/{desired} replicas ready on revision {ctx.revision}"
    elif ready == 0 and desired > 0:
        phase, message = "Pending", f"waiting for revision {ctx.revision}: 0/{desired} replicas ready"
    else:
        phase, message = "Progressing", f"rolling out revision {ctx.revision}: {current_ready}/{desired} ready"
    available = ready > 0 or desired == 0
    status = {
        **base,
        "phase": phase,
        "message": message,
        "currentRevision": ctx.revision,
        "replicas": total,
        "readyReplicas": ready,
        "desiredReplicas": desired,
        "revisions": revisions,
        "conditions": [
            _condition(ctx, "Available", available, "MinimumReplicasAvailable" if available else "NoReadyReplicas",
                       f"{ready} replica(s) ready"),
            _condition(ctx, "Progressing", not rolled_out, "RolloutInProgress" if not rolled_out else "RolloutComplete",
                       message),
            _condition(ctx, "Degraded", False, "AsExpected", "spec is valid"),
        ],
    }
    if stable:
        status["stableRevision"] = stable
    if "fallback" in ctx.status:  # the breaker's state (None: spec.fallback removed, clear it)
        status["fallback"] = ctx.status["fallback"]
    rollout = ctx.status.get("rollout")
    if rollout:
        # Status is merge-patched: name the keys a new rollout state dropped (e.g. a finished analysis
        # after a retry), or they would live on and be read back next pass.
        dropped = {key: None for key in (old_status.get("rollout") or {}) if key not in rollout}
        status["rollout"] = {**dropped, **rollout}
        strategy = "blue-green" if rollout.get("strategy") == "BlueGreen" else "canary"
        status["message"] = f"{strategy} {rollout['phase'].lower()}: {rollout.get('message', '')}"
        if rollout["phase"] == "Aborted":
            status["phase"] = "Degraded"
            status["conditions"][1] = _condition(ctx, "Progressing", False, "RolloutAborted", rollout.get("abortReason", ""))
            status["conditions"][2] = _condition(ctx, "Degraded", True, "RolloutAborted", rollout.get("abortReason", ""))
        elif rollout["phase"] == "Paused":
            status["conditions"][1] = _condition(ctx, "Progressing", False, "RolloutPaused", rollout.get("message", ""))
        elif rollout.get("waitingFor"):
            status["conditions"][1] = _condition(ctx, "Progressing", False, rollout["waitingFor"],
                                                 rollout.get("message", ""))
    if phase == "Ready" and old_status.get("phase") != "Ready":
        ctx.events.append(Event("Normal", "Ready", message))
    return status


def status_changed(old: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    return any((old or {}).get(key) != value for key, value in new.items())
