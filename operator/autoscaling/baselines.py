"""Baseline policies, tuned honestly, to compare ours against on the same replayed traffic.

Each follows the published behaviour of the system it is named after, with that system's default
knobs unless a better setting exists for this workload (then the better one is used):

* `ReactiveHpaPolicy`: Kubernetes HPA on requests/s per replica at a target utilisation of the SLO
  capacity; 10% tolerance; scale up at most max(4 pods, 100%) per 15 s; scale-down to the highest
  recommendation of the last 300 s (HPA's default stabilization window).
* `KedaPolicy`: KEDA's Prometheus scaler with an AverageValue threshold on in-flight requests
  (running + queued, SGLang's num_running_reqs + num_queue_reqs); KEDA feeds HPA, so the same
  HPA behaviour applies.
* `AibrixPolicy`: AIBrix's KPA (Knative-style 60 s stable window, 6 s panic window, panic at 2x,
  no scale-down while panicking) with a linear-projection floor: the least-squares trend of the
  last 5 minutes projected over the cold start.
* `DynamoPolicy`: NVIDIA Dynamo planner's load-predictor mode: an ARIMA forecast of the next
  interval's request rate (here over the cold start too, so it is not handicapped by lead time),
  replicas = predicted load / per-replica capacity at the TTFT target; no stabilization.
* `OraclePolicy`: perfect foresight of demand, fed in by the simulator as a `Forecast` of the exact
  future peak; the physical limit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .history import QUEUE_LENGTH, REQUEST_RATE, RUNNING_REQUESTS
from .policy import HOLD, SCALE_DOWN, SCALE_UP, Decision, PolicyContext, replicas_for

HPA_TOLERANCE = 0.1
HPA_STABILIZATION_SECONDS = 300.0


@dataclass(frozen=True)
class WindowState:
    recommendations: tuple[tuple[float, int], ...] = ()
    panic_until: float | None = None


def _action(desired: int, current: int) -> str:
    return SCALE_UP if desired > current else SCALE_DOWN if desired < current else HOLD


def _clamp(context: PolicyContext, desired: int) -> int:
    spec = context.spec
    return min(spec.max_replicas, max(spec.min_replicas, desired))


def _hpa_behaviour(context: PolicyContext, state: WindowState, raw: int, stabilization: float) -> tuple[int, WindowState]:
    """HPA's default behaviour: fast bounded scale-up, stabilized scale-down."""
    current = context.replicas
    window_start = context.now - stabilization
    recommendations = tuple((t, r) for t, r in state.recommendations if t > window_start) + ((context.now, raw),)
    state = replace(state, recommendations=recommendations)
    if raw > current:
        # Default scale-up policy: +100% or +4 pods per 15 s, whichever is more.
        periods = max(1.0, context.spec.interval_seconds / 15.0)
        limit = current
        for _ in range(int(periods)):
            limit = max(limit * 2, limit + 4)
        return min(raw, limit), state
    if raw < current:
        return min(current, max(r for _, r in recommendations)), state
    return raw, state


class ReactiveHpaPolicy:
    def __init__(self, target_utilization: float = 0.7) -> None:
        self.target_utilization = target_utilization
        self.name = f"reactive-hpa-{round(target_utilization * 100)}"

    def initial_state(self) -> WindowState:
        return WindowState()

    def decide(self, context: PolicyContext):
        state = context.state if isinstance(context.state, WindowState) else WindowState()
        rate = context.history.latest(REQUEST_RATE)
        current = context.replicas
        if rate is None:
            return Decision(current, HOLD, "no metrics", hold_condition="MetricsMissing"), state
        target_per_replica = self.target_utilization * context.spec.target_requests_per_replica
        ready = max(1, context.ready_replicas)
        ratio = (rate / ready) / target_per_replica
        if abs(ratio - 1.0) <= HPA_TOLERANCE and context.ready_replicas == current:
            raw = current
        else:
            raw = max(1, math.ceil(rate / target_per_replica - 1e-9))
        desired, state = _hpa_behaviour(context, state, raw, HPA_STABILIZATION_SECONDS)
        desired = _clamp(context, desired)
        return Decision(desired, _action(desired, current), f"utilisation ratio {ratio:.2f}"), state


class KedaPolicy:
    """KEDA Prometheus scaler on in-flight requests; `threshold` is the per-replica AverageValue."""

    def __init__(self, threshold: float, name: str = "keda-inflight") -> None:
        self.threshold = threshold
        self.name = name

    def initial_state(self) -> WindowState:
        return WindowState()

    def decide(self, context: PolicyContext):
        state = context.state if isinstance(context.state, WindowState) else WindowState()
        running = context.history.latest(RUNNING_REQUESTS)
        queued = context.history.latest(QUEUE_LENGTH) or 0.0
        current = context.replicas
        if running is None:
            return Decision(current, HOLD, "no metrics", hold_condition="MetricsMissing"), state
        inflight = running + queued
        raw = max(1, math.ceil(inflight / self.threshold - 1e-9))
        if current and abs(inflight / (self.threshold * max(1, context.ready_replicas)) - 1.0) <= HPA_TOLERANCE:
            raw = current
        desired, state = _hpa_behaviour(context, state, raw, HPA_STABILIZATION_SECONDS)
        desired = _clamp(context, desired)
        return Decision(desired, _action(desired, current), f"in-flight {inflight:.1f}"), state


class AibrixPolicy:
    STABLE_WINDOW = 60.0
    PANIC_THRESHOLD = 2.0
    PROJECTION_WINDOW = 300.0

    def __init__(self, target_utilization: float = 0.7, lead_seconds: float = 180.0,
                 scale_down_delay: float = 300.0) -> None:
        self.target_utilization = target_utilization
        self.lead_seconds = lead_seconds
        self.scale_down_delay = scale_down_delay
        self.name = "aibrix-kpa-linear"

    def initial_state(self) -> WindowState:
        return WindowState()

    def decide(self, context: PolicyContext):
        state = context.state if isinstance(context.state, WindowState) else WindowState()
        history = context.history
        current = context.replicas
        latest = history.latest(REQUEST_RATE)
        if latest is None:
            return Decision(current, HOLD, "no metrics", hold_condition="MetricsMissing"), state
        target = self.target_utilization * context.spec.target_requests_per_replica
        stable = history.mean(REQUEST_RATE, context.now - self.STABLE_WINDOW) or latest
        desired_stable = math.ceil(stable / target - 1e-9)
        desired_panic = math.ceil(latest / target - 1e-9)  # the newest sample: the panic window
        ready = max(1, context.ready_replicas)
        panic_until = state.panic_until
        if desired_panic >= self.PANIC_THRESHOLD * ready:
            panic_until = context.now + self.STABLE_WINDOW
        in_panic = panic_until is not None and context.now < panic_until
        raw = max(desired_stable, desired_panic) if in_panic else desired_stable
        # Linear-projection floor: where the trend of the last minutes leads within the cold start.
        points = history.points(REQUEST_RATE, context.now - self.PROJECTION_WINDOW)
        if len(points) >= 3:
            mean_t = sum(t for t, _ in points) / len(points)
            mean_v = sum(v for _, v in points) / len(points)
            var_t = sum((t - mean_t) ** 2 for t, _ in points)
            slope = sum((t - mean_t) * (v - mean_v) for t, v in points) / var_t if var_t else 0.0
            projected = mean_v + slope * (context.now + self.lead_seconds - mean_t)
            raw = max(raw, math.ceil(projected / target - 1e-9))
        raw = max(1, raw)
        state = replace(state, panic_until=panic_until)
        if in_panic and raw < current:
            raw = current
        desired, state = _hpa_behaviour(context, state, raw, self.scale_down_delay)
        desired = _clamp(context, desired)
        return Decision(desired, _action(desired, current), "panic" if in_panic else "stable"), state


class DynamoPolicy:
    """Replicas from the ARIMA forecast (context.forecast, point value) and the SLO capacity."""

    name = "dynamo-arima"

    def initial_state(self) -> WindowState:
        return WindowState()

    def decide(self, context: PolicyContext):
        state = context.state if isinstance(context.state, WindowState) else WindowState()
        current = context.replicas
        forecast = context.forecast
        rate = context.history.latest(REQUEST_RATE)
        if forecast is None and rate is None:
            return Decision(current, HOLD, "no metrics", hold_condition="MetricsMissing"), state
        predicted = forecast.point if forecast is not None else rate
        desired = _clamp(context, max(1, replicas_for(predicted, context.spec.target_requests_per_replica)))
        return Decision(desired, _action(desired, current), f"ARIMA predicts {predicted:.2f} req/s"), state


class OraclePolicy:
    """Perfect foresight: `context.forecast.upper` is the true peak demand over the lead time."""

    name = "oracle"

    def initial_state(self) -> WindowState:
        return WindowState()

    def decide(self, context: PolicyContext):
        state = context.state if isinstance(context.state, WindowState) else WindowState()
        current = context.replicas
        needed = context.forecast.upper if context.forecast is not None else 0.0
        # The oracle's forecast is already in replicas (see the simulator): no capacity division.
        desired = _clamp(context, max(1, int(needed)))
        return Decision(desired, _action(desired, current), "perfect foresight"), state
