"""Benchmarks of the SGLang-compatible simulator (runtime/sim.py).

  replay    Replays a slice of the Azure LLM inference trace (conversation, 2023; Splitwise, ISCA'24,
            CC-BY) against one simulated replica over real HTTP with streaming clients, and the same
            arrivals through `perfmodel.ReplicaEngine` in virtual time. The ratios say how closely the
            real-time server reproduces the model it is built on (HTTP, asyncio and client overhead).
  idle      Starts many simulated servers in one process and measures the CPU they burn while idle
            and the memory they take: the lead runs 10-50 of them per end-to-end test.
  overhead  Requests per second one simulated server answers when the model's steps cost ~nothing:
            the ceiling the HTTP layer puts on a load test.

Usage: python bench/runtime_sim.py [--json FILE] [--requests N] [--speedup X] [--servers N]
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import aiohttp

from digital_worker.runtime.perfmodel import Finished, ReplicaEngine, capacity_rps, ttft_quantile
from digital_worker.runtime.sim import SimConfig, SimulatedSGLang

REPO = Path(__file__).resolve().parents[1]
TRACE = REPO.parent / "shared" / "data" / "azure-llm-2023" / "AzureLLMInferenceTrace_conv.csv"


def load_trace(count: int, speedup: float, max_prompt: int) -> list[tuple[float, int, int]]:
    """(arrival seconds from 0, prompt tokens, output tokens) of the first `count` requests."""
    requests = []
    with open(TRACE) as handle:
        for row in csv.DictReader(handle):
            stamp = datetime.fromisoformat(row["TIMESTAMP"][:26])
            requests.append((stamp, min(int(row["ContextTokens"]), max_prompt), max(1, int(row["GeneratedTokens"]))))
            if len(requests) == count:
                break
    start = requests[0][0]
    return [((stamp - start).total_seconds() / speedup, prompt, output) for stamp, prompt, output in requests]


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarise(ttfts: list[float], e2es: list[float]) -> dict:
    return {"ttft_p50": quantile(ttfts, 0.5), "ttft_p95": quantile(ttfts, 0.95), "ttft_mean": statistics.mean(ttfts),
            "e2e_mean": statistics.mean(e2es), "count": len(ttfts)}


def replay_virtual(config: SimConfig, trace) -> dict:
    engine = ReplicaEngine(config.replica_params(), stream_tokens=False)
    ttfts, e2es = [], []
    for index, (arrival, prompt, output) in enumerate(trace):
        for event in engine.advance(arrival):
            if isinstance(event, Finished):
                ttfts.append(event.ttft)
                e2es.append(event.e2e_latency)
        engine.submit(str(index), prompt, output, arrival)
    while (next_time := engine.next_event_time()) is not None:
        for event in engine.advance(next_time):
            if isinstance(event, Finished):
                ttfts.append(event.ttft)
                e2es.append(event.e2e_latency)
    return summarise(ttfts, e2es)


async def replay_http(config: SimConfig, trace) -> dict:
    ttfts, e2es, failures = [], [], 0
    async with SimulatedSGLang(config) as server:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            origin = time.monotonic()

            async def one(arrival: float, prompt: int, output: int) -> None:
                nonlocal failures
                await asyncio.sleep(max(0.0, origin + arrival - time.monotonic()))
                sent = time.monotonic()
                first = None
                # The simulator counts one token per 4 bytes of prompt: this prompt is exactly `prompt` tokens.
                body = {"model": config.model_name, "prompt": "abcd" * prompt, "max_tokens": output, "stream": True}
                async with session.post(server.url + "/v1/completions", json=body) as response:
                    if response.status != 200:
                        failures += 1
                        return
                    async for line in response.content:
                        if first is None and line.startswith(b"data: {"):
                            first = time.monotonic() - sent
                ttfts.append(first)
                e2es.append(time.monotonic() - sent)

            cpu_before = time.process_time()
            await asyncio.gather(*(one(*request) for request in trace))
            cpu = time.process_time() - cpu_before
            wall = time.monotonic() - origin
    result = summarise(ttfts, e2es)
    result.update(failures=failures, wall_seconds=wall, process_cpu_share=cpu / wall)
    return result


def rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


async def idle(servers: int, seconds: float) -> dict:
    rss_before = rss_mib()
    started = time.monotonic()
    fleet = [SimulatedSGLang(SimConfig(model_name=f"m{i}")) for i in range(servers)]
    await asyncio.gather(*(server.start() for server in fleet))
    start_seconds = time.monotonic() - started
    cpu_before = time.process_time()
    await asyncio.sleep(seconds)
    idle_cpu = time.process_time() - cpu_before
    rss_after = rss_mib()
    await asyncio.gather(*(server.stop() for server in fleet))
    return {"servers": servers, "start_seconds_total": start_seconds, "idle_cpu_share": idle_cpu / seconds,
            "rss_mib_per_server": (rss_after - rss_before) / servers}


async def overhead(seconds: float, concurrency: int) -> dict:
    # latency_factor shrinks every step to ~nothing: what is left is HTTP and asyncio.
    async with SimulatedSGLang(SimConfig(model_name="m", latency_factor=1e-4)) as server:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            done = 0
            stop_at = time.monotonic() + seconds

            async def worker() -> None:
                nonlocal done
                while time.monotonic() < stop_at:
                    async with session.post(server.url + "/v1/completions",
                                            json={"model": "m", "prompt": "hi", "max_tokens": 4}) as response:
                        await response.read()
                        done += response.status == 200

            start = time.monotonic()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return {"requests_per_second": done / (time.monotonic() - start), "concurrency": concurrency}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--requests", type=int, default=150, help="trace requests to replay")
    parser.add_argument("--speedup", type=float, default=2.5, help="compress the trace's time by this factor")
    parser.add_argument("--servers", type=int, default=50)
    parser.add_argument("--gpu-type", default="nvidia-h100-80gb")
    args = parser.parse_args()
    if not TRACE.exists():
        print(f"trace not found at {TRACE}", file=sys.stderr)
        return 1

    trace = load_trace(args.requests, args.speedup, max_prompt=7000)
    config = SimConfig(model_name="replay", gpu_type=args.gpu_type, context_length=8192)
    params = config.replica_params()
    mean_prompt = statistics.mean(p for _, p, _ in trace)
    mean_output = statistics.mean(o for _, _, o in trace)
    rate = len(trace) / trace[-1][0]
    results: dict = {
        "trace": {"requests": len(trace), "rps": rate, "mean_prompt_tokens": mean_prompt,
                  "mean_output_tokens": mean_output, "speedup": args.speedup,
                  "utilisation": rate / capacity_rps(params, mean_prompt, mean_output)},
    }
    # Idle first: measured after the replay, freed memory would be reused and hide the servers' cost.
    results["idle"] = asyncio.run(idle(args.servers, 5.0))
    results["virtual"] = replay_virtual(config, trace)
    results["analytic"] = {"ttft_p50": ttft_quantile(params, rate, mean_prompt, mean_output, 0.5),
                           "ttft_p95": ttft_quantile(params, rate, mean_prompt, mean_output, 0.95)}
    results["http"] = asyncio.run(replay_http(config, trace))
    results["ratios_http_over_virtual"] = {
        key: results["http"][key] / results["virtual"][key] for key in ("ttft_p50", "ttft_p95", "ttft_mean", "e2e_mean")
    }
    results["overhead"] = asyncio.run(overhead(3.0, 16))

    trace_info = results["trace"]
    print(f"trace: {trace_info['requests']} requests at {trace_info['rps']:.2f} rps "
          f"(prompt {mean_prompt:.0f}, output {mean_output:.0f} tokens; utilisation {trace_info['utilisation']:.2f} "
          f"of {args.gpu_type})")
    print(f"{'':12}{'TTFT p50':>10}{'TTFT p95':>10}{'TTFT mean':>11}{'e2e mean':>10}")
    for name in ("virtual", "http"):
        row = results[name]
        print(f"{name:12}{row['ttft_p50']:10.3f}{row['ttft_p95']:10.3f}{row['ttft_mean']:11.3f}{row['e2e_mean']:10.3f}")
    print(f"{'analytic':12}{results['analytic']['ttft_p50']:10.3f}{results['analytic']['ttft_p95']:10.3f}")
    ratios = results["ratios_http_over_virtual"]
    print(f"{'http/virtual':12}" + "".join(f"{ratios[key]:{width}.2f}" for key, width in
                                           (("ttft_p50", 10), ("ttft_p95", 10), ("ttft_mean", 11), ("e2e_mean", 10))))
    print(f"http replay: {results['http']['failures']} failures, process CPU {results['http']['process_cpu_share']:.0%}")
    idle_info = results["idle"]
    print(f"idle: {idle_info['servers']} servers started in {idle_info['start_seconds_total']:.2f}s, "
          f"idle CPU {idle_info['idle_cpu_share']:.2%} of a core, ~{idle_info['rss_mib_per_server']:.2f} MiB each")
    print(f"overhead: {results['overhead']['requests_per_second']:.0f} requests/s (4 tokens each, "
          f"{results['overhead']['concurrency']} concurrent clients, one process)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
