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
from typing import Any

from digital_worker.operator import render
from digital_worker.operator import schema as api
from digital_worker.operator.analysis import (Action, AnalysisSpec, AnalysisState, evaluate, is_due, measure_run,
                                             resume)
from digital_worker.operator.metric_providers import PrometheusProvider, revision_matchers
from digital_worker.operator.traffic import ReplicaCounts, router_from_settings

ANNOTATION_PROMOTE = f"{api.GROUP}/promote"  # "step" (skip the current step) or "full"
ANNOTATION_ABORT = f"{api.GROUP}/abort"
ANNOTATION_RETRY = f"{api.GROUP}/retry"
ANNOTATION_PAUSE = f"{api.GROUP}/pause"
ANNOTATION_RESUME = f"{api.GROUP}/resume"

PROGRESSING, PAUSED, ABORTED, COMPLETED = "Progressing", "Paused", "Aborted", "Completed"
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}


def duration_seconds(text: str) -> float:
    return sum(float(number) * _UNITS[unit] for number, unit in _DURATION.findall(text))


def _int_or_percent(value: int | str) -> int | str:
    return int(value) if isinstance(value, str) and not value.endswith("%") else value


def reconcile_canary(ctx, stable_revision: str, now: float | None = None) -> None:
    """One pass of a canary rollout from `stable_revision` to `ctx.revision`; fills ctx.status['rollout']."""
    now = time.time() if now is None else now
    annotations = ctx.body["metadata"].get("annotations") or {}
    state = _state(ctx, stable_revision, now)
    total = int(ctx.spec.get("replicas", 1))
    steps = ctx.spec.get("rollout", {}).get("canary", {}).get("steps") or [{"setWeight": 100}]

    if ANNOTATION_RETRY in annotations and state["phase"] == ABORTED:
        state = _fresh(ctx.revision, stable_revision, now)
        ctx.events.append(_event("Normal", "RolloutRetried", f"canary {ctx.revision} retried from step 0"))
    if ANNOTATION_ABORT in annotations and state["phase"] not in (ABORTED, COMPLETED):
        _abort(ctx, state, "aborted by a human (digital-worker abort)")
    promote = annotations.get(ANNOTATION_PROMOTE)
    if promote == "full" and state["phase"] not in (ABORTED, COMPLETED):
        state["step"] = len(steps)
        ctx.events.append(_event("Normal", "RolloutPromoted", "promoted in full by a human"))
    resuming = ANNOTATION_RESUME in annotations
    consumed = [key for key in (ANNOTATION_RETRY, ANNOTATION_ABORT, ANNOTATION_PROMOTE, ANNOTATION_RESUME)
                if key in annotations]
    if resuming and ANNOTATION_PAUSE in annotations:
        consumed.append(ANNOTATION_PAUSE)
        annotations = {k: v for k, v in annotations.items() if k != ANNOTATION_PAUSE}

    if state["phase"] == ABORTED:
        _apply_sizes(ctx, stable_revision, stable=total, canary=0)
    else:
        paused_by_human = ANNOTATION_PAUSE in annotations
        while state["step"] < len(steps) and not paused_by_human:
            if not _run_step(ctx, state, steps[state["step"]], stable_revision, total, now, promote == "step",
                             resuming):
                break
            promote = None  # a promote annotation moves one step only
            state["step"] += 1
            state["stepStartedAt"] = now
            state.pop("analysis", None)
        if paused_by_human and state["phase"] == PROGRESSING:
            state["phase"], state["message"] = PAUSED, "paused by a human (digital-worker resume to continue)"
        if state["step"] >= len(steps) and state["phase"] not in (ABORTED,):
            _complete(ctx, state, stable_revision, total)
    if consumed:
        ctx.client.patch(api.API_VERSION, api.PLURAL, ctx.namespace, ctx.name,
                         {"metadata": {"annotations": {key: None for key in consumed}}})
    ctx.status["rollout"] = state


def _fresh(revision: str, stable: str, now: float) -> dict[str, Any]:
    return {"revision": revision, "stableRevision": stable, "phase": PROGRESSING, "step": 0,
            "stepStartedAt": now, "weight": 0, "message": "starting"}


def _state(ctx, stable_revision: str, now: float) -> dict[str, Any]:
    old = ((ctx.body.get("status") or {}).get("rollout") or {})
    if old.get("revision") == ctx.revision and old.get("stableRevision") == stable_revision:
        return dict(old)
    ctx.events.append(_event("Normal", "RolloutStarted", f"canary {ctx.revision} against stable {stable_revision}"))
    return _fresh(ctx.revision, stable_revision, now)


def _event(type_: str, reason: str, message: str):
    from digital_worker.operator.reconcile import Event

    return Event(type_, reason, message)


def _deployment(ctx, revision: str) -> dict[str, Any] | None:
    return ctx.observed.named("deployments", render.revision_name(ctx.name, revision))


def _ready(deployment: dict[str, Any] | None) -> int:
    return int(((deployment or {}).get("status") or {}).get("readyReplicas", 0) or 0)


def _apply_sizes(ctx, stable_revision: str, *, stable: int, canary: int) -> None:
    """Size both revisions: the stable Deployment keeps its own pod template (only replicas change)."""
    from digital_worker.operator.reconcile import apply

    stable_deployment = _deployment(ctx, stable_revision)
    if stable_deployment is not None and (stable_deployment.get("spec") or {}).get("replicas") != stable:
        ctx.client.patch("apps/v1", "deployments", ctx.namespace, stable_deployment["metadata"]["name"],
                         {"spec": {"replicas": stable}})
        ctx.changes += 1
    apply(ctx, render.render_configmap(ctx.body, ctx.spec, ctx.revision))
    apply(ctx, render.render_deployment(ctx.body, ctx.spec, ctx.revision, canary))


def _run_step(ctx, state: dict[str, Any], step: dict[str, Any], stable_revision: str, total: int, now: float,
              promoted: bool, resuming: bool) -> bool:
    """Advance one step; True when it is done."""
    if "setWeight" in step:
        weight = int(step["setWeight"])
        canary_spec = ctx.spec.get("rollout", {}).get("canary", {})
        # Only the replica-ratio router is wired so far (Gateway API needs per-revision Services).
        router = router_from_settings(None, namespace=ctx.namespace, stable_service=ctx.name,
                                      canary_service=f"{ctx.name}-canary",
                                      max_surge=_int_or_percent(canary_spec.get("maxSurge", "25%")),
                                      max_unavailable=_int_or_percent(canary_spec.get("maxUnavailable", "0")))
        stable_d, canary_d = _deployment(ctx, stable_revision), _deployment(ctx, ctx.revision)
        current = ReplicaCounts(stable=int(((stable_d or {}).get("spec") or {}).get("replicas", total)),
                                canary=int(((canary_d or {}).get("spec") or {}).get("replicas", 0)),
                                stable_ready=_ready(stable_d), canary_ready=_ready(canary_d))
        plan = router.plan(total, weight, current)
        _apply_sizes(ctx, stable_revision, stable=plan.stable_replicas, canary=plan.canary_replicas)
        state.update(weight=round(plan.effective_weight, 1), requestedWeight=weight, exact=plan.exact,
                     phase=PROGRESSING,
                     message=f"step {state['step']}: weight {weight}% (≈{plan.effective_weight:.0f}% by replicas)")
        done = plan.settled and _ready(canary_d) >= plan.canary_replicas and \
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
        return _run_analysis(ctx, state, step, stable_revision, now, promoted, resuming)
    return True


def _run_analysis(ctx, state, step, stable_revision, now, promoted, resuming) -> bool:
    if promoted:
        return True
    spec = AnalysisSpec.from_dict({**(ctx.spec.get("rollout", {}).get("analysis") or {}), **(step.get("analysis") or {})})
    analysis = AnalysisState.from_dict(state["analysis"]) if state.get("analysis") else AnalysisState.start(now)
    if resuming:  # a human looked at an inconclusive analysis and wants it to go on
        analysis = resume(analysis, now)
        state["phase"] = PROGRESSING
    url = ctx.prometheus_url
    if is_due(analysis, spec, now):
        provider = PrometheusProvider(url, timeout=5.0) if url else ctx.analysis_provider
        if provider is None:
            from digital_worker.operator.analysis import RunMeasurements

            measurements = RunMeasurements({}, None)  # no metrics source at all: nothing to judge
        else:
            measurements = measure_run(provider, spec, revision_matchers(ctx.namespace, ctx.name, ctx.revision),
                                       revision_matchers(ctx.namespace, ctx.name, stable_revision), at=now)
        result, analysis = evaluate(analysis, measurements, now, spec)
        state["analysis"] = analysis.to_dict()
        state["message"] = f"step {state['step']}: analysis {result.reason or 'running'}: {result.message}"
        if result.action is Action.PASS:
            ctx.events.append(_event("Normal", "AnalysisPassed", result.message))
            return True
        if result.action is Action.ABORT:
            _abort(ctx, state, f"analysis failed: {result.message}")
            return False
        if result.action is Action.PAUSE:
            state["phase"] = PAUSED
            ctx.events.append(_event("Warning", result.reason, result.message))
            return False
    state["analysis"] = analysis.to_dict()
    return False


def _abort(ctx, state: dict[str, Any], reason: str) -> None:
    state.update(phase=ABORTED, abortReason=reason, weight=0, message=f"aborted: {reason}")
    ctx.events.append(_event("Warning", "RolloutAborted", f"canary {ctx.revision} aborted, stable takes all "
                                                         f"traffic back: {reason}"))


def _complete(ctx, state: dict[str, Any], stable_revision: str, total: int) -> None:
    """The canary becomes stable at full size; the old revision goes once the new one carries it."""
    _apply_sizes(ctx, stable_revision, stable=_stable_replicas(ctx, stable_revision), canary=total)
    canary = _deployment(ctx, ctx.revision)
    if _ready(canary) >= total:
        old = _deployment(ctx, stable_revision)
        if old is not None:
            ctx.client.delete("apps/v1", "deployments", ctx.namespace, old["metadata"]["name"])
            ctx.client.delete("v1", "configmaps", ctx.namespace, old["metadata"]["name"])
            ctx.observed.children["deployments"] = [d for d in ctx.observed.of("deployments") if d is not old]
            ctx.changes += 1
        if state["phase"] != COMPLETED:
            ctx.events.append(_event("Normal", "RolloutCompleted", f"revision {ctx.revision} is stable"))
        state.update(phase=COMPLETED, weight=100, message=f"revision {ctx.revision} promoted to stable")
    else:
        state.update(phase=PROGRESSING, message=f"promoting: {_ready(canary)}/{total} canary replicas ready")


def _stable_replicas(ctx, stable_revision: str) -> int:
    return int(((_deployment(ctx, stable_revision) or {}).get("spec") or {}).get("replicas", 0))
