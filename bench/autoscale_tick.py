"""One autoscaler tick for many DigitalWorkers, forecasting from cached fits (issue 5's scale target).

Target: one tick for 1,000 DigitalWorkers in under 5 s of one core. Each worker has its own metric
history (in-memory source: the embedded default's path, so the figure is the autoscaler's own cost,
not Prometheus'), its own incremental forecaster state, and policy state; fits are shared among
look-alike workers (fitted once up front, as a restart would restore them).

    python bench/autoscale_tick.py [--workers 1000] [--json FILE]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import resource
import sys
import time
from pathlib import Path

from digital_worker.operator.autoscaling.controller import Autoscaler
from digital_worker.operator.autoscaling.forecast import fit_forecaster
from digital_worker.operator.autoscaling.history import (
    GENERATION_TOKEN_RATE,
    KV_CACHE_USAGE,
    PROMPT_TOKEN_RATE,
    QUEUE_LENGTH,
    REQUEST_RATE,
    TTFT_P95,
)
from digital_worker.operator.autoscaling.metrics import InMemoryMetricsSource

BUCKET = 300.0
SPEC = {"mode": "Auto", "minReplicas": 1, "maxReplicas": 40, "targetRequestsPerReplica": 8.0,
        "coldStartSeconds": 180, "intervalSeconds": 20, "forecast": {"quantile": 0.9}}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def token_rates(rate: float, rng: random.Random) -> dict:
    """Prompt and generated tokens/s of requests around the Azure conversation trace's mean sizes."""
    return {PROMPT_TOKEN_RATE: rate * 1155.0 * rng.uniform(0.85, 1.15),
            GENERATION_TOKEN_RATE: rate * 211.0 * rng.uniform(0.85, 1.15)}


def demand(shape: int, t: float) -> float:
    return 40 + 30 * math.sin(2 * math.pi * (t / 86400 + shape / 10))


async def run(workers: int, shapes: int, seed: int) -> dict:
    rng = random.Random(seed)
    now = 1_700_000_000.0
    source = InMemoryMetricsSource(retention_seconds=4 * 86400)
    history_times = [now - 3 * 86400 + i * BUCKET for i in range(int(3 * 86400 / BUCKET))]
    fits = []
    fit_started = time.perf_counter()
    for shape in range(shapes):
        values = [demand(shape, t) * rng.uniform(0.95, 1.05) for t in history_times]
        fits.append((fit_forecaster(values, BUCKET, 0.9, 2), values))
    fit_wall = time.perf_counter() - fit_started
    autoscaler = Autoscaler(bucket_seconds=BUCKET)
    keys = [f"team-{i % 50}/worker-{i}" for i in range(workers)]
    for index, key in enumerate(keys):
        model, values = fits[index % shapes]
        autoscaler.install_fit(key, model, history_times, values, fitted_at=now)
        for step in range(15, 0, -1):  # the last five minutes at 20 s
            t = now - step * 20
            rate = demand(index % shapes, t) * rng.uniform(0.9, 1.1)
            source.record(key, t, {REQUEST_RATE: rate, **token_rates(rate, rng),
                                   QUEUE_LENGTH: rng.uniform(0, 3), KV_CACHE_USAGE: rng.uniform(0.1, 0.6),
                                   TTFT_P95: rng.uniform(0.2, 0.8)})
    timings = []
    # Three ordinary ticks, then one where a new forecast bucket is due (demand history re-read).
    for tick, offset in enumerate((0.0, 20.0, 40.0, BUCKET + 20.0)):
        tick_now = now + offset
        for index, key in enumerate(keys):
            rate = demand(index % shapes, tick_now)
            source.record(key, tick_now, {REQUEST_RATE: rate, **token_rates(rate, rng), QUEUE_LENGTH: 1.0,
                                          KV_CACHE_USAGE: 0.4, TTFT_P95: 0.5})
        cpu_before, wall_before = cpu_seconds(), time.perf_counter()
        results = await asyncio.gather(*(autoscaler.tick(key, SPEC, 6, 6, tick_now, source) for key in keys))
        timings.append({"tick": tick, "wall_seconds": time.perf_counter() - wall_before,
                        "cpu_seconds": cpu_seconds() - cpu_before,
                        "with_forecast": sum(1 for _, status in results if "forecast" in status)})
    autoscaler.close()
    return {"workers": workers, "shared_fits": shapes, "fit_wall_seconds": round(fit_wall, 2), "ticks": timings}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument("--shapes", type=int, default=10, help="distinct demand shapes (one fit each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core, as the target says
    result = asyncio.run(run(args.workers, args.shapes, args.seed))
    print(f"{'tick':>4} {'workers':>8} {'wall s':>8} {'cpu s':>8} {'per worker ms':>14} {'forecasts':>10}")
    for timing in result["ticks"]:
        print(f"{timing['tick']:>4} {result['workers']:>8} {timing['wall_seconds']:>8.3f} {timing['cpu_seconds']:>8.3f} "
              f"{timing['cpu_seconds'] / result['workers'] * 1000:>14.3f} {timing['with_forecast']:>10}")
    worst = max(t["cpu_seconds"] for t in result["ticks"])
    print(f"target: one tick for {result['workers']} workers < 5 s of one core: worst {worst:.2f} s "
          f"[{'ok' if worst < 5 else 'MISS'}]")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
