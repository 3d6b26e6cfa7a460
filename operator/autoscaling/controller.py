"""`Autoscaler`: per-DigitalWorker state and cached fits around the pure policy, for a kopf timer.

Each `tick` reads a short metric history (tick resolution) and, once per forecast bucket, the long
demand history; forecasts from the cached fit (cheap); decides; and returns the decision plus the
dict for `status.autoscaling`. Refits run in a worker (thread pool by default, any
`concurrent.futures.Executor` may be given) and are installed on a later tick: a tick never waits
for statsmodels. DryRun vs Auto is the caller's business: the decision always says what it would do.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping

from .forecast import MAX_FIT_BUCKETS, Forecast, IncrementalForecaster, fit_forecaster
from .history import GPU_MEMORY_USED, GPU_UTILIZATION, REQUEST_RATE, MetricHistory
from .metrics import MetricsSource
from .policy import (HOLD, HOLD_METRICS_MISSING, HOLD_METRICS_STALE, Decision, ForecastPolicy, ForecastPolicyState,
                     PolicyContext, lead_time_seconds)
from .spec import AutoscalingSpec, SpecError, parse_spec

INVALID_SPEC = "InvalidSpec"


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class _Entry:
    """Everything remembered about one DigitalWorker between ticks."""

    policy_state: ForecastPolicyState | None = None
    forecaster: IncrementalForecaster | None = None
    bucket_times: list[float] = field(default_factory=list)  # demand series: bucket start times
    bucket_values: list[float] = field(default_factory=list)
    last_long_fetch: float = -math.inf
    last_fit_time: float = -math.inf
    fit_future: asyncio.Future | None = None
    fit_signature: tuple | None = None
    last_scale_time: float | None = None
    last_forecast: Forecast | None = None
    pending_one_step: tuple[float, float] | None = None  # (bucket time, predicted) to score error
    last_fit_seconds: float | None = None
    last_error: float | None = None


class OperatorMetrics:
    """Prometheus metrics about the autoscaler itself: decisions, replicas (current, desired), the
    demand forecast and its error, fit time, and whether it holds for lack of metrics."""

    def __init__(self, registry=None) -> None:
        from prometheus_client import REGISTRY, Counter, Gauge, Histogram

        registry = registry if registry is not None else REGISTRY
        self.decisions = Counter(
            "digitalworker_autoscaler_decisions", "Autoscaling decisions by action and mode",
            ["namespace", "name", "action", "mode"], registry=registry)
        self.forecast_error = Gauge(
            "digitalworker_autoscaler_forecast_abs_error", "Absolute error of the last one-bucket-ahead "
            "demand forecast (requests/s)", ["namespace", "name"], registry=registry)
        self.fit_seconds = Histogram(
            "digitalworker_autoscaler_fit_seconds", "Time to fit the demand forecasting models",
            registry=registry, buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.desired = Gauge(
            "digitalworker_autoscaler_desired_replicas", "Replicas the autoscaler wants",
            ["namespace", "name"], registry=registry)
        self.current = Gauge(
            "digitalworker_autoscaler_current_replicas", "Replicas the worker had when the autoscaler decided",
            ["namespace", "name"], registry=registry)
        self.forecast = Gauge(
            "digitalworker_autoscaler_forecast_requests_per_second", "Demand forecast at the lead time "
            "(requests/s): the point forecast and its band", ["namespace", "name", "bound"], registry=registry)
        self.holding = Gauge(
            "digitalworker_autoscaler_holding", "1 while the autoscaler holds because of this condition "
            "(MetricsStale, MetricsMissing): it cannot see the load", ["namespace", "name", "condition"],
            registry=registry)
        self._hold_conditions: dict[tuple[str, str], set[str]] = {}

    def record(self, namespace: str, name: str, decision: Decision, spec_mode: str, replicas: int,
               forecast: Forecast | None, forecast_error: float | None) -> None:
        self.decisions.labels(namespace, name, decision.action, spec_mode).inc()
        self.desired.labels(namespace, name).set(decision.desired_replicas)
        self.current.labels(namespace, name).set(replicas)
        if forecast_error is not None:
            self.forecast_error.labels(namespace, name).set(forecast_error)
        if forecast is not None:
            for bound, value in (("point", forecast.point), ("upper", forecast.upper), ("lower", forecast.lower)):
                self.forecast.labels(namespace, name, bound).set(value)
        # Every condition this worker ever held on stays a series: 0 once it clears, so alerts resolve.
        seen = self._hold_conditions.setdefault((namespace, name), set())
        for condition in (HOLD_METRICS_STALE, HOLD_METRICS_MISSING, decision.hold_condition):
            if condition:
                seen.add(condition)
        for condition in seen:
            self.holding.labels(namespace, name, condition).set(1 if condition == decision.hold_condition else 0)

    def forget(self, namespace: str, name: str) -> None:
        """Drop a deleted worker's series (so no alert holds on for a worker that is gone)."""
        for gauge in (self.forecast_error, self.desired, self.current):
            try:
                gauge.remove(namespace, name)
            except KeyError:
                pass
        for bound in ("point", "upper", "lower"):
            try:
                self.forecast.remove(namespace, name, bound)
            except KeyError:
                pass
        for condition in self._hold_conditions.pop((namespace, name), set()):
            try:
                self.holding.remove(namespace, name, condition)
            except KeyError:
                pass


class Autoscaler:
    """Holds per-DigitalWorker state; `tick` is what the operator's timer calls."""

    def __init__(
        self,
        *,
        bucket_seconds: float = 300.0,
        history_seconds: float = 21 * 86400.0,
        executor: concurrent.futures.Executor | None = None,
        metrics: OperatorMetrics | None = None,
        policy: ForecastPolicy | None = None,
    ) -> None:
        self.bucket_seconds = bucket_seconds
        self.history_seconds = history_seconds
        self.policy = policy or ForecastPolicy()
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="dw-fit")
        self._owns_executor = executor is None
        self.metrics = metrics
        self._entries: dict[str, _Entry] = {}

    def install_fit(self, key: str, model, bucket_times: list[float], bucket_values: list[float],
                    fitted_at: float) -> None:
        """Restore a fit made elsewhere (a restart, a shared fit for many look-alike workers)."""
        entry = self._entries.setdefault(key, _Entry())
        entry.bucket_times = list(bucket_times)
        entry.bucket_values = list(bucket_values)
        used = model.observations or len(bucket_values)
        entry.forecaster = IncrementalForecaster(model, entry.bucket_values[-used:])
        entry.last_fit_time = fitted_at
        entry.last_long_fetch = fitted_at
        entry.last_fit_seconds = model.fit_seconds

    def forget(self, key: str) -> None:
        """Drop a deleted DigitalWorker's state."""
        entry = self._entries.pop(key, None)
        if entry is not None and entry.fit_future is not None:
            entry.fit_future.cancel()
        if self.metrics is not None:
            namespace, _, name = key.rpartition("/")
            self.metrics.forget(namespace, name)

    def close(self) -> None:
        if self._owns_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def wait_for_fits(self, timeout: float = 60.0) -> None:
        """Wait until no fit is running (tests, and a clean shutdown)."""
        futures = [e.fit_future for e in self._entries.values() if e.fit_future is not None]
        if futures:
            async with asyncio.timeout(timeout):  # not wait_for, which can swallow a cancel on Python 3.11
                await asyncio.gather(*futures, return_exceptions=True)

    # -- reading metrics --------------------------------------------------------------------------
    async def _read(self, source: MetricsSource, selector: str, window: float, step: float, now: float,
                    names=None, gpu_pods=None) -> MetricHistory:
        extra = {"gpu_pods": gpu_pods} if gpu_pods is not None else {}
        if getattr(source, "blocking", True) is False:
            return source.history(selector, window, step, now, names, **extra)
        try:
            return await asyncio.to_thread(source.history, selector, window, step, now, names, **extra)
        except Exception as exc:  # a source that raises is treated like one that is down
            return MetricHistory.failed(f"{type(exc).__name__}: {exc}")

    async def _refresh_demand(self, entry: _Entry, source: MetricsSource, selector: str, now: float) -> None:
        """Once per bucket: fetch the long demand series, append the new complete buckets."""
        if now - entry.last_long_fetch < self.bucket_seconds:
            return
        window = self.history_seconds if not entry.bucket_times else now - entry.bucket_times[-1] + self.bucket_seconds
        long = await self._read(source, selector, min(window, self.history_seconds), self.bucket_seconds, now,
                                (REQUEST_RATE,))
        if long.error is not None:
            return
        entry.last_long_fetch = now
        last = entry.bucket_times[-1] if entry.bucket_times else -math.inf
        for timestamp, value in long.points(REQUEST_RATE):
            # Range queries are not aligned between calls: keep points at least half a bucket apart.
            if timestamp < last + 0.5 * self.bucket_seconds:
                continue
            # Score the last one-bucket-ahead forecast against what happened.
            if entry.pending_one_step is not None and self.metrics is not None:
                entry.last_error = abs(value - entry.pending_one_step[1])
            entry.bucket_times.append(timestamp)
            entry.bucket_values.append(value)
            if entry.forecaster is not None:
                entry.forecaster.append(value)
            last = timestamp
        limit = int(self.history_seconds / self.bucket_seconds) + 1
        if len(entry.bucket_values) > limit:
            del entry.bucket_times[:-limit]
            del entry.bucket_values[:-limit]

    def _maybe_start_fit(self, entry: _Entry, spec: AutoscalingSpec, now: float, lead: float) -> None:
        signature = (spec.forecast.quantile, spec.forecast.seasonality, round(lead))
        if entry.fit_future is not None or not entry.bucket_values:
            return
        due = now - entry.last_fit_time >= spec.forecast.refit_interval_seconds or signature != entry.fit_signature
        # A first fit as soon as there are a few buckets; refit early while the history is young.
        young = (entry.forecaster is not None
                 and entry.forecaster.model.observations < 0.5 * min(len(entry.bucket_values), MAX_FIT_BUCKETS))
        if not (due or young):
            return
        horizon = max(1, math.ceil((lead + 1.5 * self.bucket_seconds) / self.bucket_seconds))
        values = list(entry.bucket_values)
        loop = asyncio.get_running_loop()
        entry.fit_future = loop.run_in_executor(
            self._executor, fit_forecaster, values, self.bucket_seconds, spec.forecast.quantile, horizon,
            spec.forecast.seasonality,
        )
        entry.fit_signature = signature
        entry.last_fit_time = now
        fitted_length = len(values)

        def install(future: asyncio.Future) -> None:
            entry.fit_future = None
            if future.cancelled() or future.exception() is not None:
                return
            model = future.result()
            # Replay the fitted window, then everything that arrived while fitting.
            used = model.observations or fitted_length
            forecaster = IncrementalForecaster(model, values[-used:])
            for value in entry.bucket_values[fitted_length:]:
                forecaster.append(value)
            entry.forecaster = forecaster
            entry.last_fit_seconds = model.fit_seconds
            if self.metrics is not None:
                self.metrics.fit_seconds.observe(model.fit_seconds)

        entry.fit_future.add_done_callback(install)

    # -- the tick ---------------------------------------------------------------------------------
    async def tick(
        self,
        key: str,
        spec_autoscaling: Mapping[str, Any] | None,
        replicas: int,
        ready_replicas: int,
        now: float | None = None,
        source: MetricsSource | None = None,
        *,
        selector: str | None = None,
        node_provisioning_seconds: float = 0.0,
        gpu_pods: tuple[str, tuple[str, ...]] | None = None,
    ) -> tuple[Decision, dict]:
        """Decide for one DigitalWorker. `key` is "namespace/name"; `selector` the PromQL label
        matcher of its pods' series, all revisions (default: `key`, the in-memory source's naming);
        `node_provisioning_seconds` is added to the lead time when new replicas need new nodes;
        `gpu_pods` (namespace, pod names) lets the source add the node agents' GPU series."""
        now = time.time() if now is None else now
        entry = self._entries.setdefault(key, _Entry())
        try:
            spec = parse_spec(spec_autoscaling)
        except SpecError as exc:
            decision = Decision(replicas, HOLD, f"invalid autoscaling spec: {exc}", hold_condition=INVALID_SPEC)
            return decision, {"mode": (spec_autoscaling or {}).get("mode", "Off"), "desiredReplicas": replicas,
                              "reason": decision.reason, "holdCondition": INVALID_SPEC}
        if spec.mode == "Off":
            decision = Decision(replicas, HOLD, "autoscaling is off")
            return decision, {"mode": "Off", "desiredReplicas": replicas, "reason": decision.reason}
        if source is None:
            raise ValueError("a MetricsSource is needed unless mode is Off")
        selector = selector or key

        lead = lead_time_seconds(spec, entry.policy_state) + max(0.0, node_provisioning_seconds)
        short_window = max(12 * spec.interval_seconds, 300.0)
        history = await self._read(source, selector, short_window, spec.interval_seconds, now,
                                   gpu_pods=gpu_pods)
        if history.error is None:
            await self._refresh_demand(entry, source, selector, now)
            self._maybe_start_fit(entry, spec, now, lead)
        forecast = None
        if entry.forecaster is not None and entry.bucket_times:
            since = max(0.0, now - (entry.bucket_times[-1] + self.bucket_seconds))
            forecast = entry.forecaster.forecast(lead + self.bucket_seconds / 2.0, since)
            entry.pending_one_step = (entry.bucket_times[-1] + self.bucket_seconds, forecast.path[0] if forecast.path else forecast.point)
        entry.last_forecast = forecast

        context = PolicyContext(now, spec, replicas, ready_replicas, history, forecast, entry.policy_state)
        decision, entry.policy_state = self.policy.decide(context)
        if decision.action != HOLD and spec.mode == "Auto":
            entry.last_scale_time = now
        if self.metrics is not None:
            namespace, _, name = key.rpartition("/")
            self.metrics.record(namespace, name, decision, spec.mode, replicas, decision.forecast or forecast,
                                entry.last_error)
        return decision, self._status(spec, decision, entry, replicas, ready_replicas, history)

    def _status(self, spec: AutoscalingSpec, decision: Decision, entry: _Entry, replicas: int, ready: int,
                history: MetricHistory | None = None) -> dict:
        state = entry.policy_state
        status: dict[str, Any] = {
            "mode": spec.mode,
            "desiredReplicas": decision.desired_replicas,
            "currentReplicas": replicas,
            "readyReplicas": ready,
            "action": decision.action,
            "reason": decision.reason,
            "capacityRequestsPerReplica": round(decision.capacity_rps, 4) if decision.capacity_rps else None,
            "lastScaleTime": _iso(entry.last_scale_time),
        }
        if decision.hold_condition:
            status["holdCondition"] = decision.hold_condition
        if decision.warning:
            status["warning"] = decision.warning
        forecast = decision.forecast or entry.last_forecast
        if forecast is not None:
            status["forecast"] = {
                "value": round(forecast.point, 4),
                "upper": round(forecast.upper, 4),
                "lower": round(forecast.lower, 4),
                "quantile": forecast.quantile,
                "horizonSeconds": round(forecast.horizon_seconds, 1),
                "model": forecast.model,
            }
        if state is not None:
            # The token capacities (learned like the request capacity) once a request mix was seen.
            for field_name, value in (("capacityPromptTokensPerReplica", state.prompt_tokens_capacity),
                                      ("capacityGenerationTokensPerReplica", state.generation_tokens_capacity)):
                if value is not None:
                    status[field_name] = round(value, 2)
        if state is not None and state.cold_start_seconds is not None:
            status["learnedColdStartSeconds"] = round(state.cold_start_seconds, 1)
        if entry.last_fit_seconds is not None:
            status["lastFitSeconds"] = round(entry.last_fit_seconds, 3)
        # What the node agents report for this worker's GPUs, when they do (policy inputs).
        for field_name, series in (("gpuUtilization", GPU_UTILIZATION), ("gpuMemoryUsed", GPU_MEMORY_USED)):
            value = history.latest(series) if history is not None else None
            if value is not None:
                status[field_name] = round(value, 4)
        return {k: v for k, v in status.items() if v is not None}
