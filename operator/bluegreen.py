"""Blue-green rollouts: the `reconcile_bluegreen` steps (Argo Rollouts' bluegreen.go, for LLM serving).

The new revision comes up beside the stable one at full size (or `previewReplicas`) behind the
preview Service `<dw>-preview`, while the active Service `<dw>` keeps selecting the stable revision.
The steps, in order (each may end the pass; state lives in `status.rollout`, so it survives
operator restarts):

1. preview: the new revision at its preview size, ready (GPU capacity permitting: otherwise wait
   with reason InsufficientGPU; blue-green never shrinks the stable to make room);
2. warm-up: `/health_generate` on every preview pod plus `warmupRequests` synthetic completions
   (a cold SGLang replica compiles CUDA graphs and fills caches on its first requests);
3. pre-promotion analysis (when configured), preview against stable;
4. promotion gate: with `autoPromotionEnabled: false`, wait for `digital-worker promote`;
5. full size: the preview scaled to the worker's replicas, ready;
6. switch: the active Service selects the new revision;
7. post-promotion analysis (when configured); a failure switches back to the still-warm stable;
8. scale-down delay: the old revision stays warm `scaleDownDelaySeconds`, then goes.

Abort (analysis or a human) switches the active Service back to the stable revision and scales
the new one to zero; `digital-worker retry` starts over.
"""
from __future__ import annotations

import json
import logging
import time
import urllib.request
from typing import Any

from digital_worker.operator import metrics, pods, render
from digital_worker.operator import rollout
from digital_worker.operator import schema as api
from digital_worker.operator.rollout import ABORTED, BLUE_GREEN, COMPLETED, PAUSED, PROGRESSING

logger = logging.getLogger("digital_worker.operator")

WARMUP_TIMEOUT_SECONDS = 10.0
WARMUP_ATTEMPTS = 30  # passes with a preview pod failing /health_generate before the rollout aborts


def reconcile_bluegreen(ctx, stable_revision: str, now: float | None = None) -> None:
    """One pass of a blue-green rollout from `stable_revision` to `ctx.revision`."""
    now = time.time() if now is None else now
    human = rollout.read_annotations(ctx)
    state = rollout._state(ctx, stable_revision, now, BLUE_GREEN)
    settings = ctx.spec.get("rollout", {}).get("blueGreen") or {}
    total = int(ctx.spec.get("replicas", 1))

    if human.retry and state["phase"] == ABORTED:
        state = rollout._fresh(ctx.revision, stable_revision, now, BLUE_GREEN)
        ctx.events.append(rollout._event("Normal", "RolloutRetried", f"blue-green {ctx.revision} retried"))
    if human.abort and state["phase"] not in (ABORTED, COMPLETED):
        rollout._abort(ctx, state, "aborted by a human (digital-worker abort)")
    promote = human.promote
    if promote == "full" and state["phase"] not in (ABORTED, COMPLETED) and state["step"] < SWITCH:
        state["step"] = FULL_SIZE  # skip warm-up, analysis and the gate, never the readiness of the new pods
        ctx.events.append(rollout._event("Normal", "RolloutPromoted", "promoted in full by a human"))
        promote = None

    if state["phase"] == ABORTED:
        _scale(ctx, ctx.revision, 0)
        _scale(ctx, stable_revision, total)
        state["active"] = stable_revision
    else:
        if state.get("active", stable_revision) == stable_revision:
            _scale(ctx, stable_revision, total)  # the autoscaler sizes the total: the serving side follows
        while state["step"] < len(STEPS) and not human.pause:
            step = STEPS[state["step"]]
            if not step(ctx, state, settings, stable_revision, total, now, promote == "step", human.resume):
                break
            promote = None
            state["step"] += 1
            state["stepStartedAt"] = now
            state.pop("waitingFor", None)
        if human.pause and state["phase"] == PROGRESSING:
            state["phase"], state["message"] = PAUSED, "paused by a human (digital-worker resume to continue)"
        if state["step"] >= len(STEPS) and state["phase"] != COMPLETED:
            ctx.events.append(rollout._event("Normal", "RolloutCompleted", f"revision {ctx.revision} is stable"))
            metrics.record_rollout_result(BLUE_GREEN, COMPLETED)
            state.update(phase=COMPLETED, weight=100, message=f"revision {ctx.revision} promoted to stable")
        if state["phase"] == ABORTED:  # aborted by analysis in this pass: switch back and scale down now
            state["active"] = stable_revision
            _scale(ctx, ctx.revision, 0)
    active = state.get("active", stable_revision)
    ctx.service_selector = active_selector(ctx.name, active)
    rollout.consume_annotations(ctx, human, state)
    ctx.status["rollout"] = state


def active_selector(name: str, revision: str) -> dict[str, str]:
    return {api.LABEL_INSTANCE: name, api.LABEL_REVISION: revision}


# --- steps (each returns True when done) -------------------------------------------------------------

def reconcile_preview(ctx, state, settings, stable_revision, total, now, promoted, resuming) -> bool:
    size = min(int(settings.get("previewReplicas") or total), total)
    state["active"] = stable_revision
    if not _bring_up(ctx, state, stable_revision, total, size):
        return False
    from digital_worker.operator.reconcile import apply

    apply(ctx, render.render_revision_service(ctx.body, "preview", ctx.revision))
    ready = rollout._ready(rollout._deployment(ctx, ctx.revision))
    state.update(phase=PROGRESSING, previewReplicas=size, weight=0,
                 message=f"preview: {ready}/{size} replicas of {ctx.revision} ready on {ctx.name}-preview")
    return ready >= size


def reconcile_warmup(ctx, state, settings, stable_revision, total, now, promoted, resuming) -> bool:
    """`/health_generate` must answer on every preview pod (retried each pass; after
    WARMUP_ATTEMPTS failed passes the rollout aborts). The synthetic requests then warm caches and
    give pre-promotion analysis its first traffic; how they went is for the analysis to judge."""
    if promoted:
        return True
    urls = _ready_pod_urls(ctx, ctx.revision)
    if not urls:
        state["message"] = "warm-up: no ready preview pod to warm"
        return False
    headers = _auth_headers(ctx)
    unhealthy = [f"{url}/health_generate: {problem}" for url in urls
                 if (problem := _call(f"{url}/health_generate", None, headers))]
    if unhealthy:
        state["warmupFailures"] = failures = int(state.get("warmupFailures", 0)) + 1
        if failures >= WARMUP_ATTEMPTS:
            rollout._abort(ctx, state, f"preview never passed /health_generate ({failures} tries): {unhealthy[0]}")
            return False
        state["message"] = f"warm-up: {len(unhealthy)} pod(s) not generating yet (try {failures}): {unhealthy[0]}"
        return False
    requests = int(settings.get("warmupRequests", 0))
    body = {"model": ctx.spec["model"]["name"], "max_tokens": 8,
            "messages": [{"role": "user", "content": "Warm-up request from the digital-worker operator."}]}
    failed = sum(1 for index in range(requests)
                 if _call(f"{urls[index % len(urls)]}/v1/chat/completions", body, headers))
    state["message"] = (f"warm-up: {len(urls)} pod(s) generating, {requests - failed}/{requests} warm-up "
                        f"request(s) answered")
    return True


def reconcile_pre_promotion_analysis(ctx, state, settings, stable_revision, total, now, promoted, resuming) -> bool:
    return _analysis(ctx, state, settings, "prePromotionAnalysis", stable_revision, now, promoted, resuming)


def _analysis(ctx, state, settings, key: str, stable_revision, now, promoted, resuming) -> bool:
    """A configured blue-green analysis (spec.rollout.analysis overridden by its own fields); absent: done."""
    analysis = settings.get(key)
    if analysis is None:
        return True
    merged = {**(ctx.spec.get("rollout", {}).get("analysis") or {}), **analysis}
    label = "pre-promotion" if key == "prePromotionAnalysis" else "post-promotion"
    return rollout.run_analysis(ctx, state, merged, stable_revision, now, promoted, resuming, label=label, key=key)


def reconcile_promotion_gate(ctx, state, settings, stable_revision, total, now, promoted, resuming) -> bool:
    if settings.get("autoPromotionEnabled", True) or promoted:
        return True
    state.update(phase=PAUSED, message="preview ready: waiting for `digital-worker promote`")
    return False


def reconcile_full_size(ctx, state, settings, stable_revision, total, now, promoted, resuming) -> bool:
    state["phase"] = PROGRESSING if state["phase"] == PAUSED else state["phase"]
    if not _bring_up(ctx, state, stable_revision, total, total):
        return False
    ready = rollout._ready(rollout._deployment(ctx, ctx.revision))
    state["message"] = f"scaling the new revision to full size: {ready}/{total} ready"
    return ready >= total


def reconcile_switch(ctx, state, settings, stable_revision, total, now, promoted, resuming) -> bool:
    if state.get("active") != ctx.revision:
        ctx.events.append(rollout._event("Normal", "ActiveSwitched",
                                         f"active Service {ctx.name} now selects revision {ctx.revision} "
                                         f"(was {stable_revision})"))
    state.update(active=ctx.revision, switchedAt=now, weight=100,
                 message=f"active Service switched to {ctx.revision}")
    return True


def reconcile_post_promotion_analysis(ctx, state, settings, stable_revision, total, now, promoted, resuming) -> bool:
    passed = _analysis(ctx, state, settings, "postPromotionAnalysis", stable_revision, now, promoted, resuming)
    if state["phase"] == ABORTED:
        state.update(active=stable_revision, weight=0)  # the stable is still warm: switch straight back
    return passed


def reconcile_scale_down_delay(ctx, state, settings, stable_revision, total, now, promoted, resuming) -> bool:
    delay = float(settings.get("scaleDownDelaySeconds", 300))
    remaining = float(state.get("switchedAt", now)) + delay - now
    if remaining > 0 and not promoted:
        state["message"] = f"revision {ctx.revision} active; {stable_revision} stays warm {remaining:.0f}s more"
        return False
    rollout.delete_revision(ctx, stable_revision)
    ctx.client.delete("v1", "services", ctx.namespace, f"{ctx.name}-preview")
    return True


STEPS = (reconcile_preview, reconcile_warmup, reconcile_pre_promotion_analysis, reconcile_promotion_gate,
         reconcile_full_size, reconcile_switch, reconcile_post_promotion_analysis, reconcile_scale_down_delay)
FULL_SIZE, SWITCH = STEPS.index(reconcile_full_size), STEPS.index(reconcile_switch)


# --- helpers -----------------------------------------------------------------------------------------

def _scale(ctx, revision: str, replicas: int) -> None:
    deployment = rollout._deployment(ctx, revision)
    if deployment is not None and (deployment.get("spec") or {}).get("replicas") != replicas:
        ctx.client.patch("apps/v1", "deployments", ctx.namespace, deployment["metadata"]["name"],
                         {"spec": {"replicas": replicas}})
        ctx.changes += 1


def _bring_up(ctx, state, stable_revision: str, total: int, size: int) -> bool:
    """The new revision's Deployment at `size` beside the stable at full size, when the GPUs allow;
    False (waiting, reason InsufficientGPU) when they do not. Never shrinks the stable."""
    from digital_worker.operator.capacity import plan_capacity
    from digital_worker.operator.reconcile import apply

    current, stable_d = rollout.revision_counts(ctx, stable_revision, total)
    waiting = None
    if 0 < current.canary < size and current.ready_canary < current.canary:
        # Pods still starting (or pending) hold GPUs the nodes' accounting may not show yet: judge
        # the capacity for more once they run, never overcommit on a stale view.
        size = current.canary
    elif size > current.canary and (view := rollout.gpu_view(ctx, stable_d)) is not None:
        available, new_gpus, stable_gpus = view
        current, _ = rollout.revision_counts(ctx, stable_revision, total)  # as the API has them now
        # Blue-green keeps the stable whole (its floor is its size), so the new pods must fit on free GPUs.
        decision = plan_capacity(available, current.stable, current.canary, current.stable, size, new_gpus,
                                 stable_gpus, stable_floor=current.stable)
        size, waiting = decision.canary_replicas, (decision.message if decision.waiting else None)
    apply(ctx, render.render_configmap(ctx.body, ctx.spec, ctx.revision))
    apply(ctx, render.render_deployment(ctx.body, ctx.spec, ctx.revision, size))
    rollout.note_capacity(ctx, state, waiting)
    return waiting is None


def _ready_pod_urls(ctx, revision: str) -> list[str]:
    selector = f"{api.LABEL_INSTANCE}={ctx.name},{api.LABEL_REVISION}={revision}"
    port = ctx.spec.get("runtime", {}).get("port", 30000)
    return sorted(url for pod in ctx.client.list("v1", "pods", ctx.namespace, selector)
                  if pods.is_ready(pod) and not pod["metadata"].get("deletionTimestamp")
                  and (url := pods.base_url(pod, port)))


def _auth_headers(ctx) -> dict[str, str]:
    """The worker's API key (from its Secret) for warm-up requests; never logged or stored."""
    ref = ctx.spec.get("runtime", {}).get("apiKeySecretRef")
    if not ref:
        return {}
    import base64

    secret = ctx.client.get("v1", "secrets", ctx.namespace, ref["name"]) or {}
    if ref["key"] in (secret.get("stringData") or {}):
        return {"Authorization": f"Bearer {secret['stringData'][ref['key']]}"}
    encoded = (secret.get("data") or {}).get(ref["key"])
    return {"Authorization": f"Bearer {base64.b64decode(encoded).decode()}"} if encoded else {}


def _call(url: str, body: dict[str, Any] | None, headers: dict[str, str]) -> str | None:
    """One warm-up request; the problem as text, or None when it succeeded."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET",
                                     headers={**headers, **({"Content-Type": "application/json"} if data else {})})
    try:
        with urllib.request.urlopen(request, timeout=WARMUP_TIMEOUT_SECONDS) as response:
            response.read()
            return None if response.status < 300 else f"HTTP {response.status}"
    except Exception as exc:  # any failure is a reason to retry the warm-up, not to crash the pass
        return str(exc)[:200]
