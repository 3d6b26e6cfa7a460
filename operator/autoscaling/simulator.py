"""Trace-replay simulator: a demand series against a simulated fleet, any policy, virtual time.

Time resolution. NAB series have one point per 5 or 30 minutes over weeks to months; replaying
them request by request would be millions of requests per run. The fleet is therefore simulated
as a fluid in steps of `step_seconds` (default 10 s): demand between two trace points is linear,
multiplied per step by a burst factor sampled from the Azure LLM trace (its over-Poisson
variation around a 5-minute mean at that step size; Poisson noise itself is in the queueing model).
Within a step each ready replica is a queue whose TTFT distribution comes from
`digital_worker.runtime.perfmodel` (the same model, same GPU profile, as the HTTP simulator):
`ttft_attainment` for the share of requests within the SLO at that load, `capacity_rps` for
saturation; demand beyond saturation accumulates as a backlog whose wait adds to every TTFT.
Request sizes (mean prompt and output tokens) come from the Azure LLM trace.

Replicas: a scale-up starts replicas that become ready after the cold start; GPU time counts from
the start (the GPU is held while the model loads). A scale-down removes not-yet-ready replicas
first. Policies run every `tick_seconds` on a metric history like the one Prometheus would give
(request rate, queue, running, KV usage, TTFT p95), and forecast-using policies refit on schedule.
"""
from __future__ import annotations

import bisect
import csv
import math
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np

from digital_worker.runtime.perfmodel import (
    ReplicaParams,
    capacity_rps,
    decode_step_seconds,
    max_batch,
    sustainable_rps,
    ttft_attainment,
    ttft_quantile,
)

from .baselines import AibrixPolicy, DynamoPolicy, KedaPolicy, OraclePolicy, ReactiveHpaPolicy
from .forecast import MAX_FIT_BUCKETS, Forecast, IncrementalForecaster, fit_arima, fit_forecaster
from .history import (
    GENERATION_TOKEN_RATE,
    KV_CACHE_USAGE,
    PROMPT_TOKEN_RATE,
    QUEUE_LENGTH,
    REQUEST_RATE,
    RUNNING_REQUESTS,
    TTFT_P95,
    MetricHistory,
)
from .policy import ForecastPolicy, PolicyContext
from .spec import AutoscalingSpec, ForecastSpec, ScaleDownSpec

# Buckets the Dynamo-like ARIMA is fitted on (a day of 5-minute buckets).
ARIMA_WINDOW = 288
# Requests that waited this long are abandoned by their clients (and already counted as misses).
ABANDON_SECONDS = 120.0
# The capacity every policy is given and the oracle plans with: the request rate one replica
# serves with TTFT p99 within the SLO (so that meeting it is worth >= 99% attainment).
CAPACITY_QUANTILE = 0.99


# ---------------------------------------------------------------------------------------------
# Workloads


@dataclass(frozen=True)
class RequestSizes:
    mean_prompt_tokens: float
    mean_output_tokens: float


@dataclass(frozen=True)
class Workload:
    name: str
    step_seconds: float
    rates: np.ndarray  # requests/s in each replay step, scaled and with burstiness
    start_time: float  # epoch seconds of step 0
    history_rates: np.ndarray  # demand before the replay, one value per bucket (forecaster warm-up)
    bucket_seconds: float
    sizes: RequestSizes

    @property
    def duration_seconds(self) -> float:
        return len(self.rates) * self.step_seconds


def _parse_time(text: str) -> float:
    text = text.strip()
    if "." in text:  # the Azure trace has 7 fractional digits; datetime takes 6
        head, fraction = text.split(".", 1)
        text = f"{head}.{fraction[:6]}"
    # Naive trace times read as UTC: local time would add daylight-saving jumps to the series.
    parsed = datetime.fromisoformat(text)
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)).timestamp()


def read_azure_trace(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(arrival seconds from the first request, prompt tokens, output tokens) of an Azure LLM trace."""
    times, prompts, outputs = [], [], []
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: not an Azure LLM trace (missing columns {', '.join(sorted(missing))})")
        for row in reader:
            times.append(_parse_time(row["TIMESTAMP"]))
            prompts.append(int(row["ContextTokens"]))
            outputs.append(int(row["GeneratedTokens"]))
    array = np.asarray(times)
    order = np.argsort(array, kind="stable")
    array = array[order]
    return array - array[0], np.asarray(prompts)[order], np.asarray(outputs)[order]


def read_nab_series(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(epoch seconds, values) of a NAB `timestamp,value` file."""
    times, values = [], []
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if not {"timestamp", "value"} <= set(reader.fieldnames or ()):
            raise ValueError(f"{path}: not a NAB series (needs columns timestamp,value)")
        for row in reader:
            times.append(_parse_time(row["timestamp"]))
            values.append(float(row["value"]))
    return np.asarray(times), np.asarray(values)


def is_azure_trace(path: str | Path) -> bool:
    with open(path, newline="") as handle:
        header = handle.readline()
    return "ContextTokens" in header


class BurstSampler:
    """Second-level burstiness of real LLM traffic, from the Azure trace.

    Per window of `step_seconds`: the trace's count relative to its 5-minute moving mean, with the
    deviation shrunk to its excess over Poisson noise (which the queueing model adds itself).
    """

    def __init__(self, arrivals: np.ndarray, step_seconds: float) -> None:
        counts = np.bincount((arrivals // step_seconds).astype(int)).astype(float)
        window = max(1, int(round(300.0 / step_seconds)))
        kernel = np.ones(window) / window
        moving = np.convolve(counts, kernel, mode="same")
        edge = window // 2
        counts, moving = counts[edge:-edge or None], moving[edge:-edge or None]
        deviation = counts - moving
        residual_variance = float(np.var(deviation))
        mean = float(np.mean(moving))
        excess = max(0.0, 1.0 - mean / residual_variance) if residual_variance > 0 else 0.0
        self.factors = np.clip(1.0 + deviation / np.maximum(moving, 1e-9) * math.sqrt(excess), 0.0, None)

    def sample(self, length: int, rng: np.random.Generator) -> np.ndarray:
        if len(self.factors) == 0:
            return np.ones(length)
        start = int(rng.integers(0, len(self.factors)))
        indices = (start + np.arange(length)) % len(self.factors)
        return self.factors[indices]


def request_sizes(prompts: np.ndarray, outputs: np.ndarray) -> RequestSizes:
    return RequestSizes(float(np.mean(prompts)), float(np.mean(outputs)))


def nab_workload(
    path: str | Path,
    *,
    peak_rps: float,
    burst: BurstSampler | None,
    sizes: RequestSizes,
    replay_days: float | None = None,
    history_days: float = 21.0,
    step_seconds: float = 10.0,
    bucket_seconds: float | None = None,
    seed: int = 0,
) -> Workload:
    """Replay the last `replay_days` of a NAB series, scaled so its peak is `peak_rps`."""
    times, values = read_nab_series(path)
    native = float(np.median(np.diff(times)))
    bucket_seconds = bucket_seconds or max(300.0, native / 2.0)
    end = times[-1]
    replay_start = times[0] if replay_days is None else max(times[0], end - replay_days * 86400.0)
    if replay_days is not None and replay_start <= times[0] + native:
        # Too little history before: replay the second half, keep the first as history.
        replay_start = times[0] + (end - times[0]) / 2.0
    replay_start = times[0] + math.ceil((replay_start - times[0]) / bucket_seconds) * bucket_seconds
    history_start = max(times[0], replay_start - history_days * 86400.0)
    replay_times = replay_start + np.arange(0.0, end - replay_start, step_seconds)
    base = np.interp(replay_times, times, values)
    scale = peak_rps / float(base.max()) if base.max() > 0 else 1.0
    rng = np.random.default_rng(seed)
    rates = base * scale * (burst.sample(len(base), rng) if burst is not None else 1.0)
    history_points = np.arange(history_start, replay_start, bucket_seconds)
    # A bucket's value is the mean rate over it: the rate at its middle, for a linear series.
    history = np.interp(history_points + bucket_seconds / 2.0, times, values) * scale
    return Workload(Path(path).stem, step_seconds, rates, replay_start, history, bucket_seconds, sizes)


def azure_workload(
    path: str | Path,
    *,
    peak_rps: float | None = None,
    step_seconds: float = 5.0,
    bucket_seconds: float = 60.0,
) -> Workload:
    """Replay a per-request trace: its own arrival rate and sizes, optionally rescaled.

    The rate per step is the trace's one-minute moving rate times its own burst factors (the
    over-Poisson part only): a plain rescale of raw counts would multiply the trace's Poisson
    noise too, while the queueing model adds Poisson noise at the replayed rate itself.
    """
    arrivals, prompts, outputs = read_azure_trace(path)
    counts = np.bincount((arrivals // step_seconds).astype(int)).astype(float)
    window = max(1, int(round(60.0 / step_seconds)))
    padded = np.concatenate([np.full(window, counts[:window].mean()), counts, np.full(window, counts[-window:].mean())])
    smooth = np.convolve(padded, np.ones(window) / window, mode="same")[window:-window] / step_seconds
    burst = BurstSampler(arrivals, step_seconds)
    factors = np.ones(len(smooth))
    edge = (len(smooth) - len(burst.factors)) // 2
    factors[edge:edge + len(burst.factors)] = burst.factors[: len(smooth) - edge]
    rates = smooth * factors
    if peak_rps:
        rates = rates * (peak_rps / float(smooth.max()))
    return Workload(Path(path).stem, step_seconds, rates, 0.0, np.zeros(0), bucket_seconds,
                    request_sizes(prompts, outputs))


# ---------------------------------------------------------------------------------------------
# The fleet's performance, from the shared model, as lookup tables (the replay loop is hot)


class FleetModel:
    """Per-replica behaviour at any load, tabulated from `perfmodel` for one workload and SLO."""

    GRID = 400

    def __init__(self, params: ReplicaParams, sizes: RequestSizes, slo_ttft_seconds: float) -> None:
        self.params = params
        self.sizes = sizes
        self.slo = slo_ttft_seconds
        prompt, output = sizes.mean_prompt_tokens, sizes.mean_output_tokens
        self.capacity = capacity_rps(params, prompt, output)
        self.slo_capacity = sustainable_rps(params, prompt, output, slo_ttft_seconds, CAPACITY_QUANTILE)
        if self.slo_capacity <= 0:
            raise ValueError(
                f"an idle replica already misses the TTFT SLO of {slo_ttft_seconds}s for "
                f"{prompt:.0f}-token prompts on {params.profile.name}"
            )
        self.batch = max_batch(params, prompt, output)
        loads = [self.capacity * i / self.GRID for i in range(self.GRID)]
        self._attainment = [ttft_attainment(params, x, prompt, output, slo_ttft_seconds) for x in loads]
        self._ttft_p95 = [ttft_quantile(params, x, prompt, output, 0.95) for x in loads]
        near_saturation = self.capacity * (self.GRID - 1) / self.GRID
        self._p95_saturated = ttft_quantile(params, near_saturation * 0.98, prompt, output, 0.95)
        self._wait_grid = [slo_ttft_seconds * i / 50 for i in range(51)]
        # With a backlog the replicas run flat out; its wait is explicit, on top of the queueing at
        # the SLO capacity (not at saturation: that would count the same wait twice).
        self._attainment_with_wait = [
            ttft_attainment(params, self.slo_capacity, prompt, output, slo_ttft_seconds, w)
            for w in self._wait_grid
        ]
        self._step_time = [decode_step_seconds(params, max(1, min(self.batch, int(x * output * decode_step_seconds(params, self.batch)) + 1))) for x in loads]

    def _index(self, per_replica_rps: float) -> int:
        return min(self.GRID - 1, int(per_replica_rps / self.capacity * self.GRID))

    def attainment(self, per_replica_rps: float) -> float:
        return self._attainment[self._index(per_replica_rps)]

    def attainment_after_wait(self, wait_seconds: float) -> float:
        if wait_seconds >= self.slo:
            return 0.0
        return self._attainment_with_wait[int(wait_seconds / self.slo * 50)]

    def ttft_p95(self, per_replica_rps: float, backlog_wait: float = 0.0) -> float:
        if backlog_wait > 0:
            return self._p95_saturated + backlog_wait
        return self._ttft_p95[self._index(per_replica_rps)]

    def running(self, per_replica_rps: float) -> float:
        """Requests in the batch at a load (Little's law: rate x time spent decoding)."""
        index = self._index(per_replica_rps)
        in_system = per_replica_rps * (self._ttft_p95[index] * 0.5 + self.sizes.mean_output_tokens * self._step_time[index])
        return min(float(self.batch), in_system)

    def queued(self, per_replica_rps: float) -> float:
        """Requests waiting on one replica (Little's law on the queueing part of the TTFT)."""
        waiting = max(0.0, self._ttft_p95[self._index(per_replica_rps)] - self._ttft_p95[0])
        return per_replica_rps * 0.5 * waiting  # the mean wait is about half the p95 wait

    def kv_usage(self, running: float) -> float:
        per_request = self.sizes.mean_prompt_tokens + self.sizes.mean_output_tokens
        return min(1.0, running * per_request / self.params.kv_capacity)


# ---------------------------------------------------------------------------------------------
# Policies as the simulator runs them


@dataclass
class PolicyRunner:
    """A policy plus how it gets its forecast (none, our forecaster, ARIMA, or the oracle)."""

    policy: object
    forecaster: str | None = None  # "ets", "arima", "oracle"
    quantile: float | None = None  # our forecast quantile, when not the configuration's
    label: str | None = None

    @property
    def name(self) -> str:
        return self.label or self.policy.name


def build_policies(names: Sequence[str] | str, fleet: FleetModel, cold_start: float, tick: float) -> list[PolicyRunner]:
    """The named policies; "all" is ours, the oracle and every baseline."""
    lead = cold_start + tick
    inflight_per_replica = fleet.running(0.7 * fleet.slo_capacity)
    catalogue = {
        "forecast": lambda: PolicyRunner(ForecastPolicy(), "ets"),
        "oracle": lambda: PolicyRunner(OraclePolicy(), "oracle"),
        "reactive-hpa-50": lambda: PolicyRunner(ReactiveHpaPolicy(0.5)),
        "reactive-hpa-60": lambda: PolicyRunner(ReactiveHpaPolicy(0.6)),
        "reactive-hpa-70": lambda: PolicyRunner(ReactiveHpaPolicy(0.7)),
        "reactive-hpa-80": lambda: PolicyRunner(ReactiveHpaPolicy(0.8)),
        "reactive-hpa-90": lambda: PolicyRunner(ReactiveHpaPolicy(0.9)),
        "keda-inflight": lambda: PolicyRunner(KedaPolicy(max(1.0, inflight_per_replica))),
        "aibrix-kpa-linear": lambda: PolicyRunner(AibrixPolicy(0.7, lead_seconds=lead)),
        "dynamo-arima": lambda: PolicyRunner(DynamoPolicy(), "arima"),
        # Not a policy anyone can run: ours fed the true future demand at the forecaster's
        # resolution (bucket means). What it misses and spends beyond the oracle is the control
        # loop's share (bursts within a bucket, stabilization, steps); the rest of ours is forecast error.
        "forecast-clairvoyant": lambda: PolicyRunner(ForecastPolicy(), "clairvoyant", label="forecast-clairvoyant"),
    }
    if isinstance(names, str):
        names = [names]
    if list(names) == ["all"]:
        names = list(POLICY_NAMES)
    runners = []
    for name in names:
        if name in catalogue:
            runners.append(catalogue[name]())
        elif name.startswith("forecast-q") and name[len("forecast-q"):].isdigit():
            # Ours at another forecast quantile, e.g. forecast-q95: to trace its cost/SLO frontier.
            quantile = int(name[len("forecast-q"):]) / 100.0
            if not 0.5 <= quantile < 1.0:
                raise ValueError(f"{name}: the quantile must be between 50 and 99")
            runners.append(PolicyRunner(ForecastPolicy(), "ets", quantile=quantile, label=name))
        else:
            raise ValueError(f"unknown policy {name!r}; choose from all, {', '.join(catalogue)}, forecast-qNN")
    return runners


POLICY_NAMES = (
    "forecast", "oracle", "reactive-hpa-50", "reactive-hpa-60", "reactive-hpa-70", "reactive-hpa-80",
    "reactive-hpa-90", "keda-inflight", "aibrix-kpa-linear", "dynamo-arima",
)


@dataclass
class SimulationResult:
    policy: str
    gpu_hours: float
    slo_attainment: float
    requests: int
    scale_events: int
    mean_replicas: float
    max_replicas: int
    fit_seconds: float
    wall_seconds: float
    timeline: dict = field(default_factory=dict, repr=False)

    def summary(self) -> dict:
        return {
            "policy": self.policy,
            "gpu_hours": round(self.gpu_hours, 3),
            "slo_attainment": round(self.slo_attainment, 5),
            "requests": self.requests,
            "scale_events": self.scale_events,
            "mean_replicas": round(self.mean_replicas, 3),
            "max_replicas": self.max_replicas,
            "fit_seconds": round(self.fit_seconds, 3),
            "wall_seconds": round(self.wall_seconds, 3),
        }


@dataclass(frozen=True)
class SimulationConfig:
    cold_start_seconds: float = 180.0
    slo_ttft_seconds: float = 2.0
    tick_seconds: float = 30.0
    params: ReplicaParams = ReplicaParams()
    min_replicas: int = 1
    max_replicas: int = 1000
    forecast_quantile: float = 0.9
    refit_interval_seconds: float = 86400.0
    seasonality: str = "auto"
    stabilization_seconds: float = 300.0
    max_step_replicas: int = 2
    history_ticks: int = 12  # metric samples the policies see (Prometheus range query window)


class _Fleet:
    """Replicas as start times; ready ones are those whose start + cold start has passed."""

    def __init__(self, initial: int, now: float, cold_start: float) -> None:
        self.cold_start = cold_start
        self.ready_at: list[float] = [now - cold_start] * initial  # sorted

    def resize(self, desired: int, now: float) -> None:
        current = len(self.ready_at)
        if desired > current:
            self.ready_at.extend([now + self.cold_start] * (desired - current))
        elif desired < current:
            # Remove the youngest first: not-ready replicas go before serving ones.
            del self.ready_at[desired:]

    def ready(self, now: float) -> int:
        return bisect.bisect_right(self.ready_at, now)

    def __len__(self) -> int:
        return len(self.ready_at)


def _peak_ahead(series: np.ndarray, steps: int) -> np.ndarray:
    """At each step, the highest value from it through `steps` steps later (the last value beyond the end)."""
    from numpy.lib.stride_tricks import sliding_window_view

    padded = np.concatenate([series, np.full(steps, series[-1] if len(series) else 0.0)])
    return sliding_window_view(padded, steps + 1)[: len(series)].max(axis=1)


def _oracle_needs(workload: Workload, fleet_model: FleetModel, lead: float) -> np.ndarray:
    """Replicas the oracle holds at each step: the most any moment within the lead time will need."""
    need = np.ceil(workload.rates / fleet_model.slo_capacity - 1e-9)
    return _peak_ahead(need, max(1, int(math.ceil(lead / workload.step_seconds))))


def _bucket_peaks(workload: Workload, lead: float) -> np.ndarray:
    """At each step, the highest bucket-mean demand (req/s) within the lead time: what a perfect
    forecast at the forecaster's resolution would say (the bursts within a bucket stay unknown)."""
    width = max(1, int(round(workload.bucket_seconds / workload.step_seconds)))
    means = np.convolve(workload.rates, np.ones(width) / width, mode="same")
    return _peak_ahead(means, max(1, int(math.ceil(lead / workload.step_seconds))))


def simulate(workload: Workload, runner: PolicyRunner, config: SimulationConfig, *, keep_timeline: bool = False) -> SimulationResult:
    """Replay `workload` against a fleet driven by `runner.policy`."""
    wall_started = time.perf_counter()
    fleet_model = FleetModel(config.params, workload.sizes, config.slo_ttft_seconds)
    capacity = fleet_model.slo_capacity
    quantile = runner.quantile or config.forecast_quantile
    spec = AutoscalingSpec(
        mode="Auto",
        min_replicas=config.min_replicas,
        max_replicas=config.max_replicas,
        slo_ttft_p95_seconds=config.slo_ttft_seconds,
        target_requests_per_replica=capacity,
        forecast=ForecastSpec(quantile=quantile, seasonality=config.seasonality,
                              refit_interval_seconds=config.refit_interval_seconds),
        scale_down=ScaleDownSpec(config.stabilization_seconds, config.max_step_replicas),
        cold_start_seconds=config.cold_start_seconds,
        interval_seconds=config.tick_seconds,
    )
    step = workload.step_seconds
    rates = workload.rates
    lead = config.cold_start_seconds + config.tick_seconds
    steps_per_tick = max(1, int(round(config.tick_seconds / step)))
    steps_per_bucket = max(1, int(round(workload.bucket_seconds / step)))
    oracle_need = _oracle_needs(workload, fleet_model, lead) if runner.forecaster == "oracle" else None
    known_peaks = _bucket_peaks(workload, lead) if runner.forecaster == "clairvoyant" else None

    # Every policy starts from the same warm fleet, sized for the first minutes as if it had been
    # running all along: the comparison is about following demand, not about a cold first tick.
    warm_need = _oracle_needs(workload, fleet_model, lead)
    initial = min(config.max_replicas, max(config.min_replicas, int(warm_need[0]) if len(warm_need) else 0))
    fleet = _Fleet(initial, workload.start_time, config.cold_start_seconds)

    # Forecaster state (ours or ARIMA): bucket series = history + observed buckets.
    buckets = list(workload.history_rates)
    forecaster: IncrementalForecaster | None = None
    fit_seconds = 0.0
    last_fit_time = -math.inf
    bucket_sum = 0.0
    bucket_count = 0
    last_bucket_end = workload.start_time

    def refit(now: float) -> None:
        nonlocal forecaster, fit_seconds, last_fit_time
        horizon = max(1, math.ceil((lead + workload.bucket_seconds * 1.5) / workload.bucket_seconds))
        if runner.forecaster == "ets":
            model = fit_forecaster(buckets, workload.bucket_seconds, quantile, horizon, config.seasonality)
        else:
            model = fit_arima(buckets[-ARIMA_WINDOW:], workload.bucket_seconds, quantile, horizon)
        fit_seconds += model.fit_seconds
        forecaster = IncrementalForecaster(model, buckets[-model.observations:] if model.observations else buckets)
        last_fit_time = now

    policy = runner.policy
    state = policy.initial_state()
    rows: deque = deque(maxlen=config.history_ticks)
    tick_rate_sum = 0.0
    tick_queue_max = 0.0
    tick_running_sum = 0.0
    tick_ttft_max = 0.0
    tick_kv_max = 0.0
    tick_steps = 0

    backlog = 0.0
    total = 0.0
    met = 0.0
    gpu_seconds = 0.0
    replica_steps = 0.0
    max_replicas = len(fleet)
    scale_events = 0
    timeline_t, timeline_rate, timeline_replicas, timeline_ready, timeline_miss = [], [], [], [], []

    for index in range(len(rates)):
        now = workload.start_time + index * step
        if index % steps_per_tick == 0:
            if tick_steps:
                rows.append((now, {
                    REQUEST_RATE: tick_rate_sum / tick_steps,
                    PROMPT_TOKEN_RATE: tick_rate_sum / tick_steps * workload.sizes.mean_prompt_tokens,
                    GENERATION_TOKEN_RATE: tick_rate_sum / tick_steps * workload.sizes.mean_output_tokens,
                    QUEUE_LENGTH: tick_queue_max,
                    RUNNING_REQUESTS: tick_running_sum / tick_steps,
                    KV_CACHE_USAGE: tick_kv_max,
                    TTFT_P95: tick_ttft_max,
                }))
                tick_rate_sum = tick_queue_max = tick_running_sum = tick_ttft_max = tick_kv_max = 0.0
                tick_steps = 0
            forecast = None
            if runner.forecaster in ("ets", "arima"):
                # Refit early while the history is young (it doubles between fits).
                window = min(len(buckets), MAX_FIT_BUCKETS if runner.forecaster == "ets" else ARIMA_WINDOW)
                young = forecaster is not None and forecaster.model.observations < 0.5 * window
                if len(buckets) >= 1 and (now - last_fit_time >= config.refit_interval_seconds or young):
                    refit(now)
                if forecaster is not None:
                    forecast = forecaster.forecast(lead + workload.bucket_seconds / 2.0, now - last_bucket_end)
            elif oracle_need is not None:
                needed = float(oracle_need[index])
                forecast = Forecast(lead, needed, needed, needed, 1.0, "oracle")
            elif known_peaks is not None:
                peak = float(known_peaks[index])
                forecast = Forecast(lead, peak, peak, peak, 1.0, "clairvoyant")
            if rows:
                history = MetricHistory.from_rows(rows, config.tick_seconds)
                context = PolicyContext(now, spec, len(fleet), fleet.ready(now), history, forecast, state)
                decision, state = policy.decide(context)
                if decision.desired_replicas != len(fleet):
                    scale_events += 1
                    fleet.resize(decision.desired_replicas, now)
                    max_replicas = max(max_replicas, len(fleet))
        rate = float(rates[index])
        ready = fleet.ready(now)
        arrivals = rate * step
        per_replica = rate / ready if ready else math.inf
        if ready == 0:
            backlog += arrivals
            attainment = 0.0
            wait = math.inf
        else:
            service = ready * fleet_model.capacity
            if backlog > 0 or per_replica >= fleet_model.capacity:
                wait_before = backlog / service
                backlog = max(0.0, backlog + (rate - service) * step)
                wait = backlog / service
                # Requests arriving through the step find the backlog growing (or draining)
                # linearly from its level before to its level after: average over the step.
                attainment = (fleet_model.attainment_after_wait(wait_before)
                              + 2.0 * fleet_model.attainment_after_wait((wait_before + wait) / 2.0)
                              + fleet_model.attainment_after_wait(wait)) / 4.0
            else:
                wait = 0.0
                attainment = fleet_model.attainment(per_replica)
        cap = ABANDON_SECONDS * max(rate, ready * fleet_model.capacity)
        if backlog > cap:
            backlog = cap
        total += arrivals
        met += arrivals * attainment
        gpu_seconds += len(fleet) * step
        replica_steps += len(fleet)
        # What the metrics endpoints would show this step.
        running = fleet_model.running(min(per_replica, fleet_model.capacity)) * ready if ready else 0.0
        tick_rate_sum += rate
        tick_running_sum += running
        queue_now = backlog + (fleet_model.queued(per_replica) * ready if ready and per_replica < fleet_model.capacity else 0.0)
        tick_queue_max = max(tick_queue_max, queue_now)
        tick_ttft_max = max(tick_ttft_max, fleet_model.ttft_p95(per_replica, wait) if ready else ABANDON_SECONDS)
        tick_kv_max = max(tick_kv_max, fleet_model.kv_usage(running / ready) if ready else 0.0)
        tick_steps += 1
        # Buckets for the forecaster (what a Prometheus range query at the bucket step returns).
        bucket_sum += rate
        bucket_count += 1
        if bucket_count == steps_per_bucket:
            value = bucket_sum / bucket_count
            buckets.append(value)
            if forecaster is not None:
                forecaster.append(value)
            bucket_sum = 0.0
            bucket_count = 0
            last_bucket_end = now + step
        if keep_timeline:
            timeline_t.append(now)
            timeline_rate.append(rate)
            timeline_replicas.append(len(fleet))
            timeline_ready.append(ready)
            timeline_miss.append(arrivals * (1.0 - attainment))

    timeline = {}
    if keep_timeline:
        timeline = {
            "time": timeline_t, "demand": timeline_rate, "replicas": timeline_replicas,
            "ready": timeline_ready, "missed": timeline_miss, "capacity": capacity,
        }
    return SimulationResult(
        policy=runner.name,
        gpu_hours=gpu_seconds / 3600.0,
        slo_attainment=met / total if total else 1.0,
        requests=int(round(total)),
        scale_events=scale_events,
        mean_replicas=replica_steps / len(rates) if len(rates) else 0.0,
        max_replicas=max_replicas,
        fit_seconds=fit_seconds,
        wall_seconds=time.perf_counter() - wall_started,
        timeline=timeline,
    )


def compare(workload: Workload, policy_names: Sequence[str] | str, config: SimulationConfig,
            *, keep_timeline: bool = False) -> list[SimulationResult]:
    fleet_model = FleetModel(config.params, workload.sizes, config.slo_ttft_seconds)
    runners = build_policies(policy_names, fleet_model, config.cold_start_seconds, config.tick_seconds)
    return [simulate(workload, runner, config, keep_timeline=keep_timeline) for runner in runners]


def plot(results: Sequence[SimulationResult], path: str | Path, title: str = "") -> None:
    """Demand, replicas and SLO misses over time for each result with a timeline (PNG, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_timeline = [r for r in results if r.timeline]
    if not with_timeline:
        raise ValueError("no timeline to plot: simulate with keep_timeline=True")
    figure, axes = plt.subplots(3, 1, figsize=(11, 8), sharex=True)
    first = with_timeline[0].timeline
    start = first["time"][0]
    hours = [(t - start) / 3600.0 for t in first["time"]]
    axes[0].plot(hours, first["demand"], color="grey", linewidth=0.6, label="demand (req/s)")
    axes[0].plot(hours, [v * first["capacity"] for v in first["ready"]], linewidth=0.8,
                 label=f"{with_timeline[0].policy}: ready capacity")
    axes[0].set_ylabel("requests/s")
    axes[0].legend(loc="upper right", fontsize=7)
    for result in with_timeline:
        timeline = result.timeline
        axes[1].step(hours, timeline["replicas"], where="post", linewidth=0.8, label=result.policy)
        window = max(1, len(timeline["missed"]) // 400)
        missed = np.convolve(timeline["missed"], np.ones(window), mode="same")
        axes[2].plot(hours, missed, linewidth=0.7, label=result.policy)
    axes[1].set_ylabel("replicas")
    axes[1].legend(loc="upper right", fontsize=7, ncol=2)
    axes[2].set_ylabel("SLO misses")
    axes[2].set_xlabel("hours")
    figure.suptitle(title or "trace replay")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


# Used when no Azure trace is at hand: the conversation trace's means.
DEFAULT_SIZES = RequestSizes(mean_prompt_tokens=1155.0, mean_output_tokens=211.0)


def load_workload(
    demand: str | Path,
    *,
    peak_replicas: float,
    config: SimulationConfig,
    sizes_trace: str | Path | None = None,
    replay_days: float | None = 7.0,
    step_seconds: float | None = None,
    seed: int = 0,
    history_days: float = 21.0,
) -> Workload:
    """A NAB series or an Azure request trace, scaled so its peak needs `peak_replicas` replicas.

    Request sizes and burstiness come from `sizes_trace` (an Azure LLM trace) when given; an
    Azure demand trace brings its own.
    """
    if is_azure_trace(demand):
        arrivals, prompts, outputs = read_azure_trace(demand)
        sizes = request_sizes(prompts, outputs)
        fleet_model = FleetModel(config.params, sizes, config.slo_ttft_seconds)
        workload = azure_workload(demand, peak_rps=peak_replicas * fleet_model.slo_capacity,
                                  step_seconds=step_seconds or 5.0)
        return workload
    if sizes_trace is not None:
        arrivals, prompts, outputs = read_azure_trace(sizes_trace)
        sizes = request_sizes(prompts, outputs)
    else:
        arrivals, sizes = None, DEFAULT_SIZES
    step = step_seconds or 10.0
    burst = BurstSampler(arrivals, step) if arrivals is not None else None
    fleet_model = FleetModel(config.params, sizes, config.slo_ttft_seconds)
    return nab_workload(
        demand, peak_rps=peak_replicas * fleet_model.slo_capacity, burst=burst, sizes=sizes,
        replay_days=replay_days, history_days=history_days, step_seconds=step, seed=seed,
    )


def format_table(workload: Workload, config: SimulationConfig, rows: Sequence[dict]) -> str:
    hours = workload.duration_seconds / 3600.0
    lines = [
        f"{workload.name}: {hours:.1f} h replayed, cold start {config.cold_start_seconds:g}s, "
        f"TTFT SLO {config.slo_ttft_seconds:g}s, tick {config.tick_seconds:g}s, {config.params.profile.name}",
        f"{'policy':<20} {'GPU-hours':>10} {'vs oracle':>10} {'SLO attain':>11} {'scale events':>13} {'requests':>11}",
    ]
    for row in rows:
        ratio = row.get("gpu_hours_vs_oracle")
        lines.append(
            f"{row['policy']:<20} {row['gpu_hours']:>10.1f} {ratio if ratio is not None else float('nan'):>10.3f} "
            f"{row['slo_attainment'] * 100:>10.2f}% {row['scale_events']:>13d} {row['requests']:>11d}"
        )
    return "\n".join(lines)
