"""Canary rollouts: the `reconcile_canary_*` steps (Argo Rollouts' canary.go, for LLM serving).

A canary rollout starts when the spec asks for a revision other than the stable one. Its state lives in
`status.rollout` (so it survives operator restarts) and moves through `spec.rollout.canary.steps`:

- `setWeight: N`: size both revisions with the traffic router (replica ratio on the shared Service by
  default); the step is done when the plan is settled and the canary's replicas are ready;
- `pause: {duration}`: wait that long; with no duration, wait for `digital-worker promote`;
- `analysis`: measure the canary against the stable revision in Prometheus until the analysis passes
  (next step), fails (abort: the stable takes everything back) or stays inconclusive (pause for a human).

After the last step the canary is scaled to the full size and becomes stable; the old revision goes.
Humans steer through annotations (what `digital-worker promote|abort|retry` set), so plain kubectl can too.
Pure parts (router, verdicts) live in traffic.py and analysis.py; this module applies them.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

from digital_worker.operator import metrics, render
from digital_worker.operator import schema as api
from digital_worker.operator.analysis import (Action, AnalysisSpec, AnalysisState, evaluate, is_due, measure_run,
                                             resume)
from digital_worker.operator.metric_providers import PrometheusProvider, revision_matchers
from digital_worker.operator.traffic import GatewayApiRouter, ReplicaCounts, resolve_int_or_percent, router_from_settings

ANNOTATION_PROMOTE = f"{api.GROUP}/promote"  # "step" (skip the current step) or "full"
ANNOTATION_ABORT = f"{api.GROUP}/abort"
ANNOTATION_RETRY = f"{api.GROUP}/retry"
ANNOTATION_PAUSE = f"{api.GROUP}/pause"
ANNOTATION_RESUME = f"{api.GROUP}/resume"

PROGRESSING, PAUSED, ABORTED, COMPLETED = "Progressing", "Paused", "Aborted", "Completed"
CANARY, BLUE_GREEN = "Canary", "BlueGreen"
REASON_INSUFFICIENT_GPU = "InsufficientGPU"
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}


def duration_seconds(text: str) -> float:
    return sum(float(number) * _UNITS[unit] for number, unit in _DURATION.findall(text))


def _int_or_percent(value: int | str) -> int | str:
    return int(value) if isinstance(value, str) and not value.endswith("%") else value


@dataclass
class HumanInput:
    """What the annotations ask for this pass (each is consumed: removed once read)."""

    promote: str | None
    abort: bool
    retry: bool
    pause: bool
    resume: bool
    consumed: list[str]


def read_annotations(ctx) -> HumanInput:
    annotations = ctx.body["metadata"].get("annotations") or {}
    consumed = [key for key in (ANNOTATION_RETRY, ANNOTATION_ABORT, ANNOTATION_PROMOTE, ANNOTATION_RESUME)
                if key in annotations]
    resuming = ANNOTATION_RESUME in annotations
    if resuming and ANNOTATION_PAUSE in annotations:
        consumed.append(ANNOTATION_PAUSE)  # resume lifts a human pause
    return HumanInput(promote=annotations.get(ANNOTATION_PROMOTE), abort=ANNOTATION_ABORT in annotations,
                      retry=ANNOTATION_RETRY in annotations,
                      pause=ANNOTATION_PAUSE in annotations and not resuming, resume=resuming, consumed=consumed)


def consume_annotations(ctx, human: HumanInput, state: dict[str, Any]) -> None:
    """Remove the annotations acted on, after recording what they did in status.rollout: the watch
    event of the removal must not bring back a body whose rollout state predates the action."""
    if human.consumed:
        previous = (ctx.body.get("status") or {}).get("rollout") or {}
        gone = {key: None for key in previous if key not in state}  # a merge patch keeps keys it does not name
        ctx.client.patch(api.API_VERSION, api.PLURAL, ctx.namespace, ctx.name,
                         {"status": {"rollout": {**gone, **state}}}, "status")
        ctx.client.patch(api.API_VERSION, api.PLURAL, ctx.namespace, ctx.name,
                         {"metadata": {"annotations": {key: None for key in human.consumed}}})


def reconcile_canary(ctx, stable_revision: str, now: float | None = None) -> None:
    """One pass of a canary rollout from `stable_revision` to `ctx.revision`; fills ctx.status['rollout']."""
    now = time.time() if now is None else now
    human = read_annotations(ctx)
    state = _state(ctx, stable_revision, now, CANARY)
    total = int(ctx.spec.get("replicas", 1))
    steps = ctx.spec.get("rollout", {}).get("canary", {}).get("steps") or [{"setWeight": 100}]
    router = canary_router(ctx)

    if human.retry and state["phase"] == ABORTED:
        state = _fresh(ctx.revision, stable_revision, now, CANARY)
        ctx.events.append(_event("Normal", "RolloutRetried", f"canary {ctx.revision} retried from step 0"))
    if human.abort and state["phase"] not in (ABORTED, COMPLETED):
        _abort(ctx, state, "aborted by a human (digital-worker abort)")
    promote = human.promote
    if promote == "full" and state["phase"] not in (ABORTED, COMPLETED):
        state["step"] = len(steps)
        ctx.events.append(_event("Normal", "RolloutPromoted", "promoted in full by a human"))

    if state["phase"] == ABORTED:
        _apply_sizes(ctx, stable_revision, stable=total, canary=0)
        _apply_route(ctx, router, stable_revision, 0)
    else:
        if state["phase"] != COMPLETED and state["step"] < len(steps) and "setWeight" not in steps[state["step"]]:
            keep_split(ctx, state, stable_revision, total, router)
        while state["step"] < len(steps) and not human.pause:
            if not _run_step(ctx, state, steps[state["step"]], stable_revision, total, now, promote == "step",
                             human.resume, router):
                break
            promote = None  # a promote annotation moves one step only
            state["step"] += 1
            state["stepStartedAt"] = now
            state.pop("analysis", None)
            state.pop("waitingFor", None)
        if human.pause and state["phase"] == PROGRESSING:
            state["phase"], state["message"] = PAUSED, "paused by a human (digital-worker resume to continue)"
        if state["phase"] == ABORTED:  # aborted by analysis in this pass: traffic goes back now, not next pass
            _apply_sizes(ctx, stable_revision, stable=total, canary=0)
            _apply_route(ctx, router, stable_revision, 0)
        elif state["step"] >= len(steps):
            _complete(ctx, state, stable_revision, total, router)
    consume_annotations(ctx, human, state)
    ctx.status["rollout"] = state


def canary_router(ctx):
    """The traffic router spec.rollout.canary asks for: replica ratio on the shared Service, or a
    Gateway API HTTPRoute over per-revision Services `<dw>-stable` / `<dw>-canary`."""
    canary_spec = ctx.spec.get("rollout", {}).get("canary", {})
    return router_from_settings(
        canary_spec.get("trafficRouting"), namespace=ctx.namespace, stable_service=f"{ctx.name}-stable",
        canary_service=f"{ctx.name}-canary", port=80,
        max_surge=_int_or_percent(canary_spec.get("maxSurge", "25%")),
        max_unavailable=_int_or_percent(canary_spec.get("maxUnavailable", "0")),
        labels=render.instance_labels(ctx.name), owner_references=(render.owner_reference(ctx.body),))


def _apply_route(ctx, router, stable_revision: str, weight: float, canary_revision: str | None = None) -> None:
    """Gateway API only: the per-revision Services and the HTTPRoute's weights."""
    if not isinstance(router, GatewayApiRouter):
        return
    from digital_worker.operator.reconcile import apply

    apply(ctx, render.render_revision_service(ctx.body, "stable", stable_revision))
    apply(ctx, render.render_revision_service(ctx.body, "canary", canary_revision or ctx.revision))
    apply(ctx, router.render_route(int(round(weight))))


def _fresh(revision: str, stable: str, now: float, strategy: str) -> dict[str, Any]:
    return {"strategy": strategy, "revision": revision, "stableRevision": stable, "phase": PROGRESSING, "step": 0,
            "stepStartedAt": now, "weight": 0, "message": "starting"}


def _state(ctx, stable_revision: str, now: float, strategy: str) -> dict[str, Any]:
    old = ((ctx.body.get("status") or {}).get("rollout") or {})
    if old.get("revision") == ctx.revision and old.get("stableRevision") == stable_revision and \
            old.get("strategy", CANARY) == strategy:
        return {key: value for key, value in old.items() if value is not None}
    ctx.events.append(_event("Normal", "RolloutStarted",
                             f"{strategy.lower()} rollout of {ctx.revision} against stable {stable_revision}"))
    return _fresh(ctx.revision, stable_revision, now, strategy)


def _event(type_: str, reason: str, message: str):
    from digital_worker.operator.reconcile import Event

    return Event(type_, reason, message)


def _deployment(ctx, revision: str) -> dict[str, Any] | None:
    return ctx.observed.named("deployments", render.revision_name(ctx.name, revision))


def _ready(deployment: dict[str, Any] | None) -> int:
    return int(((deployment or {}).get("status") or {}).get("readyReplicas", 0) or 0)


def _apply_sizes(ctx, stable_revision: str, *, stable: int, canary: int) -> None:
    """Size both revisions: the stable Deployment keeps its own pod template (only replicas change).
    The revision that shrinks is patched first, so no moment asks for the GPUs of both sizes: the
    capacity plan counted on what the shrinking one frees (a shift, an abort)."""
    from digital_worker.operator.reconcile import apply

    stable_deployment = _deployment(ctx, stable_revision)

    def size_stable() -> None:
        if stable_deployment is not None and (stable_deployment.get("spec") or {}).get("replicas") != stable:
            ctx.client.patch("apps/v1", "deployments", ctx.namespace, stable_deployment["metadata"]["name"],
                             {"spec": {"replicas": stable}})
            ctx.changes += 1

    def size_canary() -> None:
        apply(ctx, render.render_configmap(ctx.body, ctx.spec, ctx.revision))
        apply(ctx, render.render_deployment(ctx.body, ctx.spec, ctx.revision, canary))

    stable_grows = stable_deployment is not None and stable > int(
        (stable_deployment.get("spec") or {}).get("replicas", 0) or 0)
    for size in ((size_canary, size_stable) if stable_grows else (size_stable, size_canary)):
        size()


def _run_step(ctx, state: dict[str, Any], step: dict[str, Any], stable_revision: str, total: int, now: float,
              promoted: bool, resuming: bool, router) -> bool:
    """Advance one step; True when it is done."""
    if "setWeight" in step:
        weight = int(step["setWeight"])
        current, stable_d = revision_counts(ctx, stable_revision, total)
        state.update(requestedWeight=weight, phase=PROGRESSING)
        plan, waiting, current = set_split(ctx, state, stable_revision, total, weight, router, current, stable_d)
        state.update(exact=plan.exact, message=f"step {state['step']}: weight {weight}%: {plan.message}")
        note_capacity(ctx, state, waiting)
        done = plan.settled and current.ready_canary >= plan.canary_replicas and waiting is None and \
            plan.stable_replicas == current.stable and plan.canary_replicas == current.canary
        return done or promoted
    if "pause" in step:
        duration = (step.get("pause") or {}).get("duration")
        if promoted:
            return True
        if duration and now >= float(state.get("stepStartedAt", now)) + duration_seconds(duration):
            return True
        state["phase"] = PROGRESSING if duration else PAUSED
        state["message"] = f"step {state['step']}: " + (
            f"pausing {duration}" if duration else "paused until `digital-worker promote`")
        return False
    if "analysis" in step:
        state["phase"] = PROGRESSING if state["phase"] != PAUSED else PAUSED
        settings = {**(ctx.spec.get("rollout", {}).get("analysis") or {}), **(step.get("analysis") or {})}
        return run_analysis(ctx, state, settings, stable_revision, now, promoted, resuming,
                            label=f"step {state['step']}")
    return True


def keep_split(ctx, state: dict[str, Any], stable_revision: str, total: int, router) -> None:
    """Between setWeight steps (a pause, an analysis) the last weight holds for the current total:
    the autoscaler sizes the worker through spec.replicas and the rollout splits whatever it is."""
    weight = state.get("requestedWeight")
    if weight is None:
        return
    current, stable_d = revision_counts(ctx, stable_revision, total)
    wanted = router.plan(total, int(weight), current)
    if (wanted.stable_replicas, wanted.canary_replicas) == (current.stable, current.canary):
        return  # nothing to resize: the common case, no capacity lookups
    _, waiting, _ = set_split(ctx, state, stable_revision, total, int(weight), router, current, stable_d)
    note_capacity(ctx, state, waiting)


def revision_counts(ctx, stable_revision: str, total: int) -> tuple[ReplicaCounts, dict[str, Any] | None]:
    """Replicas the stable and the new revision's Deployments ask for and have ready (and the stable's)."""
    stable_d, new_d = _deployment(ctx, stable_revision), _deployment(ctx, ctx.revision)
    return ReplicaCounts(stable=int(((stable_d or {}).get("spec") or {}).get("replicas", total)),
                         canary=int(((new_d or {}).get("spec") or {}).get("replicas", 0)),
                         stable_ready=_ready(stable_d), canary_ready=_ready(new_d)), stable_d


def set_split(ctx, state: dict[str, Any], stable_revision: str, total: int, weight: int, router,
              current: ReplicaCounts, stable_d: dict[str, Any] | None):
    """Size both revisions (and the route) for `weight` as far as the GPUs allow: (plan, waiting,
    the replica counts the plan started from: re-read from the API when GPU capacity was checked)."""
    plan, waiting, current = plan_with_capacity(ctx, router, total, weight, current, stable_revision)
    _apply_sizes(ctx, stable_revision, stable=plan.stable_replicas, canary=plan.canary_replicas)
    _apply_route(ctx, router, stable_revision, plan.effective_weight)
    state["weight"] = round(plan.effective_weight, 1)
    return plan, waiting, current


# --- GPU capacity -----------------------------------------------------------------------------------

def plan_with_capacity(ctx, router, total: int, weight: int, current: ReplicaCounts, stable_revision: str):
    """The router's plan for `weight`, held to what the GPUs can host. Returns (plan, waiting message
    or None, the counts planned from). Nodes, pods and the worker's Deployments are only read when
    the plan adds replicas; the plan is then made again from the Deployments as the API has them
    (the watch cache may not show the last pass's own scaling yet)."""
    from digital_worker.operator import capacity as gpu

    plan = router.plan(total, weight, current)
    if plan.canary_replicas <= current.canary and plan.stable_replicas <= current.stable:
        return plan, None, current
    view = gpu_view(ctx, _deployment(ctx, stable_revision))
    if view is None:
        return plan, None, current
    current, _ = revision_counts(ctx, stable_revision, total)  # gpu_view refreshed ctx.observed
    plan = router.plan(total, weight, current)
    if plan.canary_replicas <= current.canary and plan.stable_replicas <= current.stable:
        return plan, None, current
    available, new_gpus, stable_gpus = view
    canary_spec = ctx.spec.get("rollout", {}).get("canary", {})
    step = gpu.plan_rollout_step(
        router, available, total, weight, current, gpus_per_canary_replica=new_gpus,
        gpus_per_stable_replica=stable_gpus,
        max_unavailable=resolve_int_or_percent(_int_or_percent(canary_spec.get("maxUnavailable", "0")), total,
                                               False, "maxUnavailable"))
    return step.traffic, (step.capacity.message if step.waiting else None), current


def gpu_view(ctx, stable_deployment: dict[str, Any] | None):
    """(free GPU capacity on the nodes the new pods can land on, GPUs per new replica, per stable
    replica), or None when no GPU node is known (e.g. nodes appear on demand): nothing to hold to.

    Free means neither held by a pod nor promised to one: the worker's Deployments are read from the
    API (and replace ctx.observed's, so the caller plans from them) and the replicas they ask for
    beyond their pods bound to a node count as taken. A canary scaled up by the previous pass has no
    pod until the Deployment controller makes one; counting only pods, the next pass would see the
    GPUs the stable just gave up as free and hand them out a second time."""
    from digital_worker.operator import capacity as gpu

    new_template = render.render_deployment(ctx.body, ctx.spec, ctx.revision, 0)["spec"]["template"]
    runtime = ctx.spec.get("runtime", {})
    nodes = ctx.client.list("v1", "nodes")
    if not nodes:
        return None
    deployments = [d for d in ctx.client.list("apps/v1", "deployments", ctx.namespace,
                                              render.selector_string(ctx.name))
                   if not d["metadata"].get("deletionTimestamp")]  # going: its pods count, it asks for none
    ctx.observed.children["deployments"] = deployments
    available = gpu.gpu_capacity(nodes, ctx.client.list("v1", "pods"),
                                 gpu_type=runtime.get("gpuType"),
                                 tolerations=new_template["spec"].get("tolerations") or [],
                                 node_selector=runtime.get("nodeSelector"), deployments=deployments)
    if not available.nodes:
        return None
    stable_template = ((stable_deployment or {}).get("spec") or {}).get("template") or new_template
    return (available, max(1, gpu.pod_gpu_request(new_template)), max(1, gpu.pod_gpu_request(stable_template)))


def note_capacity(ctx, state: dict[str, Any], waiting: str | None) -> None:
    """Record a wait for GPUs (condition Progressing=False, reason InsufficientGPU) and say it once."""
    if waiting is None:
        state.pop("waitingFor", None)
        return
    if state.get("waitingFor") != REASON_INSUFFICIENT_GPU:
        ctx.events.append(_event("Warning", REASON_INSUFFICIENT_GPU, waiting))
    state.update(waitingFor=REASON_INSUFFICIENT_GPU, message=f"step {state['step']}: waiting for GPUs: {waiting}")


# --- analysis ---------------------------------------------------------------------------------------

def run_analysis(ctx, state: dict[str, Any], settings: dict[str, Any], stable_revision: str, now: float,
                 promoted: bool, resuming: bool, label: str, key: str = "analysis") -> bool:
    """Measure the new revision against the stable one; True when the analysis passed. A failed
    analysis aborts the rollout, one that stays inconclusive pauses it (state['phase'])."""
    if promoted:
        return True
    spec = AnalysisSpec.from_dict(settings)
    analysis = AnalysisState.from_dict(state[key]) if state.get(key) else AnalysisState.start(now)
    if resuming:  # a human looked at an inconclusive analysis and wants it to go on
        analysis = resume(analysis, now)
        state["phase"] = PROGRESSING
    if is_due(analysis, spec, now):
        url = ctx.prometheus_url
        provider = PrometheusProvider(url, timeout=5.0) if url else ctx.analysis_provider
        if provider is None:
            from digital_worker.operator.analysis import RunMeasurements

            measurements = RunMeasurements({}, None)  # no metrics source at all: nothing to judge
        else:
            measurements = measure_run(provider, spec, revision_matchers(ctx.namespace, ctx.name, ctx.revision),
                                       revision_matchers(ctx.namespace, ctx.name, stable_revision), at=now)
        result, analysis = evaluate(analysis, measurements, now, spec)
        state[key] = analysis.to_dict()
        state["message"] = f"{label}: analysis {result.reason or 'running'}: {result.message}"
        if result.verdict is not None:
            metrics.record_analysis_verdict(result.verdict.value)
        if result.action is Action.PASS:
            ctx.events.append(_event("Normal", "AnalysisPassed", f"{label}: {result.message}"))
            return True
        if result.action is Action.ABORT:
            _abort(ctx, state, f"analysis failed: {result.message}")
            return False
        if result.action is Action.PAUSE:
            state["phase"] = PAUSED
            ctx.events.append(_event("Warning", result.reason, result.message))
            return False
    state[key] = analysis.to_dict()
    return False


def _abort(ctx, state: dict[str, Any], reason: str) -> None:
    strategy = state.get("strategy", CANARY)
    state.update(phase=ABORTED, abortReason=reason, weight=0, message=f"aborted: {reason}")
    state.pop("waitingFor", None)
    ctx.events.append(_event("Warning", "RolloutAborted", f"{strategy.lower()} {ctx.revision} aborted, stable "
                                                         f"takes all traffic back: {reason}"))
    metrics.record_rollout_result(strategy, ABORTED)


def _complete(ctx, state: dict[str, Any], stable_revision: str, total: int, router) -> None:
    """The canary becomes stable at full size; the old revision goes once the new one carries it."""
    stable, canary_size, waiting = promotion_sizes(ctx, stable_revision, total)
    _apply_sizes(ctx, stable_revision, stable=stable, canary=canary_size)
    canary = _deployment(ctx, ctx.revision)
    if _ready(canary) >= total:
        note_capacity(ctx, state, None)
        # Gateway API: everything to the new revision, then the stable Service follows it.
        _apply_route(ctx, router, ctx.revision, 0, canary_revision=ctx.revision)
        delete_revision(ctx, stable_revision)
        if state["phase"] != COMPLETED:
            ctx.events.append(_event("Normal", "RolloutCompleted", f"revision {ctx.revision} is stable"))
            metrics.record_rollout_result(state.get("strategy", CANARY), COMPLETED)
        state.update(phase=COMPLETED, weight=100, message=f"revision {ctx.revision} promoted to stable")
    else:
        _apply_route(ctx, router, stable_revision, 100 * _ready(canary) / max(total, 1))
        state.update(phase=PROGRESSING, message=f"promoting: {_ready(canary)}/{total} canary replicas ready")
        note_capacity(ctx, state, waiting)


def promotion_sizes(ctx, stable_revision: str, total: int) -> tuple[int, int, str | None]:
    """(stable, canary replicas, waiting message or None) for the promotion: the canary at full size
    beside the stable, which keeps its replicas until the canary carries everything, as far as the
    GPUs allow. Short of GPUs, the capacity planner shifts stable replicas to the canary within
    maxUnavailable (the stable may go, it is being replaced) or waits, reason InsufficientGPU; the
    canary never asks for GPUs that are not there (its pods would stay Pending and the promotion,
    waiting for them to be ready before the stable goes, would never end)."""
    from digital_worker.operator import capacity as gpu

    current, stable_d = revision_counts(ctx, stable_revision, total)
    if current.canary >= total:
        return current.stable, total, None
    view = gpu_view(ctx, stable_d)
    if view is None:
        return current.stable, total, None
    current, _ = revision_counts(ctx, stable_revision, total)  # gpu_view refreshed ctx.observed
    if current.canary >= total:
        return current.stable, total, None
    available, new_gpus, stable_gpus = view
    canary_spec = ctx.spec.get("rollout", {}).get("canary", {})
    decision = gpu.plan_capacity(
        available, current.stable, current.canary, current.stable, total, new_gpus, stable_gpus,
        max_unavailable=resolve_int_or_percent(_int_or_percent(canary_spec.get("maxUnavailable", "0")), total,
                                               False, "maxUnavailable"),
        stable_floor=0, unavailable=max(0, total - current.ready_stable - current.ready_canary))
    return decision.stable_replicas, decision.canary_replicas, decision.message if decision.waiting else None


def delete_revision(ctx, revision: str) -> None:
    old = _deployment(ctx, revision)
    if old is not None:
        ctx.client.delete("apps/v1", "deployments", ctx.namespace, old["metadata"]["name"])
        ctx.client.delete("v1", "configmaps", ctx.namespace, old["metadata"]["name"])
        ctx.observed.children["deployments"] = [d for d in ctx.observed.of("deployments") if d is not old]
        ctx.changes += 1

