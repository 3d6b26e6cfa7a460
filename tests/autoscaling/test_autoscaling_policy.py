"""The forecast policy tick by tick with a fake clock: ramps, spikes, cycles, missing/stale data, flapping."""
from __future__ import annotations

import math

import pytest

from digital_worker.operator.autoscaling.forecast import Forecast
from digital_worker.operator.autoscaling.history import (
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
from digital_worker.operator.autoscaling.policy import (
    HOLD,
    HOLD_METRICS_MISSING,
    HOLD_METRICS_STALE,
    SCALE_DOWN,
    SCALE_UP,
    ForecastPolicy,
    PolicyContext,
    lead_time_seconds,
)
from digital_worker.operator.autoscaling.spec import SpecError, parse_spec

TICK = 20.0
CAPACITY = 4.0  # req/s per replica


def spec(**overrides):
    raw = {"mode": "Auto", "minReplicas": 1, "maxReplicas": 20, "targetRequestsPerReplica": CAPACITY,
           "slo": {"ttftP95Seconds": 2.0}, "coldStartSeconds": 60, "intervalSeconds": TICK,
           "scaleDown": {"stabilizationSeconds": 120, "maxStepReplicas": 2}}
    raw.update(overrides)
    return parse_spec(raw)


def history(now: float, rate: float | None, *, queue=0.0, kv=0.2, ttft=0.8, age=0.0) -> MetricHistory:
    if rate is None:
        return MetricHistory.from_rows([], TICK)
    rows = [(now - age - TICK * i, {REQUEST_RATE: rate, QUEUE_LENGTH: queue, KV_CACHE_USAGE: kv, TTFT_P95: ttft})
            for i in range(5, -1, -1)]
    return MetricHistory.from_rows(rows, TICK)


class FakeFleet:
    """Replicas that become ready `cold_start` seconds after they are asked for."""

    def __init__(self, replicas: int, cold_start: float = 60.0) -> None:
        self.ready_at = [-math.inf] * replicas
        self.cold_start = cold_start

    def apply(self, desired: int, now: float) -> None:
        if desired > len(self.ready_at):
            self.ready_at += [now + self.cold_start] * (desired - len(self.ready_at))
        del self.ready_at[desired:]

    def ready(self, now: float) -> int:
        return sum(1 for t in self.ready_at if t <= now)


def run(policy, the_spec, fleet, demand, ticks, *, forecast_for=None, start=0.0, metrics=None):
    """Drive the policy; `demand(t)` gives req/s; returns (time, desired, decision) per tick."""
    state = None
    trace = []
    for i in range(ticks):
        now = start + i * TICK
        rate = demand(now)
        hist = metrics(now, rate, fleet) if metrics else history(now, rate)
        forecast = forecast_for(now) if forecast_for else None
        context = PolicyContext(now, the_spec, len(fleet.ready_at), fleet.ready(now), hist, forecast, state)
        decision, state = policy.decide(context)
        fleet.apply(decision.desired_replicas, now)
        trace.append((now, decision.desired_replicas, decision))
    return trace, state


def test_spec_defaults_and_errors():
    parsed = parse_spec({"mode": "DryRun"})
    assert parsed.mode == "DryRun" and parsed.min_replicas == 1 and parsed.forecast.quantile == 0.9
    assert parsed.scale_down.stabilization_seconds == 300 and parsed.interval_seconds == 20
    with pytest.raises(SpecError, match="mode"):
        parse_spec({"mode": "Sometimes"})
    with pytest.raises(SpecError, match="maxReplicas"):
        parse_spec({"minReplicas": 5, "maxReplicas": 2})
    with pytest.raises(SpecError, match="forecast.quantile"):
        parse_spec({"forecast": {"quantile": 1.5}})
    with pytest.raises(SpecError, match="seasonality"):
        parse_spec({"forecast": {"seasonality": "hourly"}})


def test_ramp_is_followed_up_and_down():
    fleet = FakeFleet(1)
    ramp = lambda t: min(40.0, 0.5 + t / 30.0) if t < 1800 else max(0.5, 40.0 - (t - 1800) / 30.0)
    trace, _ = run(ForecastPolicy(), spec(), fleet, ramp, 200)
    by_time = {t: d for t, d, _ in trace}
    # Up: never more than one capacity-step behind the demand.
    for t, desired, _ in trace:
        if t < 1800:
            assert desired >= math.ceil(ramp(t) / CAPACITY) - 1, (t, desired)
    assert by_time[1800.0] == 10
    assert by_time[max(by_time)] <= 2  # and back down at the end
    assert max(by_time.values()) <= 11


def test_spike_scales_up_at_once_whatever_the_forecast_says():
    policy = ForecastPolicy()
    calm_forecast = Forecast(80.0, 4.0, 4.0, 3.0, 0.9, "holt")
    context = PolicyContext(1000.0, spec(), 2, 2, history(1000.0, 4.0, queue=60.0, ttft=5.0), calm_forecast, None)
    decision, _ = policy.decide(context)
    assert decision.action == SCALE_UP and decision.desired_replicas >= 3
    assert "queue 60 above 8 per replica" in decision.reason
    kv_full = PolicyContext(1000.0, spec(), 2, 2, history(1000.0, 4.0, kv=0.97), calm_forecast, None)
    decision, _ = policy.decide(kv_full)
    assert decision.action == SCALE_UP and "KV-cache usage 97%" in decision.reason
    slow = PolicyContext(1000.0, spec(), 2, 2, history(1000.0, 4.0, ttft=3.5), calm_forecast, None)
    decision, _ = policy.decide(slow)
    assert decision.action == SCALE_UP and "TTFT p95 3.50s above 2s" in decision.reason
    choppy = history(1000.0, 4.0)
    choppy = MetricHistory(choppy.timestamps, {**choppy.series, ITL_P95: (0.09,) * len(choppy.timestamps)}, TICK)
    with_itl = spec(slo={"ttftP95Seconds": 2.0, "itlP95Seconds": 0.05})
    decision, _ = policy.decide(PolicyContext(1000.0, with_itl, 2, 2, choppy, calm_forecast, None))
    assert decision.action == SCALE_UP and "ITL p95 90ms above 50ms" in decision.reason
    decision, _ = policy.decide(PolicyContext(1000.0, spec(), 2, 2, choppy, calm_forecast, None))
    assert decision.action == HOLD  # no ITL target, no ITL breach


def test_forecast_provisions_ahead_of_a_diurnal_rise():
    """A cycle the forecast knows: replicas rise before demand does, by about the lead time."""
    the_spec = spec()
    lead = lead_time_seconds(the_spec, None)
    assert lead == 60 + TICK
    period = 3600.0
    demand = lambda t: 20.0 + 18.0 * math.sin(2 * math.pi * t / period)
    peak_ahead = lambda t: Forecast(lead, max(demand(t + s) for s in range(0, int(lead) + 1, 5)),
                                    1.05 * max(demand(t + s) for s in range(0, int(lead) + 1, 5)), 0.0, 0.9, "hw")
    # During the rising half, ready capacity covers the demand at every tick.
    ready_capacity_ok = 0
    rising = 0
    fleet2 = FakeFleet(5)
    state = None
    for i in range(180):
        now = i * TICK
        ctx = PolicyContext(now, the_spec, len(fleet2.ready_at), fleet2.ready(now), history(now, demand(now)),
                            peak_ahead(now), state)
        decision, state = ForecastPolicy().decide(ctx)
        fleet2.apply(decision.desired_replicas, now)
        if i > 10 and math.cos(2 * math.pi * now / period) > 0:
            rising += 1
            ready_capacity_ok += fleet2.ready(now) * CAPACITY >= demand(now)
    assert ready_capacity_ok == rising
    # Without the forecast, the reactive path alone lags the rise by the cold start.
    fleet3 = FakeFleet(5)
    state = None
    late = 0
    for i in range(180):
        now = i * TICK
        ctx = PolicyContext(now, the_spec, len(fleet3.ready_at), fleet3.ready(now), history(now, demand(now)),
                            None, state)
        decision, state = ForecastPolicy().decide(ctx)
        fleet3.apply(decision.desired_replicas, now)
        if i > 10 and math.cos(2 * math.pi * now / period) > 0:
            late += fleet3.ready(now) * CAPACITY < demand(now)
    assert late > rising // 4


def test_missing_metrics_hold_with_a_condition():
    policy = ForecastPolicy()
    decision, _ = policy.decide(PolicyContext(100.0, spec(), 6, 6, history(100.0, None), None, None))
    assert decision.action == HOLD and decision.desired_replicas == 6
    assert decision.hold_condition == HOLD_METRICS_MISSING
    down = MetricHistory.failed("Prometheus at http://x: ConnectionError")
    decision, _ = policy.decide(PolicyContext(100.0, spec(), 6, 6, down, None, None))
    assert decision.hold_condition == HOLD_METRICS_MISSING and "ConnectionError" in decision.reason


def test_stale_metrics_never_scale_down():
    policy = ForecastPolicy()
    old = history(1000.0, 0.1, age=300.0)  # last sample five minutes ago, showing almost no load
    decision, _ = policy.decide(PolicyContext(1000.0, spec(), 8, 8, old, None, None))
    assert decision.action == HOLD and decision.desired_replicas == 8
    assert decision.hold_condition == HOLD_METRICS_STALE and "300s old" in decision.reason


def test_flapping_demand_does_not_flap_replicas():
    """Demand alternating every tick between two levels: replicas settle at the higher one."""
    fleet = FakeFleet(4)
    flappy = lambda t: 30.0 if int(t / TICK) % 2 else 6.0
    trace, _ = run(ForecastPolicy(), spec(), fleet, flappy, 60)
    desired = [d for _, d, _ in trace]
    changes = sum(1 for a, b in zip(desired, desired[1:]) if a != b)
    assert changes <= 2
    assert desired[-1] == math.ceil(30.0 / CAPACITY)


def test_scale_down_is_stabilised_and_stepped():
    fleet = FakeFleet(12)
    drop = lambda t: 48.0 if t < 200 else 4.0
    trace, _ = run(ForecastPolicy(), spec(), fleet, drop, 40)
    desired = {t: d for t, d, _ in trace}
    # Nothing happens until the last high recommendation (t=180) leaves the 120 s window.
    assert all(d == 12 for t, d in desired.items() if t < 180 + 120)
    assert desired[300.0] == 10
    steps = [a - b for a, b in zip(list(desired.values()), list(desired.values())[1:]) if a > b]
    assert steps and max(steps) <= 2
    assert desired[max(desired)] == 1
    stabilised = [dec for _, _, dec in trace if dec.action == SCALE_DOWN]
    assert stabilised and all("max step 2" in d.reason or d.desired_replicas == 1 for d in stabilised)


def test_fresh_state_does_not_scale_down_at_once():
    decision, _ = ForecastPolicy().decide(PolicyContext(0.0, spec(), 10, 10, history(0.0, 1.0), None, None))
    assert decision.desired_replicas == 10


def test_min_and_max_are_respected():
    decision, _ = ForecastPolicy().decide(
        PolicyContext(0.0, spec(maxReplicas=5), 3, 3, history(0.0, 400.0, queue=900, ttft=30), None, None))
    assert decision.desired_replicas == 5
    fleet = FakeFleet(4)
    trace, _ = run(ForecastPolicy(), spec(minReplicas=3), fleet, lambda t: 0.0, 40)
    assert trace[-1][1] == 3


def test_scale_to_zero_after_idle_with_a_cold_start_warning_and_back():
    the_spec = spec(minReplicas=0, scaleToZero=True)
    fleet = FakeFleet(2)
    idle_then_busy = lambda t: 0.0 if t < 800 else 3.0
    trace, _ = run(ForecastPolicy(), the_spec, fleet, idle_then_busy, 50)
    zero = [dec for t, d, dec in trace if d == 0]
    assert zero, "never scaled to zero"
    assert "cold start" in zero[0].warning
    first_zero = next(t for t, d, _ in trace if d == 0)
    assert first_zero >= 120  # not before a stabilization window of idleness
    after = [d for t, d, _ in trace if t >= 800]
    assert after[0] >= 1  # demand arrived: one replica at once


def test_capacity_is_learned_from_load_and_latency():
    """Replicas that break the SLO at 3 req/s each (not the 4 in the spec): the estimate comes down."""
    true_capacity = 3.0

    def metrics(now, rate, fleet):
        ready = max(1, fleet.ready(now))
        per_replica = rate / ready
        ttft = 1.0 if per_replica < true_capacity else 4.0
        queue = 0.0 if per_replica < true_capacity else 20.0 * ready
        return history(now, rate, ttft=ttft, queue=queue)

    fleet = FakeFleet(3)
    trace, state = run(ForecastPolicy(), spec(), fleet, lambda t: 11.5, 90, metrics=metrics)
    assert state.capacity_rps < 3.83  # below the load at which the SLO broke
    assert fleet.ready(90 * TICK) * true_capacity >= 11.5
    assert trace[-1][2].capacity_rps == pytest.approx(state.capacity_rps)
    # Having learned, it stops oscillating between too few and enough.
    assert len({d for _, d, _ in trace[-40:]}) == 1


def test_cold_start_is_learned_from_readiness():
    the_spec = spec(coldStartSeconds=None)
    fleet = FakeFleet(1, cold_start=140.0)
    _, state = run(ForecastPolicy(), the_spec, fleet, lambda t: 2.0 if t < 100 else 20.0, 40)
    assert state.cold_start_seconds == pytest.approx(140.0, abs=TICK)
    assert lead_time_seconds(the_spec, state) == pytest.approx(state.cold_start_seconds + TICK)


def with_series(hist: MetricHistory, **values) -> MetricHistory:
    """`hist` plus constant series (e.g. the node agents' GPU utilisation) at every timestamp."""
    extra = {name: (value,) * len(hist.timestamps) for name, value in values.items()}
    return MetricHistory(hist.timestamps, {**hist.series, **extra}, hist.step_seconds)


def test_gpu_signals_from_the_node_agents_when_present():
    policy = ForecastPolicy()
    calm = Forecast(80.0, 4.0, 4.0, 3.0, 0.9, "holt")
    # Busy GPUs with requests waiting (below the queue threshold, TTFT still fine): scale up now.
    busy = with_series(history(1000.0, 7.0, queue=4.0), **{GPU_UTILIZATION: 0.96})
    decision, _ = policy.decide(PolicyContext(1000.0, spec(), 2, 2, busy, calm, None))
    assert decision.action == SCALE_UP and "GPUs 96% busy with 4 requests waiting" in decision.reason
    # The same without GPU series: nothing breached, the demand fits two replicas.
    decision, _ = policy.decide(PolicyContext(1000.0, spec(), 2, 2, history(1000.0, 7.0, queue=4.0), calm, None))
    assert decision.action == HOLD
    # No KV-cache gauge: GPU memory stands in for it.
    no_kv = history(1000.0, 4.0)
    no_kv = MetricHistory(no_kv.timestamps, {k: v for k, v in no_kv.series.items() if k != KV_CACHE_USAGE}, TICK)
    decision, _ = policy.decide(PolicyContext(1000.0, spec(), 2, 2, with_series(no_kv, **{GPU_MEMORY_USED: 0.95}),
                                              calm, None))
    assert decision.action == SCALE_UP and "GPU memory 95% used" in decision.reason
    # With a KV-cache gauge, GPU memory (SGLang preallocates it) is not a load signal.
    decision, _ = policy.decide(PolicyContext(1000.0, spec(), 2, 2,
                                              with_series(history(1000.0, 4.0), **{GPU_MEMORY_USED: 0.95}), calm, None))
    assert decision.action == HOLD


def test_no_scale_down_while_the_gpus_are_busy():
    """Demand drops to almost nothing, but the node agents say the GPUs are still busy: keep them."""
    fleet = FakeFleet(6)

    def metrics(now, rate, fleet):
        hist = history(now, rate)
        return with_series(hist, **{GPU_UTILIZATION: 0.95 if now < 600 else 0.3})

    trace, _ = run(ForecastPolicy(), spec(), fleet, lambda t: 1.0, 50, metrics=metrics)
    assert all(d == 6 for t, d, _ in trace if t < 600)
    assert any("no scale-down while the GPUs are 95% busy" in dec.reason for t, _, dec in trace if t >= 200)
    assert trace[-1][1] == 1  # once they are idle it comes down as usual


def test_one_burst_does_not_teach_a_lower_capacity():
    """A single tick over the SLO at the estimated load (a burst) leaves the capacity estimate alone;
    an estimate knocked down earlier recovers towards the spec's value while the SLO holds easily."""
    policy = ForecastPolicy()
    state = None
    for i in range(30):
        now = 1000.0 + i * TICK
        burst = i == 10
        hist = history(now, 15.6, ttft=3.0 if burst else 0.8, queue=8.0 if burst else 0.0)
        decision, state = policy.decide(PolicyContext(now, spec(), 4, 4, hist, None, state))
        assert decision.capacity_rps == pytest.approx(CAPACITY), i
    from dataclasses import replace

    state = replace(state, capacity_rps=0.8 * CAPACITY)
    for i in range(30, 80):
        now = 1000.0 + i * TICK
        decision, state = policy.decide(PolicyContext(now, spec(), 5, 5, history(now, 0.95 * CAPACITY * 5), None, state))
    assert state.capacity_rps == pytest.approx(0.95 * CAPACITY)  # what was served, not more



def token_history(now: float, rate: float, prompt_per_request, generated_per_request: float = 200.0,
                  **kwargs) -> MetricHistory:
    """`history` plus the prompt and generated token rates of requests of the given sizes;
    `prompt_per_request` may be a function of the sample's time."""
    hist = history(now, rate, **kwargs)
    prompt = prompt_per_request if callable(prompt_per_request) else (lambda t: prompt_per_request)
    series = {PROMPT_TOKEN_RATE: tuple(rate * prompt(t) for t in hist.timestamps),
              GENERATION_TOKEN_RATE: (rate * generated_per_request,) * len(hist.timestamps)}
    return MetricHistory(hist.timestamps, {**hist.series, **series}, hist.step_seconds)


def test_longer_requests_at_the_same_rate_scale_up_before_the_slo_breaks():
    """The request rate stays at 8 req/s, but prompts double (a new RAG feature, say): the prompt-token
    capacity binds and the replicas double at once, while TTFT still looks fine."""
    policy = ForecastPolicy()
    state = None
    fleet = FakeFleet(2)
    desired = []
    for i in range(40):
        now = 1000.0 + i * TICK
        def prompt(t):  # per sample: the history's newest samples show the change first
            return 1000.0 if t < 1000.0 + 20 * TICK else 2000.0

        context = PolicyContext(now, spec(), len(fleet.ready_at), fleet.ready(now), token_history(now, 8.0, prompt),
                                None, state)
        decision, state = policy.decide(context)
        fleet.apply(decision.desired_replicas, now)
        desired.append(decision.desired_replicas)
        if i == 19:
            assert decision.capacity_rps == pytest.approx(CAPACITY) and "tokens" not in decision.reason
    assert desired[:20] == [2] * 20
    # The mix is a mean over the last six ticks: the doubling shows in part after two of them, whole
    # after six; TTFT never moved.
    assert desired[21] == 3 and desired[25] == 4 and desired[-1] == 4
    assert "capacity bound by prompt tokens (2000 per request)" in decision.reason
    assert decision.capacity_rps == pytest.approx(2.0)
    # The token capacities started from the request capacity at the first mix seen.
    assert state.prompt_tokens_capacity == pytest.approx(CAPACITY * 1000.0)
    assert state.capacity_rps in (None, CAPACITY)


def test_a_noisy_request_mix_does_not_buy_replicas():
    """Tokens per request wander by +-15% tick to tick: within the tolerance, the request capacity rules."""
    policy = ForecastPolicy()
    state = None
    for i in range(40):
        now = 1000.0 + i * TICK
        def prompt(t):
            return 1000.0 * (1.15 if round(t / TICK) % 2 else 0.85)

        decision, state = policy.decide(PolicyContext(now, spec(), 2, 2, token_history(now, 8.0, prompt), None, state))
        assert decision.desired_replicas == 2 and decision.capacity_rps == pytest.approx(CAPACITY), i


def test_the_prompt_token_capacity_is_learned_when_prompts_bind():
    """Replicas prefill 3000 prompt tokens/s within the SLO, not the 4000 the spec starts from: with
    2000-token prompts the token estimate comes down, the request estimate stays."""
    the_spec = spec(targetPromptTokensPerReplica=4000)
    assert the_spec.target_prompt_tokens_per_replica == 4000 and the_spec.target_generation_tokens_per_replica is None
    true_prompt_capacity = 3000.0

    def metrics(now, rate, fleet):
        ready = max(1, fleet.ready(now))
        overloaded = rate / ready * 2000.0 > true_prompt_capacity
        return token_history(now, rate, 2000.0, ttft=4.0 if overloaded else 1.0, queue=20.0 * ready if overloaded else 0.0)

    fleet = FakeFleet(4)  # what the spec's estimate asks for: 7 req/s x 2000 tokens / 4000
    trace, state = run(ForecastPolicy(), the_spec, fleet, lambda t: 7.0, 90, metrics=metrics)
    assert state.prompt_tokens_capacity < 3500.0  # below the load at which the SLO broke
    assert state.capacity_rps in (None, CAPACITY)
    assert fleet.ready(90 * TICK) * true_prompt_capacity >= 7.0 * 2000.0
    assert len({d for _, d, _ in trace[-40:]}) == 1
    with pytest.raises(SpecError, match="targetGenerationTokensPerReplica"):
        parse_spec({"targetGenerationTokensPerReplica": "many"})
