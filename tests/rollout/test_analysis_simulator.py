"""The analysis against the project's SGLang-compatible simulator, scraped by a real Prometheus.

Three simulated replicas (runtime/sim.py, in-process, real HTTP): a stable one, a canary with 10%
injected failures and a canary twice as slow. Each is its own Prometheus job, so revisions are
selected by `job` (no relabelling needed), and the simulator answers in OpenMetrics, so the
stored names are the `sglang_` form. Requests are real OpenAI-style completions over HTTP.
"""
from __future__ import annotations

import asyncio
import threading

import pytest

from digital_worker.operator.analysis import (
    REASON_FAILED,
    Action,
    AnalysisSpec,
    AnalysisState,
    Verdict,
    evaluate,
    measure_run,
)
from digital_worker.operator.metric_providers import (
    ERROR_RATE,
    REQUEST_COUNT,
    TTFT_P95,
    PrometheusProvider,
    revision_queries,
)

sim = pytest.importorskip("digital_worker.runtime.sim")
pytest.importorskip("aiohttp")

WINDOW_SECONDS = 10
# ~2400 prompt tokens: a TTFT of a few hundred ms on the simulated H100, above SGLang's first
# TTFT bucket (0.1 s), so a 2x slowdown is visible in the histogram.
PROMPT = "word " * 1900


class SimulatedFleet:
    """The replicas and a steady load on each, on an event loop in a thread of its own (the
    test's Prometheus helpers block)."""

    def __init__(self, configs: dict[str, "sim.SimConfig"], rps: float) -> None:
        self.configs, self.rps = configs, rps
        self.servers: dict[str, sim.SimulatedSGLang] = {}
        self.ready = threading.Event()
        self.failed: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop_event: asyncio.Event | None = None
        self.statuses: dict[str, list[int]] = {name: [] for name in configs}
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # surfaced to the test
            self.failed = exc
            self.ready.set()

    async def _main(self) -> None:
        import aiohttp

        self.loop = asyncio.get_running_loop()
        self.stop_event = asyncio.Event()
        for name, config in self.configs.items():
            self.servers[name] = await sim.SimulatedSGLang(config).start()
        try:
            async with aiohttp.ClientSession() as session:
                self.ready.set()
                tasks = [asyncio.create_task(self._load(session, name)) for name in self.configs]
                await self.stop_event.wait()
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for server in self.servers.values():
                await server.stop()

    async def _load(self, session, name: str) -> None:
        url = self.servers[name].url + "/v1/completions"
        in_flight: set[asyncio.Task] = set()

        async def one() -> None:
            async with session.post(url, json={"model": "m", "prompt": PROMPT, "max_tokens": 4}) as response:
                await response.read()
                self.statuses[name].append(response.status)

        try:
            while True:
                task = asyncio.create_task(one())
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                await asyncio.sleep(1 / self.rps)
        finally:
            for task in in_flight:
                task.cancel()

    def __enter__(self) -> "SimulatedFleet":
        self.thread.start()
        self.ready.wait(30)
        if self.failed:
            raise self.failed
        return self

    def __exit__(self, *exc) -> None:
        if self.loop is not None and self.stop_event is not None:
            self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(timeout=20)
        assert not self.thread.is_alive()


def job(name: str) -> dict[str, str]:
    return {"job": name}


def test_analysis_judges_simulated_sglang_replicas(prometheus):
    configs = {
        "dw-stable": sim.SimConfig(model_name="m", gpu_type="nvidia-h100-80gb", seed=1),
        "dw-canary-errors": sim.SimConfig(model_name="m", gpu_type="nvidia-h100-80gb", error_rate=0.1, seed=2),
        "dw-canary-slow": sim.SimConfig(model_name="m", gpu_type="nvidia-h100-80gb", latency_factor=2.0, seed=3),
    }
    with SimulatedFleet(configs, rps=4) as fleet:
        for name, server in fleet.servers.items():
            prometheus.set_targets(name, [f"127.0.0.1:{server.port}"])
        for name in configs:
            count = revision_queries(job(name), WINDOW_SECONDS)[REQUEST_COUNT].promql
            prometheus.wait_for(count, timeout=60, predicate=lambda r: float(r[0]["value"][1]) >= 25)
        # The simulator's exposition is OpenMetrics: Prometheus stored the underscore form.
        assert prometheus.query('count({__name__="sglang_num_requests_total"})')

        provider = PrometheusProvider(prometheus.url, timeout=3)
        spec = AnalysisSpec.from_dict({"windowSeconds": WINDOW_SECONDS, "minRequests": 20, "maxErrorRate": 0.02,
                                       "maxTTFTP95Ratio": 1.5, "maxITLP95Ratio": None})

        run = measure_run(provider, spec, job("dw-canary-errors"), job("dw-stable"))
        result, state = evaluate(AnalysisState.start(0.0), run, 30.0, spec)
        checks = {check.name: check for check in result.checks}
        assert result.action is Action.ABORT and result.reason == REASON_FAILED
        assert checks["maxErrorRate"].verdict is Verdict.FAILED
        assert 0.03 < checks["maxErrorRate"].value < 0.25
        assert checks["maxTTFTP95Ratio"].verdict is Verdict.SUCCESSFUL
        # What the HTTP clients saw agrees with what the analysis measured.
        statuses = fleet.statuses["dw-canary-errors"]
        assert 0.03 < sum(status >= 500 for status in statuses) / len(statuses) < 0.25

        run = measure_run(provider, spec, job("dw-canary-slow"), job("dw-stable"))
        result, _ = evaluate(AnalysisState.start(0.0), run, 30.0, spec)
        checks = {check.name: check for check in result.checks}
        assert checks["maxErrorRate"].verdict is Verdict.SUCCESSFUL and checks["maxErrorRate"].value == 0.0
        assert checks["maxTTFTP95Ratio"].verdict is Verdict.FAILED, checks["maxTTFTP95Ratio"].message
        assert result.action is Action.ABORT

        # The stable judged against itself passes: no false alarm from the measurement itself.
        run = measure_run(provider, spec, job("dw-stable"), job("dw-stable"))
        result, _ = evaluate(AnalysisState.start(0.0), run, 30.0, spec)
        assert result.action is Action.PASS, result.message
        assert run.canary[ERROR_RATE].value == 0.0 and run.canary[TTFT_P95].value > 0.1
