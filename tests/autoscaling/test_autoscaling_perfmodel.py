"""The shared SGLang performance model: engine behaviour, and analytic helpers agreeing with it."""
from __future__ import annotations

import math
import random

import pytest

from digital_worker.runtime.perfmodel import (
    PROFILES,
    Aborted,
    Finished,
    FirstToken,
    ReplicaEngine,
    ReplicaParams,
    Token,
    capacity_rps,
    max_batch,
    profile_for,
    sustainable_rps,
    ttft_attainment,
    ttft_quantile,
)

PROMPT, OUTPUT = 1000, 200


def run_poisson(params: ReplicaParams, rps: float, requests: int, seed: int = 1) -> list[float]:
    """TTFTs of `requests` Poisson arrivals at `rps`, driven only through the public API."""
    rng = random.Random(seed)
    engine = ReplicaEngine(params, stream_tokens=False)
    ttfts: list[float] = []
    now = 0.0
    for index in range(requests):
        now += rng.expovariate(rps)
        ttfts += [e.ttft for e in engine.advance(now) if isinstance(e, FirstToken)]
        engine.submit(str(index), PROMPT, OUTPUT, now)
    while engine.has_work():
        ttfts += [e.ttft for e in engine.advance(engine.next_event_time() + 1.0) if isinstance(e, FirstToken)]
    ttfts += [e.ttft for e in engine.advance(math.inf) if isinstance(e, FirstToken)]
    return sorted(ttfts)


def p95(values: list[float]) -> float:
    return values[int(0.95 * (len(values) - 1))]


def test_profiles_and_aliases():
    assert set(PROFILES) >= {"nvidia-h100-80gb", "nvidia-a100-80gb", "nvidia-l4"}
    assert profile_for("NVIDIA-H100-80GB-HBM3").name == "nvidia-h100-80gb"
    assert profile_for("a100").name == "nvidia-a100-80gb"
    assert profile_for("NVIDIA L4").name == "nvidia-l4"
    assert profile_for(None).name == "nvidia-h100-80gb"
    assert profile_for("tpu-v5").name == "nvidia-h100-80gb"
    # Faster GPUs serve more: the profiles are ordered the way the hardware is.
    rates = {name: capacity_rps(ReplicaParams(profile=p), PROMPT, OUTPUT) for name, p in PROFILES.items()}
    assert rates["nvidia-h100-80gb"] > rates["nvidia-a100-80gb"] > rates["nvidia-l4"]


def test_single_request_streams_tokens_in_order():
    engine = ReplicaEngine(ReplicaParams())
    engine.submit("a", 500, 5, now=10.0)
    events = engine.advance(100.0)
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] == "FirstToken" and kinds[-1] == "Finished"
    tokens = [e for e in events if isinstance(e, Token)]
    assert [t.index for t in tokens] == [0, 1, 2, 3, 4]
    finished = events[-1]
    assert isinstance(finished, Finished)
    assert finished.output_tokens == 5 and len(finished.inter_token_latencies) == 4
    profile = ReplicaParams().profile
    # TTFT of an idle replica: the prompt's prefill plus one step.
    assert finished.ttft == pytest.approx(500 / profile.prefill_tokens_per_second + profile.decode_base_seconds
                                          + profile.decode_per_request_seconds, rel=1e-6)
    assert all(t > 0 for t in finished.inter_token_latencies)
    assert [e.time for e in events] == sorted(e.time for e in events)
    assert engine.num_running == 0 and engine.token_usage == 0.0


def test_events_are_released_only_when_due():
    engine = ReplicaEngine(ReplicaParams())
    engine.submit("a", 8000, 3, now=0.0)
    assert engine.advance(0.0) == []  # the prefill step is committed but ends later
    due = engine.next_event_time()
    assert due is not None and due > 0.0
    assert any(isinstance(e, FirstToken) for e in engine.advance(due))


def test_kv_cache_bounds_the_batch_and_queue_builds():
    params = ReplicaParams(kv_cache_tokens=10_000, max_running_requests=256)
    engine = ReplicaEngine(params, stream_tokens=False)
    for index in range(10):
        engine.submit(str(index), 1500, 500, now=0.0)
    engine.advance(0.001)
    assert engine.num_running == 5  # 5 x 2000 tokens fill 10k
    assert engine.num_queued == 5
    assert engine.token_usage == pytest.approx(1.0)
    engine.submit("too-big", 9000, 2000, now=0.002)
    aborted = [e for e in engine.advance(0.003) if isinstance(e, Aborted)]
    assert [e.request_id for e in aborted] == ["too-big"]


def test_abort_frees_kv_and_slowdown_inflates_latency():
    engine = ReplicaEngine(ReplicaParams(), stream_tokens=False)
    engine.submit("a", 1000, 1000, now=0.0)
    engine.advance(0.5)
    assert engine.abort("a", now=0.5)
    assert engine.token_usage == 0.0 and not engine.has_work()
    assert not engine.abort("unknown", now=0.6)

    def ttft(slowdown: float) -> float:
        e = ReplicaEngine(ReplicaParams(slowdown=slowdown), stream_tokens=False)
        e.submit("x", 2000, 2, now=0.0)
        return next(ev.ttft for ev in e.advance(100.0) if isinstance(ev, FirstToken))

    assert ttft(3.0) == pytest.approx(3.0 * ttft(1.0))


def test_gauges_report_load():
    engine = ReplicaEngine(ReplicaParams(), stream_tokens=False)
    for index in range(20):
        engine.submit(str(index), 300, 400, now=0.0)
    engine.advance(2.0)
    assert engine.num_running == 20
    assert 0 < engine.token_usage < 1
    assert engine.gen_throughput > 100  # tokens/s over the last window
    cached = ReplicaEngine(ReplicaParams(prefix_cache_hit_rate=0.5))
    cached.submit("a", 1000, 2, now=0.0)
    assert cached.cache_hit_rate == pytest.approx(0.5)


def test_ttft_grows_with_load_in_engine_and_model():
    params = ReplicaParams()
    engine_p95 = [p95(run_poisson(params, rps, 1500)) for rps in (2.0, 6.0, 9.0)]
    model_p95 = [ttft_quantile(params, rps, PROMPT, OUTPUT) for rps in (2.0, 6.0, 9.0)]
    assert engine_p95 == sorted(engine_p95) and model_p95 == sorted(model_p95)
    # The closed form tracks the engine within a factor of two below saturation.
    for measured, modelled in zip(engine_p95, model_p95):
        assert 0.5 < modelled / measured < 2.0


def test_analytic_capacity_matches_engine_saturation():
    params = ReplicaParams()
    capacity = capacity_rps(params, PROMPT, OUTPUT)
    assert max_batch(params, PROMPT, OUTPUT) == 256
    # 15% below capacity the engine keeps up; 15% above, the queue (and TTFT) runs away.
    below = p95(run_poisson(params, 0.85 * capacity, 2000))
    above = p95(run_poisson(params, 1.15 * capacity, 2000))
    assert below < 2.0
    assert above > 10 * below


def test_sustainable_rate_meets_the_slo_in_the_engine():
    params = ReplicaParams()
    slo = 1.0
    rate = sustainable_rps(params, PROMPT, OUTPUT, slo, quantile=0.95)
    assert 0 < rate < capacity_rps(params, PROMPT, OUTPUT)
    assert p95(run_poisson(params, rate, 2000)) <= slo * 1.2
    assert ttft_attainment(params, rate, PROMPT, OUTPUT, slo) == pytest.approx(0.95, abs=0.01)
    # A prompt too long for the GPU: nothing is sustainable.
    l4 = ReplicaParams(profile=profile_for("l4"))
    assert sustainable_rps(l4, 8000, 100, 0.5) == 0.0


def test_closed_form_attainment_never_flatters_the_engine():
    """The trace-replay simulator scores policies with `ttft_attainment`; at and around the
    sustainable rate the engine does at least as well, so the replay is, if anything, strict."""
    params = ReplicaParams()
    rate = sustainable_rps(params, PROMPT, OUTPUT, 1.0, quantile=0.99)
    for factor in (0.5, 0.9, 1.05):
        ttfts = run_poisson(params, factor * rate, 2000, seed=2)
        measured = sum(1 for t in ttfts if t <= 1.0) / len(ttfts)
        modelled = ttft_attainment(params, factor * rate, PROMPT, OUTPUT, 1.0)
        assert measured >= modelled - 0.005, (factor, measured, modelled)
