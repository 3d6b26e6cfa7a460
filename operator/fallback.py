"""Fallback model (circuit breaker): when the stable revision keeps failing, serve a backup model.

`spec.fallback` names a smaller backup model. The operator keeps it warm at `spec.fallback.replicas`
in its own Deployment `<dw>-fallback` (labelled `app.kubernetes.io/instance: <dw>.fallback`, so it is
never taken for a revision of the worker) and moves the worker's Service between the two:

    Closed ──primary bad for unhealthySeconds──▶ Open ──open period over──▶ HalfOpen
      ▲                                           ▲                            │
      └───────primary good for the recovery period┴──────primary bad again─────┘

- Closed: the primary (stable revision) serves. It is *bad* when its error rate over a short window
  is over `errorRateThreshold`, or when none of its replicas is ready.
- Open: the Service selects only the fallback pods. The primary gets no traffic, so it cannot show
  it recovered by its error rate; after the open period (and once a primary replica is ready) the
  breaker goes half-open.
- HalfOpen: the Service selects the primary's and the fallback's pods (traffic shared by replica
  count). The primary is judged only on a window that lies wholly inside the trial; good for the
  recovery period closes the breaker, bad once re-opens it with a doubled open period (capped), so a
  primary that stays broken is tried less and less often.

Missing data (no metrics source, too few requests, NaN, Prometheus down) never trips the breaker and
never un-trips it: the phase holds. `decide()` is pure; `reconcile_fallback()` is the reconcile step
that measures, applies the fallback's objects, routes the Service and writes status and Events.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from typing import Any

from digital_worker.operator import render
from digital_worker.operator import schema as api

CLOSED, OPEN, HALF_OPEN = "Closed", "Open", "HalfOpen"
FALLBACK = "fallback"  # the fallback's revision label and name suffix: `<dw>-fallback`

# The primary is judged at least this often (operator/periodic.py schedules workers with a fallback).
EVALUATION_INTERVAL_SECONDS = 5.0
# Error-rate window: unhealthySeconds, within these bounds (at least two scrapes must fit in it).
WINDOW_FLOOR_SECONDS = 10.0
WINDOW_CAP_SECONDS = 120.0
# Recovery period (good for this long closes a trial) and first open period: unhealthySeconds, at least this.
RECOVERY_FLOOR_SECONDS = 5.0
MAX_OPEN_SECONDS = 600.0
# Fewer requests than this in the window say nothing about an error rate: hold.
MIN_REQUESTS = 5.0

# Runtime settings the fallback inherits from the primary: how pods run and clients authenticate,
# not how the primary's model is tuned (parallelism, memory fraction, extra flags are per model).
INHERITED_RUNTIME = ("image", "imagePullPolicy", "apiKeySecretRef", "env", "resources", "port", "nodeSelector",
                     "tolerations", "logLevel", "shmSize", "modelCacheSize", "terminationGracePeriodSeconds",
                     "startupTimeoutSeconds", "maxRunningRequests")


class Health(str, Enum):
    GOOD = "Good"
    BAD = "Bad"
    UNKNOWN = "Unknown"


class Route(str, Enum):
    PRIMARY = "Primary"    # leave the Service as the other steps set it
    FALLBACK = "Fallback"  # only the fallback's pods
    BOTH = "Both"          # every pod of the worker (a half-open trial)


@dataclass(frozen=True)
class BreakerSettings:
    error_rate_threshold: float = 0.5
    unhealthy_seconds: float = 60.0

    @classmethod
    def from_spec(cls, fallback: dict[str, Any]) -> "BreakerSettings":
        return cls(float(fallback.get("errorRateThreshold", 0.5)), float(fallback.get("unhealthySeconds", 60)))

    @property
    def recovery_seconds(self) -> float:
        return max(self.unhealthy_seconds, RECOVERY_FLOOR_SECONDS)

    @property
    def window_seconds(self) -> float:
        return min(max(self.unhealthy_seconds, WINDOW_FLOOR_SECONDS), WINDOW_CAP_SECONDS)


@dataclass(frozen=True)
class Observation:
    """What was measured of the primary (the stable revision) and the fallback at one instant."""

    error_rate: float | None = None      # over `window_seconds` ending now; None: not measured
    requests: float | None = None        # requests that ended in that window; None: unknown
    primary_ready: int | None = None     # None: no stable revision to judge yet
    primary_desired: int = 1
    fallback_ready: int = 0
    window_seconds: float = WINDOW_FLOOR_SECONDS
    missing: str = ""                    # why the error rate is missing, for the status


@dataclass(frozen=True)
class BreakerState:
    phase: str = CLOSED
    since: float | None = None       # when the phase began
    bad_since: float | None = None   # Closed: start of the current run of bad observations
    good_since: float | None = None  # HalfOpen: start of the current run of good observations
    open_seconds: float = 0.0        # Open: how long before the next trial (doubles after a failed one)
    reason: str = ""                 # why the breaker is in this phase

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "BreakerState":
        data = data or {}
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        state = cls(**known)
        return state if state.phase in (CLOSED, OPEN, HALF_OPEN) else cls()


@dataclass(frozen=True)
class BreakerContext:
    now: float
    observation: Observation
    settings: BreakerSettings = field(default_factory=BreakerSettings)
    state: BreakerState = field(default_factory=BreakerState)


@dataclass(frozen=True)
class Decision:
    route: Route
    health: Health
    reason: str                      # why the primary was judged so this time
    event: tuple[str, str, str] | None = None  # (type, reason, message) on a transition


def judge(observation: Observation, settings: BreakerSettings) -> tuple[Health, str]:
    """Is the primary good, bad, or can't we tell? Pure."""
    if observation.primary_ready is None:
        return Health.UNKNOWN, "no stable revision yet"
    if observation.primary_desired > 0 and observation.primary_ready <= 0:
        return Health.BAD, "no ready replica"
    rate = observation.error_rate
    if rate is None or not math.isfinite(rate):
        return Health.UNKNOWN, f"error rate unknown ({observation.missing or 'no data'})"
    if observation.requests is not None and observation.requests < MIN_REQUESTS:
        return Health.UNKNOWN, f"only {observation.requests:.0f} request(s) in {observation.window_seconds:.0f}s"
    if rate > settings.error_rate_threshold:
        return Health.BAD, f"error rate {rate:.1%} over {settings.error_rate_threshold:.1%}"
    return Health.GOOD, f"error rate {rate:.1%} within {settings.error_rate_threshold:.1%}"


def decide(context: BreakerContext) -> tuple[Decision, BreakerState]:
    """One tick of the breaker: where traffic goes now, and the state to keep. Pure."""
    now, obs, settings, state = context.now, context.observation, context.settings, context.state
    health, why = judge(obs, settings)
    if state.phase == OPEN:
        return _open_tick(now, obs, settings, state, health, why)
    if state.phase == HALF_OPEN:
        no_ready = obs.primary_desired > 0 and (obs.primary_ready or 0) <= 0
        if not no_ready and state.since is not None and now - obs.window_seconds < state.since:
            # The window reaches back before the trial: requests from before the trip would judge it.
            health, why = Health.UNKNOWN, "trial window not yet full"
        return _half_open_tick(now, obs, settings, state, health, why)
    return _closed_tick(now, obs, settings, state, health, why)


def _closed_tick(now, obs, settings, state, health, why) -> tuple[Decision, BreakerState]:
    if health is Health.GOOD:
        return Decision(Route.PRIMARY, health, why), replace(state, bad_since=None, reason="")
    if health is Health.UNKNOWN:  # hold: neither trips nor forgets a bad run
        return Decision(Route.PRIMARY, health, why), state
    bad_since = state.bad_since if state.bad_since is not None else now
    bad_for = now - bad_since
    if bad_for < settings.unhealthy_seconds:
        return Decision(Route.PRIMARY, health, why), replace(state, bad_since=bad_since, reason=f"primary bad: {why}")
    if obs.fallback_ready <= 0:  # moving traffic to nothing would not help
        return (Decision(Route.PRIMARY, health, f"{why}; fallback has no ready replica"),
                replace(state, bad_since=bad_since, reason=f"primary bad ({why}) but the fallback is not ready"))
    reason = f"primary {why} for {bad_for:.0f}s"
    opened = BreakerState(OPEN, since=now, open_seconds=settings.recovery_seconds, reason=reason)
    return Decision(Route.FALLBACK, health, why, ("Warning", "FallbackActivated",
                                                   f"traffic moved to the fallback model: {reason}")), opened


def _open_tick(now, obs, settings, state, health, why) -> tuple[Decision, BreakerState]:
    since = state.since if state.since is not None else now
    primary_ready = (obs.primary_ready or 0) > 0
    if primary_ready and obs.fallback_ready <= 0:
        reason = "the fallback has no ready replica: the primary serves beside it again"
    elif primary_ready and now - since >= state.open_seconds:
        reason = f"open for {now - since:.0f}s: the primary is on trial beside the fallback"
    else:
        return Decision(Route.FALLBACK, health, why), replace(state, since=since)
    trial = BreakerState(HALF_OPEN, since=now, open_seconds=state.open_seconds, reason=reason)
    return Decision(Route.BOTH, health, why, ("Normal", "FallbackTrial", reason)), trial


def _half_open_tick(now, obs, settings, state, health, why) -> tuple[Decision, BreakerState]:
    if health is Health.BAD:
        open_seconds = min(max(state.open_seconds * 2, settings.recovery_seconds),
                           max(MAX_OPEN_SECONDS, settings.recovery_seconds))
        if obs.fallback_ready <= 0:  # nowhere better to send it: keep sharing
            return Decision(Route.BOTH, health, f"{why}; fallback has no ready replica"), state
        reason = f"trial failed: primary {why}; next trial in {open_seconds:.0f}s"
        opened = BreakerState(OPEN, since=now, open_seconds=open_seconds, reason=reason)
        return Decision(Route.FALLBACK, health, why, ("Warning", "FallbackTrialFailed", reason)), opened
    if health is Health.UNKNOWN:
        return Decision(Route.BOTH, health, why), state
    good_since = state.good_since if state.good_since is not None else now
    if now - good_since < settings.recovery_seconds:
        return Decision(Route.BOTH, health, why), replace(state, good_since=good_since)
    reason = f"primary good for {now - good_since:.0f}s ({why})"
    return (Decision(Route.PRIMARY, health, why, ("Normal", "FallbackRecovered",
                                                   f"traffic back on the primary: {reason}")),
            BreakerState(CLOSED, since=now, reason=""))


# --- what the operator applies -------------------------------------------------------------------

def fallback_name(dw_name: str) -> str:
    """The fallback's Deployment and ConfigMap: `<dw>-fallback`."""
    return render.revision_name(dw_name, FALLBACK)


def fallback_instance(dw_name: str) -> str:
    """The fallback's `app.kubernetes.io/instance`: `<dw>.fallback`. A dot, because worker names are DNS
    labels: with `<dw>-fallback`, a worker named so would list this Deployment as its own revision
    (and delete it)."""
    return f"{dw_name}.{FALLBACK}"


def fallback_labels() -> dict[str, str]:
    return {api.LABEL_ROLE: FALLBACK}


def fallback_worker_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """A worker spec for the fallback model, for the same render code as the revisions."""
    fallback = spec["fallback"]
    runtime = spec.get("runtime") or {}
    gpus = int(fallback.get("gpusPerReplica", 1))
    fallback_runtime = {key: runtime[key] for key in INHERITED_RUNTIME if key in runtime}
    fallback_runtime.update(gpusPerReplica=gpus, tensorParallelSize=gpus)
    gpu_type = fallback.get("gpuType") or runtime.get("gpuType")
    if gpu_type:
        fallback_runtime["gpuType"] = gpu_type
    return {"model": dict(fallback["model"]), "runtime": fallback_runtime,
            "replicas": int(fallback.get("replicas", 1))}


def render_fallback(body: dict[str, Any], spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The fallback's ConfigMap and Deployment. It answers to the worker's own model name, so clients
    asking for `spec.model.name` keep working (SGLang refuses other names); its real model is in the
    Deployment's `digitalworker.io/model` annotation and in status.fallback.model."""
    fallback_spec = fallback_worker_spec(spec)
    instance = fallback_instance(body["metadata"]["name"])
    return [
        render.render_configmap(body, fallback_spec, FALLBACK, instance=instance, extra_labels=fallback_labels(),
                                served_model_name=spec["model"]["name"]),
        render.render_deployment(body, fallback_spec, FALLBACK, fallback_spec["replicas"], instance=instance,
                                 extra_labels=fallback_labels()),
    ]


def service_selector(route: Route, dw_name: str) -> dict[str, str] | None:
    if route is Route.FALLBACK:
        return {api.LABEL_INSTANCE: fallback_instance(dw_name)}
    if route is Route.BOTH:  # the pod label every pod of the worker carries, the fallback's too
        return {api.LABEL_WORKER: dw_name}
    return None


# --- the reconcile step ---------------------------------------------------------------------------

def reconcile_fallback(ctx, now: float | None = None) -> None:
    """Keep the fallback warm, judge the primary, route the Service; runs just before reconcile_service."""
    from digital_worker.operator.reconcile import Event

    now = time.time() if now is None else now
    old = (ctx.body.get("status") or {}).get("fallback")
    fallback_spec = ctx.spec.get("fallback")
    if not fallback_spec:
        if old:  # only workers that had a fallback pay for the lookups
            _remove(ctx)
            ctx.status["fallback"] = None  # a merge patch with null removes it
            if old.get("active"):
                ctx.events.append(Event("Normal", "FallbackRemoved", "spec.fallback removed: traffic back on the primary"))
        return None
    fallback_ready = _apply_fallback(ctx)
    settings = BreakerSettings.from_spec(fallback_spec)
    state = BreakerState.from_dict((old or {}).get("state"))
    observation = observe_primary(ctx, settings, state, fallback_ready, now)
    decision, state = decide(BreakerContext(now, observation, settings, state))
    selector = service_selector(decision.route, ctx.name)
    if selector is not None:
        ctx.service_selector = selector
    if decision.event:
        type_, reason, message = decision.event
        stable = (ctx.body.get("status") or {}).get("stableRevision")
        ctx.events.append(Event(type_, reason, f"{message} (stable revision {stable}, fallback model "
                                               f"{fallback_spec['model']['name']})"))
    ctx.status["fallback"] = fallback_status(state, fallback_spec)
    return None


def fallback_status(state: BreakerState, fallback_spec: dict[str, Any]) -> dict[str, Any]:
    """status.fallback. Only transitions change it (no live numbers): no status write per evaluation."""
    status = {"active": state.phase != CLOSED, "phase": state.phase, "model": fallback_spec["model"]["name"],
              "reason": state.reason, "state": state.to_dict()}
    if state.phase != CLOSED and state.since is not None:
        status["since"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(state.since))
    return status


def observe_primary(ctx, settings: BreakerSettings, state: BreakerState, fallback_ready: int,
                    now: float) -> Observation:
    """The stable revision's readiness (from the observed Deployment) and error rate (from the metrics)."""
    stable = (ctx.body.get("status") or {}).get("stableRevision")
    deployment = ctx.observed.named("deployments", render.revision_name(ctx.name, stable)) if stable else None
    if deployment is None:
        return Observation(fallback_ready=fallback_ready, window_seconds=settings.window_seconds)
    desired = int((deployment.get("spec") or {}).get("replicas", 0) or 0)
    ready = int((deployment.get("status") or {}).get("readyReplicas", 0) or 0)
    window = settings.window_seconds
    if state.phase == HALF_OPEN and state.since is not None:
        # Judge a trial on its own traffic: the window grows from the trial's start (a broken primary
        # is caught within about WINDOW_FLOOR_SECONDS, not a whole unhealthySeconds window).
        window = min(max(now - state.since, WINDOW_FLOOR_SECONDS), settings.window_seconds)
    if state.phase == OPEN:
        rate, requests, missing = None, None, "the primary gets no traffic while open"
    else:
        rate, requests, missing = measure_error_rate(ctx, stable, window, now)
    return Observation(error_rate=rate, requests=requests, primary_ready=ready, primary_desired=desired,
                       fallback_ready=fallback_ready, window_seconds=window, missing=missing)


def measure_error_rate(ctx, revision: str, window_seconds: float,
                       now: float) -> tuple[float | None, float | None, str]:
    """(error rate, requests, why missing) of one revision over the window, from Prometheus when the
    operator has one, else from the in-process analysis provider; neither: nothing (hold)."""
    from digital_worker.operator.metric_providers import (ERROR_RATE, REQUEST_COUNT, revision_matchers,
                                                         revision_queries)

    if ctx.prometheus_url:
        provider = _prometheus(ctx.prometheus_url)
        if provider is None:
            return None, None, "Prometheus unreachable (retrying shortly)"
    else:
        provider = ctx.analysis_provider
    if provider is None:
        return None, None, "no metrics source"
    queries = revision_queries(revision_matchers(ctx.namespace, ctx.name, revision), window_seconds)
    rate = provider.measure(queries[ERROR_RATE], at=now)
    if ctx.prometheus_url and rate.error and rate.error.split(":", 1)[0] in _UNREACHABLE:
        _prometheus_down_until[ctx.prometheus_url] = time.monotonic() + PROMETHEUS_BACKOFF_SECONDS
        return None, None, rate.error
    if not rate.usable:
        return None, None, rate.error or "no requests in the window"
    count = provider.measure(queries[REQUEST_COUNT], at=now)
    return rate.value, (count.value if count.usable else None), ""


# A stopped Prometheus costs each query its timeout: with many workers judged every few seconds that
# would tie up the reconcile threads, so after a connection failure nobody asks it for a while.
PROMETHEUS_BACKOFF_SECONDS = 15.0
_UNREACHABLE = {"ConnectionError", "ConnectTimeout", "ReadTimeout", "Timeout", "RetryError", "MaxRetryError"}
_prometheus_down_until: dict[str, float] = {}
_prometheus_providers: dict[str, Any] = {}


def _prometheus(url: str):
    """One provider (one HTTP session) per Prometheus URL; None while it is known to be unreachable."""
    from digital_worker.operator.metric_providers import PrometheusProvider

    if time.monotonic() < _prometheus_down_until.get(url, 0.0):
        return None
    provider = _prometheus_providers.get(url)
    if provider is None:
        provider = _prometheus_providers.setdefault(url, PrometheusProvider(url, timeout=3.0))
    return provider


def _apply_fallback(ctx) -> int:
    """Create or repair the fallback's ConfigMap and Deployment (not in ctx.observed: fetched here);
    returns the fallback's ready replicas."""
    from digital_worker.operator.reconcile import Event

    ready = 0
    for desired in render_fallback(ctx.body, ctx.spec):
        plural = "deployments" if desired["kind"] == "Deployment" else "configmaps"
        actual = ctx.client.get(desired["apiVersion"], plural, ctx.namespace, desired["metadata"]["name"])
        if actual is None:
            ctx.client.create(desired)
            ctx.changes += 1
            if desired["kind"] == "Deployment":
                ctx.events.append(Event("Normal", "FallbackCreated",
                                        f"fallback model {ctx.spec['fallback']['model']['name']} kept warm in "
                                        f"{desired['metadata']['name']} ({desired['spec']['replicas']} replica(s))"))
            continue
        from digital_worker.operator.reconcile import _managed, is_subset

        if not is_subset(_managed(desired), actual):
            ctx.client.patch(desired["apiVersion"], plural, ctx.namespace, desired["metadata"]["name"],
                             _managed(desired))
            ctx.changes += 1
        if plural == "deployments":
            ready = int(((actual.get("status") or {}).get("readyReplicas", 0)) or 0)
    return ready


def _remove(ctx) -> None:
    name = fallback_name(ctx.name)
    for api_version, plural in (("apps/v1", "deployments"), ("v1", "configmaps")):
        existing = ctx.client.get(api_version, plural, ctx.namespace, name)
        if existing is not None and (existing["metadata"].get("labels") or {}).get(api.LABEL_ROLE) == FALLBACK:
            ctx.client.delete(api_version, plural, ctx.namespace, name)
            ctx.changes += 1


def evaluation_due(body: dict[str, Any], last: dict[tuple[str, str], float], now: float) -> bool:
    """For the periodic loop: whether a worker with a fallback should get a pass now (the breaker's
    clocks must run even when no event comes), at most every EVALUATION_INTERVAL_SECONDS."""
    meta = body["metadata"]
    key = (meta.get("namespace", ""), meta["name"])
    if not (body.get("spec") or {}).get("fallback") or meta.get("deletionTimestamp"):
        last.pop(key, None)
        return False
    if now - last.get(key, -math.inf) < EVALUATION_INTERVAL_SECONDS:
        return False
    last[key] = now
    return True
