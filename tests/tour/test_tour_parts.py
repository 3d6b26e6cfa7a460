"""Fast tests of the tour's parts: trace replay, timing within the schema's floors, the report."""
from __future__ import annotations

import collections
import copy
from pathlib import Path

import pytest
import yaml

from digital_worker.operator import spec as dw_spec
from digital_worker.operator.loadgen import (RateProfile, Trace, TraceRequest, arrivals, default_trace, load_azure_trace,
                                             percentile, shared_data_dir, synthetic_trace)
from digital_worker.operator.tour import SCENARIOS, STEP_TITLES, TourTiming, tour_worker

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = yaml.safe_load((REPO / "examples" / "digitalworker.yaml").read_text())


def test_arrivals_follow_the_profile_and_keep_the_trace_order():
    trace = synthetic_trace(count=3000, rate=5.0, seed=3)
    profile = RateProfile.ramp(base=1.0, peak=9.0, warmup=20.0, ramp=40.0)
    sent = list(arrivals(trace, profile, until=80.0))
    per_10s = collections.Counter(int(at // 10) for at, _ in sent)
    # Expected per 10 s: 10 during the warm-up, ~90 on the plateau; bursts stay within a loose band.
    assert 3 <= per_10s[0] <= 25 and 60 <= per_10s[7] <= 120
    total_expected = 20 * 1.0 + 40 * 5.0 + 20 * 9.0
    assert abs(len(sent) - total_expected) < 0.2 * total_expected
    assert [r for _, r in sent[:50]] == list(trace.requests[:50])  # replayed in order, tokens and all
    times = [at for at, _ in sent]
    assert times == sorted(times)


def test_arrivals_repeat_a_short_trace_and_stop_at_the_end():
    trace = Trace("three", (TraceRequest(0.0, 10, 5), TraceRequest(1.0, 20, 5), TraceRequest(2.0, 30, 5)))
    sent = list(arrivals(trace, RateProfile(((0.0, 2.0),)), until=10.0))
    assert 17 <= len(sent) <= 21 and all(at < 10.0 for at, _ in sent)
    assert [r.prompt_tokens for _, r in sent[:6]] == [10, 20, 30, 10, 20, 30]


def test_rate_profile_interpolates_and_knows_its_peak():
    profile = RateProfile.ramp(base=2.0, peak=6.0, warmup=10.0, ramp=20.0)
    assert profile.rate(0) == 2.0 and profile.rate(10) == 2.0 and profile.rate(20) == pytest.approx(4.0)
    assert profile.rate(100) == 6.0 and profile.peak_time == 30.0
    shaped = RateProfile.from_shape([0.5, 1.0, 1.5], mean_rate=4.0, step_seconds=10.0)
    assert shaped.rate(5.0) == pytest.approx(3.0)


def test_azure_trace_from_shared_data_or_the_synthetic_sample():
    data = shared_data_dir()
    if data is not None and (data / "azure-llm-2023" / "AzureLLMInferenceTrace_conv.csv").exists():
        trace = load_azure_trace(data / "azure-llm-2023" / "AzureLLMInferenceTrace_conv.csv", limit=500)
        assert len(trace.requests) == 500 and trace.requests[0].offset == 0.0
        assert 1.0 < trace.mean_rate < 20.0 and all(r.prompt_tokens > 0 for r in trace.requests)
        assert "Azure" in default_trace(limit=100).source
    # Outside a checkout (no pyproject.toml above) there is no shared data: the synthetic sample is used.
    assert shared_data_dir(Path("/")) is None
    sample = synthetic_trace(count=200, seed=1)
    assert sample.source.startswith("synthetic") and sample == synthetic_trace(count=200, seed=1)


def test_percentile():
    assert percentile([], 0.95) is None
    assert percentile([float(i) for i in range(1, 101)], 0.95) == 95.0


@pytest.mark.parametrize("speed", [0.5, 1, 10, 100])
def test_tour_worker_is_a_valid_digitalworker_at_every_speed(speed):
    timing = TourTiming.for_speed(speed)
    body = tour_worker(copy.deepcopy(EXAMPLE), timing)
    normalized, problems = dw_spec.normalize_spec(body["spec"])
    assert problems == []
    assert timing.autoscale_interval >= 5 and timing.analysis_interval >= 5 and timing.analysis_window >= 10
    assert body["spec"]["autoscaling"]["mode"] == "Auto" and body["spec"]["replicas"] == 1
    steps = body["spec"]["rollout"]["canary"]["steps"]
    assert any("analysis" in step for step in steps) and steps[-1] == {"setWeight": 100}


def test_faster_tours_are_shorter_until_the_floors():
    slow, fast, fastest = TourTiming.for_speed(1), TourTiming.for_speed(10), TourTiming.for_speed(1000)
    assert slow.warmup + slow.ramp > fast.warmup + fast.ramp
    assert fast.warmup + fast.ramp == fastest.warmup + fastest.ramp  # the schema's 5 s interval floors both


def test_every_scenario_step_has_a_title_and_a_handler():
    from digital_worker.operator.tour import Tour

    for steps in SCENARIOS.values():
        assert steps[0] == "deploy"
        for step in steps:
            assert step in STEP_TITLES and callable(getattr(Tour, "step_" + step.replace("-", "_")))


def test_report_from_a_recording(tmp_path):
    from digital_worker.operator.report import write_report

    samples = [{"t": float(t), "offered_rate": 1 + t / 10, "rate": 1 + t / 12, "replicas": 1 + t // 20,
                "desired": 1 + t // 20, "ready": 1 + max(0, t - 2) // 20, "ttft_p95": 0.2 + (t % 7) / 10,
                "canary_weight": min(100, max(0, (t - 30) * 5)) if t >= 30 else None,
                "forecast": 2.0 if t > 40 else None, "forecast_lower": 1.5 if t > 40 else None,
                "forecast_upper": 2.5 if t > 40 else None} for t in range(60)]
    data = {"speed": 10, "worker": "ai/bot", "trace": "synthetic", "prometheus": None, "interrupted": False,
            "steps": [{"name": "deploy", "title": "Deploy", "ok": True, "skipped": False, "started": 0.0,
                       "finished": 2.0, "detail": "Ready", "facts": {}}],
            "samples": samples, "markers": [{"at": 0.0, "label": "deploy", "kind": "step"}],
            "events": [{"t": 21.0, "type": "Normal", "reason": "Scaled", "message": "replicas 1 -> 2"},
                       {"t": 45.0, "type": "Warning", "reason": "RolloutAborted", "message": "aborted"}],
            "requests": {"sent": 100, "dropped": 0, "errors": 3, "ttft_p95": 0.4,
                         "by_revision": {"abc": {"ok": 97, "error": 3, "http_5xx": 3, "broken": 0}}}}
    paths = write_report(data, tmp_path / "report")
    names = {p.name for p in paths}
    assert {"load.png", "forecast.png", "replicas.png", "ttft_p95.png", "rollout_weights.png", "summary.md",
            "tour.json"} <= names
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "all steps passed" in summary and "RolloutAborted" in summary and "| abc | 97 | 3 |" in summary
    import matplotlib.image

    assert matplotlib.image.imread(tmp_path / "report" / "forecast.png")[..., :3].std() > 0.05


def test_a_nab_series_as_a_rate_shape(tmp_path):
    data = shared_data_dir()
    path = data / "nab" / "nyc_taxi.csv" if data is not None else None
    if path is None or not path.exists():
        path = tmp_path / "series.csv"
        path.write_text("timestamp,value\n" + "".join(f"2014-07-01 00:{i:02d}:00,{10 + i % 5}\n" for i in range(48)))
    from digital_worker.operator.loadgen import nab_rate_shape

    shape = nab_rate_shape(path, points=48)
    assert len(shape) == 48 and sum(shape) / len(shape) == pytest.approx(1.0)
    profile = RateProfile.from_shape(shape, mean_rate=5.0, step_seconds=2.0)
    sent = list(arrivals(synthetic_trace(count=1000), profile, until=96.0))
    assert abs(len(sent) - 5.0 * 94) < 0.25 * 5.0 * 94  # the series' mean rate, its ups and downs


def test_live_view_shows_workers_revisions_load_and_the_last_decision():
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from digital_worker.operator.dev import LiveView

    sample = {"phase": "Ready", "stable_revision": "aaa111", "rollout_phase": "Progressing", "rollout_revision": "bbb222",
              "canary_weight": 25.0, "ready": 3, "replicas": 4, "desired": 4, "rate": 6.5, "forecast": 7.25,
              "ttft_p95": 0.42, "decision": "ScaleUp", "reason": "queue 9 above 2 per replica"}
    tour = SimpleNamespace(name="support-bot", now=lambda: 12.0, current_step="Traffic ramps",
                           timing=TourTiming.for_speed(10), recorder=SimpleNamespace(latest=lambda: sample))
    view = LiveView(Console(file=io.StringIO()), tour)
    view.narrate("autoscaler: replicas 3 → 4")
    out = io.StringIO()
    Console(file=out, width=200).print(view)
    text = out.getvalue()
    for expected in ("support-bot", "aaa111", "bbb222 (25.0%)", "3/4", "6.5 / 7.2 req/s", "0.42s",
                     "ScaleUp: queue 9 above 2 per replica", "autoscaler: replicas 3 → 4", "Traffic ramps"):
        assert expected in text, expected


async def test_load_generator_counts_a_failed_stream_as_failed_and_says_how_it_failed():
    """Against a real simulated SGLang whose scheduler fails everything: a stream answers 200 and
    carries an SSE error event, a plain request answers 500. The client side must call both failed
    (SGLang's metrics see only the second) and tell them apart."""
    import aiohttp

    from digital_worker.operator.loadgen import LoadGenerator
    from digital_worker.runtime.sim import SimConfig, SimulatedSGLang

    trace = Trace("test", (TraceRequest(0.0, 40, 4),))
    async with SimulatedSGLang(SimConfig(model_name="m", error_rate=1.0, seed=1)) as server:
        generator = LoadGenerator(None, "ns", "w", "m", trace, RateProfile(((0.0, 1.0),)), stream_share=0.5, seed=3)
        async with aiohttp.ClientSession() as session:
            for _ in range(12):
                await generator._send(session, "rev", server.url, trace.requests[0])
        async with aiohttp.ClientSession() as session:
            async with session.post(server.url + "/admin/faults", json={"error_rate": 0.0}) as response:
                assert response.status == 200
            for _ in range(6):
                await generator._send(session, "rev", server.url, trace.requests[0])
    failed, healthy = generator.records[:12], generator.records[12:]
    streams = [r for r in failed if r.status == 200]
    plain = [r for r in failed if r.status != 200]
    assert streams and plain  # both kinds were sent
    assert all(not r.ok and r.stream_error == 500 and r.ttft is None for r in streams)
    assert all(not r.ok and r.status == 500 and r.stream_error == 0 for r in plain)
    assert all(r.ok and r.stream_error == 0 for r in healthy)
    assert any(r.ttft is not None for r in healthy) and any(r.ttft is None for r in healthy)  # streams have a TTFT
