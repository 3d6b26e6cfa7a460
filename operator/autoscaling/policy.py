"""The forecast-driven autoscaling policy: pure `decide(context) -> (decision, new_state)`.

Per tick:
1. Hold on missing or stale metrics (never scale down blind; scale up still allowed when the
   replicas we have are visibly overloaded by the last good samples).
2. Capacity: requests/s one replica sustains within the TTFT SLO, starting from
   `targetRequestsPerReplica` and learned from observed (per-replica load, TTFT p95) pairs; and
   prompt and generated tokens/s, so that longer requests at the same request rate need more
   replicas at once (not after the SLO breaks). The tightest of the three, in requests/s at the
   current request mix, is the capacity every target below divides by.
3. Proactive target: the forecast's upper-quantile peak demand over the provisioning lead time
   (cold start, learned from readiness history, plus one tick) divided by capacity.
4. Reactive safety net: the current demand divided by capacity, and an immediate step up when
   queue length, KV-cache usage or TTFT p95 breach their thresholds, whatever the forecast says.
5. Scale up at once; scale down only to the highest recommendation of the stabilization window,
   at most `maxStepReplicas` at a time; clamp to [min, max]; optional scale-to-zero.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .forecast import Forecast
from .history import (
    GENERATION_TOKEN_RATE,
    GPU_MEMORY_USED,
    GPU_UTILIZATION,
    ITL_P95,
    KV_CACHE_USAGE,
    PROMPT_TOKEN_RATE,
    QUEUE_LENGTH,
    REQUEST_RATE,
    TTFT_P95,
    MetricHistory,
)
from .spec import AutoscalingSpec

SCALE_UP = "ScaleUp"
SCALE_DOWN = "ScaleDown"
HOLD = "Hold"

HOLD_METRICS_STALE = "MetricsStale"
HOLD_METRICS_MISSING = "MetricsMissing"


@dataclass(frozen=True)
class Decision:
    desired_replicas: int
    action: str  # ScaleUp | ScaleDown | Hold
    reason: str
    hold_condition: str | None = None  # e.g. MetricsStale: the caller sets a condition and an Event
    capacity_rps: float | None = None
    forecast: Forecast | None = None
    warning: str | None = None  # e.g. the cold-start warning of scale-to-zero


@dataclass(frozen=True)
class PolicyContext:
    now: float
    spec: AutoscalingSpec
    replicas: int  # currently requested
    ready_replicas: int
    history: MetricHistory  # recent samples, tick resolution
    forecast: Forecast | None = None  # from the cached fit, for the lead time below
    state: object | None = None


@dataclass(frozen=True)
class ForecastPolicyState:
    recommendations: tuple[tuple[float, int], ...] = ()  # (time, raw target) in the stabilization window
    capacity_rps: float | None = None  # learned; None: the spec's starting value
    cold_start_seconds: float | None = None  # learned from readiness history
    scale_up_started: tuple[float, int] | None = None  # (when, target) of an unfinished scale-up
    last_scale_time: float | None = None
    last_demand_time: float | None = None  # last time any demand was seen (scale-to-zero)
    previous_ready: int | None = None  # ready replicas at the previous tick
    overload_streak: int = 0  # consecutive ticks breaking the SLO at a steady fleet
    breach_streak: int = 0  # consecutive ticks with a reactive threshold breached
    # Tokens/s one replica sustains within the SLO, per kind (learned like capacity_rps). The
    # starting values come from the spec, else from the request mix first seen: the mix the
    # request capacity was meant for.
    prompt_tokens_capacity: float | None = None
    generation_tokens_capacity: float | None = None
    prompt_tokens_start: float | None = None
    generation_tokens_start: float | None = None


@dataclass(frozen=True)
class RequestMix:
    """Mean tokens per request over the last few ticks."""

    prompt_tokens: float
    generation_tokens: float


# Requests a mix is measured over before it is trusted: prompt lengths vary a lot, so the mean of
# fewer moves by more than the tolerance below on noise alone.
MIX_MIN_REQUESTS = 100.0
MIX_TICKS = 6
# The starting token capacities come from a longer look (the whole history window).
ANCHOR_MIN_REQUESTS = 300.0
# A token capacity binds only when it is this much tighter than the request capacity: the mix of a
# few ticks is noisy, and the tightest of three noisy estimates would overprovision on noise alone.
MIX_TOLERANCE = 1.2
CAPACITY_KINDS = ("requests", "prompt tokens", "generated tokens")


def request_mix(history: MetricHistory, ticks: int | None = MIX_TICKS,
                min_requests: float = MIX_MIN_REQUESTS) -> RequestMix | None:
    """Tokens per request over the last `ticks` samples (all: None), when the token rates are reported."""
    since = history.timestamps[-ticks] if ticks and len(history.timestamps) >= ticks else -math.inf
    requests = history.points(REQUEST_RATE, since)
    prompt = dict(history.points(PROMPT_TOKEN_RATE, since))
    generated = dict(history.points(GENERATION_TOKEN_RATE, since))
    pairs = [(rate, prompt[t], generated[t]) for t, rate in requests if t in prompt and t in generated]
    total = sum(rate for rate, _, _ in pairs)
    if total <= 0 or total * history.step_seconds < min_requests:
        return None
    return RequestMix(sum(p for _, p, _ in pairs) / total, sum(g for _, _, g in pairs) / total)


def current_mix(history: MetricHistory) -> RequestMix | None:
    """The mix of the last ticks, or of the whole window when they hold too few requests (low load)."""
    return request_mix(history) or request_mix(history, None)


def capacity_at_mix(spec: AutoscalingSpec, state: ForecastPolicyState, mix: RequestMix | None) -> tuple[float, str]:
    """Requests/s one replica sustains at this mix, and which capacity binds.

    The request capacity, unless a token capacity divided by the tokens per request is more than
    `MIX_TOLERANCE` tighter (longer prompts or answers than the mix the estimates were made at).
    """
    capacity = state.capacity_rps or spec.target_requests_per_replica
    binding = CAPACITY_KINDS[0]
    if mix is None:
        return capacity, binding
    tightest = capacity
    for kind, tokens_capacity, per_request in (
        (CAPACITY_KINDS[1], state.prompt_tokens_capacity, mix.prompt_tokens),
        (CAPACITY_KINDS[2], state.generation_tokens_capacity, mix.generation_tokens),
    ):
        if tokens_capacity and per_request > 0 and tokens_capacity / per_request * MIX_TOLERANCE < capacity:
            if tokens_capacity / per_request < tightest:
                tightest, binding = tokens_capacity / per_request, kind
    return tightest, binding


def lead_time_seconds(spec: AutoscalingSpec, state: ForecastPolicyState | None) -> float:
    """How far ahead to provision: cold start (spec, else learned, else 180 s) plus one tick."""
    if spec.forecast.horizon_seconds:
        return float(spec.forecast.horizon_seconds)
    cold_start = spec.cold_start_seconds
    if cold_start is None and state is not None:
        cold_start = state.cold_start_seconds
    if cold_start is None:
        cold_start = 180.0
    return cold_start + spec.interval_seconds


def replicas_for(demand_rps: float, capacity_rps: float) -> int:
    if demand_rps <= 0:
        return 0
    # A hair of tolerance so 3.0000001 demand-units do not buy a fourth replica.
    return max(0, math.ceil(demand_rps / capacity_rps - 1e-6))


class ForecastPolicy:
    """Ours. Stateless object (configuration only); the state travels in the context."""

    name = "forecast"
    # How long a stale sample is still trusted, in ticks.
    STALE_TICKS = 3
    # Share of the fleet added per consecutive tick of a breached threshold.
    BREACH_STEP = 0.1
    # GPU utilisation (node agents, when present) at which the GPUs count as busy: no scale-down
    # then; busy GPUs with requests waiting count as a breach even before TTFT shows it.
    GPU_BUSY = 0.9

    def initial_state(self) -> ForecastPolicyState:
        return ForecastPolicyState()

    # -- capacity -------------------------------------------------------------------------------
    def _learn_capacity(self, context: PolicyContext, state: ForecastPolicyState,
                        mix: RequestMix | None) -> ForecastPolicyState:
        spec, history = context.spec, context.history
        rate = history.latest(REQUEST_RATE)
        ttft = history.latest(TTFT_P95)
        queue = history.latest(QUEUE_LENGTH) or 0.0
        ready = context.ready_replicas
        steady = ready == state.previous_ready
        state = replace(state, previous_ready=ready)
        if state.prompt_tokens_start is None:
            anchor = request_mix(history, None, ANCHOR_MIN_REQUESTS)
            if anchor is not None:
                state = self._anchor_token_capacities(spec, state, anchor)
        # Only a steady set of ready replicas gives clean evidence: when it changed, the samples
        # of the last interval were served by a different number of replicas than `ready`.
        if rate is None or ttft is None or ready <= 0 or rate <= 0 or not steady:
            return state
        slo = spec.slo_ttft_p95_seconds
        capacity, binding = capacity_at_mix(spec, state, mix)
        per_replica = rate / ready
        # Each kind: (state field, its starting value, observed load per replica).
        loads = {CAPACITY_KINDS[0]: ("capacity_rps", spec.target_requests_per_replica, per_replica)}
        if mix is not None and state.prompt_tokens_start is not None:
            loads[CAPACITY_KINDS[1]] = ("prompt_tokens_capacity", state.prompt_tokens_start,
                                        per_replica * mix.prompt_tokens)
            loads[CAPACITY_KINDS[2]] = ("generation_tokens_capacity", state.generation_tokens_start,
                                        per_replica * mix.generation_tokens)
        changes: dict[str, float] = {}
        streak = 0
        if ttft > slo and queue > 0 and per_replica <= 1.1 * capacity:
            # The SLO broke at (or below) the load we call sustainable: real traffic is burstier
            # or requests longer than assumed. Step the binding estimate down a little at a time,
            # so one burst costs little and a real shortfall is corrected within minutes.
            streak = state.overload_streak + 1
            if streak >= 2:  # one tick over the SLO is a burst; two in a row are a pattern
                step_down = 0.97 if streak < 4 else 0.9
                field_name, start, load = loads[binding]
                current = getattr(state, field_name) or start
                changes[field_name] = max(0.3 * start, min(current, load) * step_down)
        elif ttft <= 0.5 * slo and queue <= ready:
            for kind, (field_name, start, load) in loads.items():
                current = getattr(state, field_name) or start
                if current < load and current < start:
                    # A load served comfortably within the SLO is sustainable: an estimate knocked
                    # down below it (by bursts) comes back up to it, at most to its starting value.
                    changes[field_name] = min(start, load)
                elif kind == binding and ttft <= 0.25 * slo and load >= 0.9 * current:
                    # Far within the SLO at close to the estimate: the estimate is too modest.
                    # Probe upwards slowly (TTFT is a hockey stick; an overload brings it down).
                    changes[field_name] = min(2.0 * start, current * 1.01)
        return replace(state, overload_streak=streak, **changes)

    @staticmethod
    def _anchor_token_capacities(spec: AutoscalingSpec, state: ForecastPolicyState, mix: RequestMix) -> ForecastPolicyState:
        """Token capacities to start from: the spec's, else the request capacity at the first mix seen."""
        capacity = state.capacity_rps or spec.target_requests_per_replica
        prompt = spec.target_prompt_tokens_per_replica or capacity * mix.prompt_tokens
        generated = spec.target_generation_tokens_per_replica or capacity * mix.generation_tokens
        if prompt <= 0 or generated <= 0:
            return state
        return replace(state, prompt_tokens_capacity=state.prompt_tokens_capacity or prompt,
                       generation_tokens_capacity=state.generation_tokens_capacity or generated,
                       prompt_tokens_start=prompt, generation_tokens_start=generated)

    # -- cold start -----------------------------------------------------------------------------
    def _learn_cold_start(self, context: PolicyContext, state: ForecastPolicyState) -> ForecastPolicyState:
        if state.scale_up_started is None:
            return state
        started, target = state.scale_up_started
        if context.ready_replicas >= target:
            measured = context.now - started
            previous = state.cold_start_seconds
            learned = measured if previous is None else 0.7 * previous + 0.3 * measured
            return replace(state, cold_start_seconds=learned, scale_up_started=None)
        if context.replicas < target:  # someone scaled down meanwhile: this sample is void
            return replace(state, scale_up_started=None)
        return state

    # -- decide ---------------------------------------------------------------------------------
    def decide(self, context: PolicyContext) -> tuple[Decision, ForecastPolicyState]:
        spec = context.spec
        state = context.state if isinstance(context.state, ForecastPolicyState) else self.initial_state()
        state = self._learn_cold_start(context, state)
        current = context.replicas
        history = context.history
        staleness = history.staleness(context.now, REQUEST_RATE)
        rate = history.latest(REQUEST_RATE)

        if history.error is not None or rate is None:
            condition = HOLD_METRICS_MISSING
            why = history.error or "no request-rate samples"
            return self._hold(context, state, condition, f"holding at {current}: metrics unavailable ({why})")
        if staleness > self.STALE_TICKS * max(spec.interval_seconds, history.step_seconds):
            return self._hold(
                context, state, HOLD_METRICS_STALE,
                f"holding at {current}: newest metrics are {staleness:.0f}s old",
            )

        mix = current_mix(history)
        state = self._learn_capacity(context, state, mix)
        capacity, binding = capacity_at_mix(spec, state, mix)
        if rate > 0 or (history.latest(QUEUE_LENGTH) or 0) > 0:
            state = replace(state, last_demand_time=context.now)

        reasons: list[str] = []
        reactive_target = replicas_for(rate, capacity)
        target = reactive_target
        reasons.append(f"demand {rate:.2f} req/s needs {reactive_target} at {capacity:.2f} req/s per replica")
        if binding != CAPACITY_KINDS[0]:
            per_request = mix.prompt_tokens if binding == CAPACITY_KINDS[1] else mix.generation_tokens
            reasons.append(f"capacity bound by {binding} ({per_request:.0f} per request)")

        forecast = context.forecast
        if forecast is not None:
            proactive_target = replicas_for(forecast.upper, capacity)
            if proactive_target > target:
                target = proactive_target
                reasons.append(
                    f"forecast p{forecast.quantile * 100:g} peak {forecast.upper:.2f} req/s within "
                    f"{forecast.horizon_seconds:.0f}s needs {proactive_target}"
                )

        breach = self._breach(context)
        state = replace(state, breach_streak=state.breach_streak + 1 if breach else 0)
        if breach:
            # Scale up at once: enough for the current demand plus draining the queue within the
            # lead time, and at least one replica more than are serving. Replicas still starting
            # count: asking again each tick while they warm up would only overshoot.
            queue = history.latest(QUEUE_LENGTH) or 0.0
            drain = replicas_for(rate + queue / lead_time_seconds(spec, state), capacity)
            stepped = max(drain, context.ready_replicas + 1)
            if context.ready_replicas >= current:  # nothing pending: the step is needed now
                stepped = max(stepped, current + max(1, math.ceil(current * self.BREACH_STEP)))
            if stepped > target:
                target = stepped
            reasons.append(breach)

        warning = None
        if spec.scale_to_zero:
            queue_now = history.latest(QUEUE_LENGTH) or 0.0
            if current == 0 and (rate > 0 or queue_now > 0):
                target = max(target, 1)
                reasons.append("demand arrived while scaled to zero")
            idle_since = state.last_demand_time if state.last_demand_time is not None else context.now
            if state.last_demand_time is None:
                state = replace(state, last_demand_time=context.now)
            idle_long = context.now - idle_since >= spec.scale_down.stabilization_seconds
            if target == 0 and idle_long:
                warning = (
                    "scaled to zero: the next request waits a full cold start "
                    f"(~{lead_time_seconds(spec, state) - spec.interval_seconds:.0f}s)"
                )
                reasons.append(f"no demand for {context.now - idle_since:.0f}s")
            else:
                target = max(target, 1, spec.min_replicas)
        else:
            target = max(target, spec.min_replicas)
        target = min(spec.max_replicas, target)

        # Stabilization: scale down only to the highest recommendation in the window.
        window_start = context.now - spec.scale_down.stabilization_seconds
        recommendations = tuple((t, r) for t, r in state.recommendations if t > window_start) + ((context.now, target),)
        if not state.recommendations:
            # A fresh start (new object, operator restart) has not watched a whole window yet:
            # count the replicas it found as a recommendation, so it cannot scale down at once.
            recommendations = ((context.now, current),) + recommendations
        state = replace(state, recommendations=recommendations)
        desired = target
        gpu = history.latest(GPU_UTILIZATION)
        if target < current and gpu is not None and gpu >= self.GPU_BUSY:
            desired = current
            reasons.append(f"no scale-down while the GPUs are {gpu:.0%} busy")
        elif target < current:
            stabilized = max(r for _, r in recommendations)
            desired = max(target, min(current, stabilized), current - spec.scale_down.max_step_replicas)
            if desired > target:
                reasons.append(f"scale-down stabilised ({spec.scale_down.stabilization_seconds:.0f}s window, "
                               f"max step {spec.scale_down.max_step_replicas})")
        desired = min(spec.max_replicas, max(0 if spec.scale_to_zero else spec.min_replicas, desired))

        action = SCALE_UP if desired > current else SCALE_DOWN if desired < current else HOLD
        if action != HOLD:
            state = replace(state, last_scale_time=context.now)
        if action == SCALE_UP:
            state = replace(state, scale_up_started=(context.now, desired))
        decision = Decision(
            desired_replicas=desired,
            action=action,
            reason="; ".join(reasons),
            capacity_rps=capacity,
            forecast=forecast,
            warning=warning if desired == 0 else None,
        )
        return decision, state

    def _breach(self, context: PolicyContext) -> str | None:
        spec, history = context.spec, context.history
        ready = max(1, context.ready_replicas)
        queue = history.latest(QUEUE_LENGTH)
        if queue is not None and queue > spec.reactive.queue_length_per_replica * ready:
            return f"queue {queue:.0f} above {spec.reactive.queue_length_per_replica:g} per replica"
        kv = history.latest(KV_CACHE_USAGE)
        if kv is not None and kv > spec.reactive.kv_cache_usage:
            return f"KV-cache usage {kv:.0%} above {spec.reactive.kv_cache_usage:.0%}"
        gpu_memory = history.latest(GPU_MEMORY_USED)
        if kv is None and gpu_memory is not None and gpu_memory > spec.reactive.kv_cache_usage:
            # No KV-cache gauge (another exporter): the cache lives in GPU memory, the next best sign.
            return f"GPU memory {gpu_memory:.0%} used (no KV-cache gauge) above {spec.reactive.kv_cache_usage:.0%}"
        gpu = history.latest(GPU_UTILIZATION)
        if gpu is not None and gpu >= self.GPU_BUSY and queue is not None and queue > ready:
            return f"GPUs {gpu:.0%} busy with {queue:.0f} requests waiting"
        ttft = history.latest(TTFT_P95)
        if ttft is not None and ttft > spec.reactive_ttft_seconds:
            return f"TTFT p95 {ttft:.2f}s above {spec.reactive_ttft_seconds:g}s"
        itl = history.latest(ITL_P95)
        if spec.slo_itl_p95_seconds and itl is not None and itl > spec.slo_itl_p95_seconds:
            # Inter-token latency grows with the running batch: more replicas, smaller batches.
            return f"ITL p95 {itl * 1000:.0f}ms above {spec.slo_itl_p95_seconds * 1000:g}ms"
        return None

    def _hold(self, context: PolicyContext, state: ForecastPolicyState, condition: str, reason: str):
        """No trustworthy metrics: keep the replicas we have (clamped to min/max), say why."""
        spec = context.spec
        desired = min(spec.max_replicas, max(spec.floor_replicas, context.replicas))
        action = SCALE_UP if desired > context.replicas else SCALE_DOWN if desired < context.replicas else HOLD
        decision = Decision(desired, action, reason, hold_condition=condition,
                            capacity_rps=state.capacity_rps or spec.target_requests_per_replica)
        return decision, state
