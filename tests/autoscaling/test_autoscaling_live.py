"""Metrics sources and the Autoscaler against real parts: the runtime's simulated SGLang servers
(a prometheus_client exposition with SGLang's metric names), a real Prometheus, a load generator.

The end-to-end test plays the operator's timer: every tick it calls `Autoscaler.tick` and, in Auto
mode only, applies the decision by starting or stopping simulated replicas (each with a cold
start) and pointing Prometheus at them.
"""
from __future__ import annotations

import asyncio
import contextlib
import math
import time

import aiohttp
import pytest

from dwtest_support import free_port
from digital_worker.operator.autoscaling.controller import Autoscaler, OperatorMetrics
from digital_worker.operator.autoscaling.history import (
    ITL_P95,
    KV_CACHE_USAGE,
    QUEUE_LENGTH,
    REQUEST_RATE,
    RUNNING_REQUESTS,
    TTFT_P95,
)
from digital_worker.operator.autoscaling.metrics import (
    InMemoryMetricsSource,
    InProcessScraper,
    PrometheusMetricsSource,
    histogram_quantile,
)
from digital_worker.operator.autoscaling.policy import HOLD, HOLD_METRICS_MISSING, SCALE_UP, request_mix
from digital_worker.runtime.sim import SimConfig, SimulatedSGLang

pytestmark = pytest.mark.timeout(150)
PROMPT = "please summarise the quarterly report for the board " * 20


class Fleet:
    """Simulated replicas the test starts and stops; a round-robin load balancer in front."""

    def __init__(self, prometheus=None, job: str = "dw-e2e", cold_start: float = 1.0) -> None:
        self.prometheus = prometheus
        self.job = job
        self.cold_start = cold_start
        self.servers: list[SimulatedSGLang] = []
        self._next = 0

    async def resize(self, replicas: int) -> None:
        while len(self.servers) < replicas:
            server = SimulatedSGLang(SimConfig(port=0, cold_start_seconds=self.cold_start, seed=len(self.servers)))
            await server.start()
            self.servers.append(server)
        while len(self.servers) > replicas:
            await self.servers.pop().stop()
        if self.prometheus is not None:
            await asyncio.to_thread(self.prometheus.set_targets, self.job, self.addresses())

    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{server.port}" for server in self.servers]

    def ready(self) -> int:
        return sum(1 for server in self.servers if server.ready)

    def pick(self) -> SimulatedSGLang | None:
        ready = [server for server in self.servers if server.ready]
        if not ready:
            return None
        self._next += 1
        return ready[self._next % len(ready)]

    async def close(self) -> None:
        await self.resize(0)


async def generate_load(fleet: Fleet, rate_at, stop: asyncio.Event, counts: dict, prompt_at=None) -> None:
    """Open-loop load following `rate_at(seconds since start)`, with `prompt_at(seconds)` (default PROMPT)."""
    started = time.monotonic()
    pending: set[asyncio.Task] = set()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def one(prompt: str) -> None:
            server = fleet.pick()
            if server is None:
                counts["rejected"] = counts.get("rejected", 0) + 1
                return
            try:
                async with session.post(f"{server.url}/v1/completions",
                                        json={"model": "default", "prompt": prompt, "max_tokens": 24}) as response:
                    await response.read()
                    counts[response.status] = counts.get(response.status, 0) + 1
            except (aiohttp.ClientError, asyncio.TimeoutError):
                counts["error"] = counts.get("error", 0) + 1

        while not stop.is_set():
            elapsed = time.monotonic() - started
            rate = max(0.1, rate_at(elapsed))
            task = asyncio.create_task(one(prompt_at(elapsed) if prompt_at else PROMPT))
            pending.add(task)
            task.add_done_callback(pending.discard)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0 / rate)
        if pending:
            await asyncio.wait(pending, timeout=10)


async def autoscale_under_load(fleet: Fleet, spec: dict, seconds: float, rate_at, *, replicas: int,
                               apply: bool, prompt_at=None) -> tuple[list, dict, list, dict]:
    """Start `replicas`, offer load, and play the operator's timer for `seconds`: a tick every 2 s
    (Prometheus source, 4 s rate window), resizing the fleet to each decision when `apply`.
    Returns (seconds since start, decision) per tick, the last status, the replicas after each tick
    and the responses by status code. The fleet is closed at the end."""
    job = fleet.job
    source = PrometheusMetricsSource(fleet.prometheus.url, rate_window_seconds=4, include_gpu=False)
    autoscaler = Autoscaler(bucket_seconds=5.0, history_seconds=600.0)
    stop = asyncio.Event()
    counts: dict = {}
    ticks, replicas_seen, status = [], [], {}
    try:
        await fleet.resize(replicas)
        load = asyncio.create_task(generate_load(fleet, rate_at, stop, counts, prompt_at))
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            await asyncio.sleep(2.0)
            decision, status = await autoscaler.tick(
                f"team/{job}", spec, len(fleet.servers), fleet.ready(), time.time(), source, selector=f'job="{job}"')
            ticks.append((time.monotonic() - started, decision))
            if apply and decision.desired_replicas != len(fleet.servers):
                await fleet.resize(decision.desired_replicas)
            replicas_seen.append(len(fleet.servers))
        stop.set()
        await load
    finally:
        stop.set()
        autoscaler.close()
        await fleet.close()
    return ticks, status, replicas_seen, counts


def test_histogram_quantile_matches_prometheus_semantics():
    buckets = [(0.1, 10.0), (0.5, 60.0), (1.0, 95.0), (math.inf, 100.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1 + 0.4 * 40 / 50)
    assert histogram_quantile(0.95, buckets) == pytest.approx(1.0)
    assert histogram_quantile(0.99, buckets) == pytest.approx(1.0)  # in the +Inf bucket: its lower bound
    assert histogram_quantile(0.5, [(1.0, 0.0), (math.inf, 0.0)]) is None


async def test_prometheus_source_reads_sglang_metrics(prometheus):
    fleet = Fleet(prometheus, job="dw-metrics", cold_start=0.0)
    stop = asyncio.Event()
    counts: dict = {}
    try:
        await fleet.resize(2)
        load = asyncio.create_task(generate_load(fleet, lambda t: 20.0, stop, counts))
        # Polling blocks: off the event loop, so the load keeps flowing.
        await asyncio.to_thread(
            prometheus.wait_for, 'sum(rate({__name__=~"sglang[:_]num_requests_total",job="dw-metrics"}[5s])) > 5', 40)
        await asyncio.sleep(6)  # a full rate window of steady load
        source = PrometheusMetricsSource(prometheus.url, rate_window_seconds=5, include_gpu=False)
        history = await asyncio.to_thread(source.history, 'job="dw-metrics"', 30.0, 2.0)
        stop.set()
        await load
    finally:
        stop.set()
        await fleet.close()
    assert history.error is None
    assert history.staleness(time.time()) < 10
    peak = history.maximum(REQUEST_RATE, time.time() - 60)
    assert 10.0 < peak < 30.0, history.values(REQUEST_RATE)  # 20 req/s offered (less on a busy machine)
    for name in (QUEUE_LENGTH, RUNNING_REQUESTS, KV_CACHE_USAGE, TTFT_P95, ITL_P95):
        assert history.latest(name) is not None, name
    assert 0 < history.latest(TTFT_P95) < 2.0
    assert counts.get(200, 0) > 50
    # The token rates give the request mix the policy sizes token capacities by: every request
    # asked for 24 tokens of the same prompt.
    mix = request_mix(history, None, 50.0)
    assert mix is not None and 18.0 < mix.generation_tokens < 30.0, mix
    assert 100.0 < mix.prompt_tokens < 400.0, mix


async def test_prometheus_down_means_hold():
    source = PrometheusMetricsSource(f"http://127.0.0.1:{free_port()}", timeout_seconds=1)
    history = source.history('job="dw-gone"', 300.0, 20.0)
    assert history.error and "Prometheus at" in history.error
    autoscaler = Autoscaler()
    try:
        decision, status = await autoscaler.tick(
            "team/bot", {"mode": "Auto", "minReplicas": 1, "maxReplicas": 6}, 4, 4, time.time(), source,
            selector='job="dw-gone"')
    finally:
        autoscaler.close()
    assert decision.action == HOLD and decision.desired_replicas == 4
    assert decision.hold_condition == HOLD_METRICS_MISSING
    assert status["holdCondition"] == HOLD_METRICS_MISSING and status["desiredReplicas"] == 4


async def test_in_process_scraper_without_prometheus():
    fleet = Fleet(cold_start=0.0)
    source = InMemoryMetricsSource()
    scraper = InProcessScraper(source)
    stop = asyncio.Event()
    try:
        await fleet.resize(2)
        load = asyncio.create_task(generate_load(fleet, lambda t: 15.0, stop, {}))
        for _ in range(8):
            await asyncio.sleep(1.0)
            answered = await asyncio.to_thread(scraper.scrape, "team/bot", fleet.addresses())
            assert answered == 2
        stop.set()
        await load
        # Replicas gone: scrapes answer nothing, nothing is recorded, the history goes stale.
        await fleet.close()
        assert await asyncio.to_thread(scraper.scrape, "team/bot", [f"127.0.0.1:{free_port()}"]) == 0
    finally:
        stop.set()
        await fleet.close()
    history = source.history("team/bot", 60.0, 1.0)
    assert 8.0 < history.maximum(REQUEST_RATE, 0) < 25.0
    assert history.latest(TTFT_P95) is not None
    assert history.staleness(time.time() + 120) > 100


async def test_tick_never_waits_for_a_fit_and_installs_it_later():
    """A long history makes the fit take a while; the tick must return before it is done."""
    from prometheus_client import CollectorRegistry

    source = InMemoryMetricsSource(retention_seconds=30 * 86400)
    now = 1_700_000_000.0
    bucket = 300.0
    for i in range(int(14 * 86400 / bucket)):
        t = now - 14 * 86400 + i * bucket
        rate = 20 + 15 * math.sin(2 * math.pi * t / 86400)
        source.record("team/bot", t, {REQUEST_RATE: rate, QUEUE_LENGTH: 0, KV_CACHE_USAGE: 0.3, TTFT_P95: 0.4})
    registry = CollectorRegistry()
    autoscaler = Autoscaler(bucket_seconds=bucket, metrics=OperatorMetrics(registry))
    spec = {"mode": "DryRun", "minReplicas": 1, "maxReplicas": 20, "targetRequestsPerReplica": 4,
            "intervalSeconds": 20, "coldStartSeconds": 120}
    try:
        started = time.perf_counter()
        decision, status = await autoscaler.tick("team/bot", spec, 5, 5, now, source)
        first_tick = time.perf_counter() - started
        assert "forecast" not in status  # the fit is still running
        await autoscaler.wait_for_fits()
        decision, status = await autoscaler.tick("team/bot", spec, 5, 5, now + 20, source)
        _, with_nodes = await autoscaler.tick("team/bot", spec, 5, 5, now + 40, source, node_provisioning_seconds=600)
        await autoscaler.wait_for_fits()
    finally:
        autoscaler.close()
    assert first_tick < 0.5, first_tick
    # Lead time = cold start + one tick (+ half a bucket of averaging), plus new nodes when needed.
    assert status["forecast"]["horizonSeconds"] == pytest.approx(120 + 20 + bucket / 2)
    assert with_nodes["forecast"]["horizonSeconds"] == pytest.approx(status["forecast"]["horizonSeconds"] + 600)
    assert status["forecast"]["model"].startswith("holt-winters")
    assert status["forecast"]["upper"] >= status["forecast"]["value"] > 0
    assert status["mode"] == "DryRun" and status["lastFitSeconds"] > 0
    assert "lastScaleTime" not in status  # DryRun scales nothing
    # The first fit, and a refit because the longer lead changed the horizon the bands are for.
    assert registry.get_sample_value("digitalworker_autoscaler_fit_seconds_count") == 2
    decisions = sum(registry.get_sample_value("digitalworker_autoscaler_decisions_total",
                                              {"namespace": "team", "name": "bot", "action": action,
                                               "mode": "DryRun"}) or 0 for action in ("ScaleUp", "ScaleDown", "Hold"))
    assert decisions == 3


async def test_off_and_invalid_specs():
    autoscaler = Autoscaler()
    try:
        decision, status = await autoscaler.tick("a/b", {"mode": "Off"}, 3, 3, 0.0, None)
        assert decision.action == HOLD and status == {"mode": "Off", "desiredReplicas": 3,
                                                      "reason": "autoscaling is off"}
        decision, status = await autoscaler.tick("a/b", {"mode": "Auto", "minReplicas": 5, "maxReplicas": 1},
                                                 3, 3, 0.0, InMemoryMetricsSource())
        assert decision.hold_condition == "InvalidSpec" and "maxReplicas" in status["reason"]
    finally:
        autoscaler.close()


@pytest.mark.e2e
@pytest.mark.parametrize("mode", ["Auto", "DryRun"])
async def test_replicas_follow_a_ramp_end_to_end(prometheus, mode):
    """Load ramps 2 -> 14 req/s over 16 s; at 3 req/s per replica the fleet must grow to >= 4.

    In DryRun the decisions say so, and nothing changes.
    """
    fleet = Fleet(prometheus, job=f"dw-ramp-{mode.lower()}", cold_start=1.0)
    spec = {"mode": mode, "minReplicas": 1, "maxReplicas": 8, "targetRequestsPerReplica": 3.0,
            "intervalSeconds": 2, "coldStartSeconds": 2, "slo": {"ttftP95Seconds": 2.0},
            "scaleDown": {"stabilizationSeconds": 6, "maxStepReplicas": 2}}
    ramp = lambda t: 2.0 + 12.0 * min(1.0, t / 16.0)
    duration = 28.0 if mode == "Auto" else 22.0
    ticks, status, replicas_seen, counts = await autoscale_under_load(fleet, spec, duration, ramp, replicas=1,
                                                                      apply=mode == "Auto")
    decisions = [(round(t), d.desired_replicas, d.action) for t, d in ticks]
    wanted = max(d for _, d, _ in decisions)
    assert wanted >= 4, decisions
    assert any(action == SCALE_UP for _, _, action in decisions)
    if mode == "Auto":
        assert replicas_seen[0] <= 2 and max(replicas_seen) >= 4, replicas_seen
        # It grew with the ramp: never far ahead of what the current load needs.
        assert max(replicas_seen) <= 8
        assert status["mode"] == "Auto" and "lastScaleTime" in status
    else:
        assert set(replicas_seen) == {1}, replicas_seen  # DryRun changed nothing
        assert status["mode"] == "DryRun" and status["desiredReplicas"] >= 4
        assert "lastScaleTime" not in status
    assert counts.get(200, 0) > 100


async def test_prometheus_source_reads_the_node_agents_gpu_series(tmp_path, prometheus):
    """GPU utilisation and memory of a worker's pods, from a real node agent (fake NVML, GPUs
    attributed to pods through a pod-resources socket) scraped by a real Prometheus."""
    import os
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "agents"))
    from agent_process import AgentProcess
    from kubelet_fake import FakeKubelet

    from digital_worker.operator.autoscaling.history import GPU_MEMORY_USED, GPU_UTILIZATION

    def uuid(index: int) -> str:
        return f"GPU-fa4e0000-0000-4000-8000-{index:012d}"

    socket_path = f"/tmp/dw-autoscale-gpu-{os.getpid()}.sock"
    with FakeKubelet(socket_path) as kubelet:
        kubelet.servicer.set_pods([("bot-a", "ai", "sglang", "nvidia.com/gpu", [uuid(0)]),
                                   ("bot-b", "ai", "sglang", "nvidia.com/gpu", [uuid(1)]),
                                   ("other", "ai", "sglang", "nvidia.com/gpu", [uuid(2)])])
        with AgentProcess(tmp_path, fake_gpus=3, pod_resources_socket=socket_path,
                          fake_config={"gpu": {"0": {"gpu_util": 90}, "1": {"gpu_util": 70},
                                               "2": {"gpu_util": 5}}}) as agent:
            # Scraped as a pod itself: the agent's pod labels become exported_pod/exported_namespace.
            await asyncio.to_thread(prometheus.set_targets, "gpu-agent", [f"127.0.0.1:{agent.port}"])
            await asyncio.to_thread(prometheus.wait_for, 'DCGM_FI_DEV_GPU_UTIL{pod=~"bot-.*"}', 30,
                                    lambda r: len(r) == 2)
            source = PrometheusMetricsSource(prometheus.url)
            # The range query's end is rounded to whole seconds: a sample scraped within the last
            # second can be just past it, so ask again until the first one is in range.
            for _ in range(20):
                history = await asyncio.to_thread(source.history, 'job="dw-none"', 60.0, 5.0, None, None,
                                                  ("ai", ("bot-a", "bot-b")))
                if history.error is not None or history.latest(GPU_UTILIZATION) is not None:
                    break
                await asyncio.sleep(0.5)
            without_pods = await asyncio.to_thread(source.history, 'job="dw-none"', 60.0, 5.0)
    assert history.error is None
    assert history.latest(GPU_UTILIZATION) == pytest.approx(0.8)  # the worker's two GPUs, not the other pod's
    assert 0 < history.latest(GPU_MEMORY_USED) < 1
    assert history.latest(REQUEST_RATE) is None  # no SGLang series here: the policy would hold
    assert without_pods.latest(GPU_UTILIZATION) is None


async def test_longer_prompts_at_a_steady_rate_scale_up_end_to_end(prometheus):
    """14 req/s throughout; after 36 s every prompt is twice as long. The token rates Prometheus reports
    make the prompt-token capacity bind: the autoscaler asks for more replicas although the request
    rate did not move and TTFT is still within the SLO."""
    fleet = Fleet(prometheus, job="dw-prompts", cold_start=0.5)
    # 14 req/s at 10 per replica: 2 replicas with room for a noisy 4 s rate window and the forecast
    # band (at 8 per replica a reading of 16.1 asked for a third once); 3 or more once prompts double.
    spec = {"mode": "Auto", "minReplicas": 1, "maxReplicas": 8, "targetRequestsPerReplica": 10.0,
            "intervalSeconds": 2, "coldStartSeconds": 1, "slo": {"ttftP95Seconds": 2.0},
            "scaleDown": {"stabilizationSeconds": 6, "maxStepReplicas": 2}}
    switch = 36.0
    ticks, status, _, counts = await autoscale_under_load(
        fleet, spec, switch + 24.0, lambda t: 14.0, replicas=2, apply=True,
        prompt_at=lambda t: PROMPT if t < switch else PROMPT * 2)
    decisions = [(t, d.desired_replicas, d.reason) for t, d in ticks]
    before = [d for t, d, _ in decisions if 20.0 < t < switch]
    after = [(d, reason) for t, d, reason in decisions if t > switch + 16.0]
    assert before and max(before) == 2, decisions  # the short prompts
    assert after and min(d for d, _ in after) >= 3, decisions
    assert any("capacity bound by prompt tokens" in reason for _, reason in after), decisions
    assert "ttft" not in " ".join(reason.lower() for _, reason in after)  # not the safety net: TTFT was fine
    assert status["capacityPromptTokensPerReplica"] > 0
    assert counts.get(200, 0) > 600


def test_the_operators_selector_leaves_the_fallback_models_replicas_out(prometheus):
    """The fallback's pods carry the worker's instance label too (revision `fallback`): through a
    real Prometheus, the selector the operator's autoscaler uses counts the primary's load only."""
    from digital_worker.operator.periodic import prometheus_selector

    async def scenario() -> dict[str, float]:
        primary = SimulatedSGLang(SimConfig(port=0, cold_start_seconds=0.0, seed=1))
        backup = SimulatedSGLang(SimConfig(port=0, cold_start_seconds=0.0, seed=2))
        await primary.start()
        await backup.start()
        try:
            worker = 'namespace="ai",digitalworker_io_instance="helpdesk"'
            labels = {"namespace": "ai", "digitalworker_io_instance": "helpdesk"}
            await asyncio.to_thread(prometheus.set_targets, "dw-primary", [f"127.0.0.1:{primary.port}"],
                                    {**labels, "digitalworker_io_revision": "5f8c2d"})
            await asyncio.to_thread(prometheus.set_targets, "dw-fallback", [f"127.0.0.1:{backup.port}"],
                                    {**labels, "digitalworker_io_revision": "fallback"})
            source = PrometheusMetricsSource(prometheus.url, rate_window_seconds=4, include_gpu=False)
            selectors = {"ours": prometheus_selector("ai", "helpdesk"), "every": worker,
                         "primary": worker + ',digitalworker_io_revision="5f8c2d"',
                         "fallback": worker + ',digitalworker_io_revision="fallback"'}
            async with aiohttp.ClientSession() as session:
                async def send(server: SimulatedSGLang, count: int) -> None:
                    for _ in range(count):
                        async with session.post(f"{server.url}/v1/completions",
                                                json={"model": "default", "prompt": "hi", "max_tokens": 4}) as response:
                            await response.read()

                deadline = time.monotonic() + 40
                while time.monotonic() < deadline:
                    await asyncio.gather(send(primary, 2), send(backup, 6))  # the fallback busier: 3x
                    # One evaluation time for every selector: the same samples, so the sums are exact.
                    now = time.time() - 1.0
                    rates = {key: source.history(selector, 8, 1.0, now=now).latest(REQUEST_RATE) or 0.0
                             for key, selector in selectors.items()}
                    if rates["fallback"] > rates["primary"] > 0:
                        return rates
                    await asyncio.sleep(0.5)
                return rates
        finally:
            await primary.stop()
            await backup.stop()

    rates = asyncio.run(scenario())
    # Both replicas are scraped and the fallback is the busier, yet the operator's selector counts
    # exactly the primary's requests: everything minus the fallback's.
    assert rates["fallback"] > rates["primary"] > 0, rates
    assert rates["ours"] == pytest.approx(rates["primary"]), rates
    assert rates["every"] == pytest.approx(rates["primary"] + rates["fallback"]), rates
