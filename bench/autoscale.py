"""Autoscaling policies side by side on replayed real traffic (issue 5's benchmark).

For each trace under ../shared/data (NYC taxi, AWS ELB, Twitter volume, Azure LLM conversation)
and each cold start (180 s, 600 s), replay the demand against a simulated SGLang fleet (H100
profile of runtime/perfmodel.py, TTFT SLO 2 s, peak = 20 replicas) under every policy, and print
GPU-hours relative to the oracle and SLO attainment. Then check the targets:
ours >= 99% attainment with <= 1.10 x oracle GPU-hours, and <= 0.85 x the GPU-hours of the
cheapest reactive setting that reaches the same attainment.

    python bench/autoscale.py            # ~7 simulated days per NAB trace
    python bench/autoscale.py --quick    # 2 days per NAB trace
    python bench/autoscale.py --json results.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from digital_worker.operator.autoscaling import simulator
from digital_worker.operator.autoscaling.cli import default_data_dir

TRACES = (
    ("nyc_taxi", "nab/nyc_taxi.csv"),
    ("aws_elb", "nab/elb_request_count_8c0756.csv"),
    ("twitter_amzn", "nab/Twitter_volume_AMZN.csv"),
    ("azure_conv", "azure-llm-2023/AzureLLMInferenceTrace_conv.csv"),
)
COLD_STARTS = (180.0, 600.0)
REACTIVE_PREFIXES = ("reactive", "keda", "aibrix")
FRONTIER = ("forecast-q80", "forecast-q95", "forecast-q99")
# Ours with the true future demand per forecast bucket: splits ours' distance from the oracle into
# the control loop's share (this one's) and the forecast's (the rest).
CLAIRVOYANT = "forecast-clairvoyant"


def best_reactive(rows: list[dict], attainment: float) -> dict | None:
    """The cheapest reactive-family setting whose attainment is at least `attainment`."""
    candidates = [r for r in rows if r["policy"].startswith(REACTIVE_PREFIXES) and r["slo_attainment"] >= attainment]
    return min(candidates, key=lambda r: r["gpu_hours"]) if candidates else None


def frontier(rows: list[dict]) -> list[dict]:
    """Each of our settings against the cheapest reactive-family setting at least as good."""
    out = []
    for row in rows:
        if not row["policy"].startswith("forecast") or row["policy"] == CLAIRVOYANT:
            continue
        rival = best_reactive(rows, row["slo_attainment"])
        out.append({"policy": row["policy"], "attainment": row["slo_attainment"],
                    "vs_oracle": row["gpu_hours_vs_oracle"], "rival": rival["policy"] if rival else None,
                    "vs_rival": round(row["gpu_hours"] / rival["gpu_hours"], 4) if rival else None})
    return out


def run(args: argparse.Namespace) -> list[dict]:
    data = Path(args.data) if args.data else default_data_dir()
    sizes_trace = data / "azure-llm-2023/AzureLLMInferenceTrace_conv.csv"
    days = 2.0 if args.quick else args.days
    scenarios = []
    for label, relative in TRACES:
        path = data / relative
        if not path.is_file():
            print(f"skipping {label}: {path} not found", file=sys.stderr)
            continue
        for cold_start in COLD_STARTS:
            config = simulator.SimulationConfig(
                cold_start_seconds=cold_start, slo_ttft_seconds=args.slo_ttft, tick_seconds=args.tick,
                max_replicas=int(args.peak_replicas * 1.5) + 1,
            )
            workload = simulator.load_workload(path, peak_replicas=args.peak_replicas, config=config,
                                               sizes_trace=sizes_trace, replay_days=days, seed=args.seed)
            started = time.perf_counter()
            names = list(simulator.POLICY_NAMES) + (list(FRONTIER) + [CLAIRVOYANT] if args.frontier else [])
            results = simulator.compare(workload, names, config)
            oracle = next(r for r in results if r.policy == "oracle")
            rows = []
            for result in results:
                row = result.summary()
                row["gpu_hours_vs_oracle"] = round(result.gpu_hours / oracle.gpu_hours, 4)
                rows.append(row)
            ours = next(r for r in rows if r["policy"] == "forecast")
            rival = best_reactive(rows, ours["slo_attainment"])
            scenario = {
                "trace": label,
                "cold_start_seconds": cold_start,
                "replayed_hours": round(workload.duration_seconds / 3600.0, 2),
                "wall_seconds": round(time.perf_counter() - started, 1),
                "results": rows,
                "ours_vs_oracle": ours["gpu_hours_vs_oracle"],
                "ours_attainment": ours["slo_attainment"],
                "best_reactive_at_same_attainment": rival["policy"] if rival else None,
                "ours_vs_best_reactive": round(ours["gpu_hours"] / rival["gpu_hours"], 4) if rival else None,
            }
            if args.frontier:
                scenario["frontier"] = frontier(rows)
            scenarios.append(scenario)
            print(f"  {label} cold start {cold_start:g}s: {scenario['wall_seconds']}s", file=sys.stderr)
    return scenarios


def print_table(scenarios: list[dict]) -> None:
    policies = [r["policy"] for r in scenarios[0]["results"]]
    headers = [f"{s['trace']}/{int(s['cold_start_seconds'])}s" for s in scenarios]
    width = max(16, max(len(h) for h in headers) + 1)
    print("GPU-hours relative to the oracle / SLO attainment (TTFT <= SLO)")
    print(f"{'policy':<19}" + "".join(f"{h:>{width}}" for h in headers))
    for policy in policies:
        cells = []
        for scenario in scenarios:
            row = next(r for r in scenario["results"] if r["policy"] == policy)
            cells.append(f"{row['gpu_hours_vs_oracle']:.2f}x/{row['slo_attainment'] * 100:.2f}%")
        print(f"{policy:<19}" + "".join(f"{c:>{width}}" for c in cells))
    if "frontier" in scenarios[0]:
        print("\nour settings against the cheapest reactive-family setting with at least the same attainment")
        for scenario in scenarios:
            cells = []
            for point in scenario["frontier"]:
                versus = f"{point['vs_rival']:.2f}x {point['rival']}" if point["rival"] else "dominates"
                cells.append(f"{point['policy'][len('forecast'):] or '-q90'}: {point['vs_oracle']:.2f}x/"
                             f"{point['attainment'] * 100:.2f}% ({versus})")
            print(f"  {scenario['trace']:<13} {int(scenario['cold_start_seconds']):>4}s  " + "  ".join(cells))
    if any(r["policy"] == CLAIRVOYANT for r in scenarios[0]["results"]):
        print("\nwhere ours loses against the oracle: the control loop (ours fed the true demand per bucket)"
              " vs the forecast (the rest)")
        for scenario in scenarios:
            ours = next(r for r in scenario["results"] if r["policy"] == "forecast")
            known = next(r for r in scenario["results"] if r["policy"] == CLAIRVOYANT)
            print(f"  {scenario['trace']:<13} {int(scenario['cold_start_seconds']):>4}s  "
                  f"clairvoyant {known['gpu_hours_vs_oracle']:.2f}x/{known['slo_attainment'] * 100:.2f}%  "
                  f"ours {ours['gpu_hours_vs_oracle']:.2f}x/{ours['slo_attainment'] * 100:.2f}%")
    print()
    print("targets: ours >= 99% attainment, <= 1.10x oracle, <= 0.85x best reactive at the same attainment")
    for scenario in scenarios:
        attainment_ok = scenario["ours_attainment"] >= 0.99
        oracle_ok = scenario["ours_vs_oracle"] <= 1.10
        ratio = scenario["ours_vs_best_reactive"]
        reactive_ok = ratio is not None and ratio <= 0.85
        if ratio is not None:
            versus = (f"vs best reactive at that attainment ({scenario['best_reactive_at_same_attainment']}) "
                      f"{ratio:.3f} [{'ok' if reactive_ok else 'MISS'}]")
            if not reactive_ok:
                # What the target asks in the oracle's units: below 1.0 means beating perfect foresight.
                rival = scenario["ours_vs_oracle"] / ratio
                versus += f" (needs <= {0.85 * rival:.2f}x oracle)"
        else:
            top = max((r for r in scenario["results"] if r["policy"].startswith(REACTIVE_PREFIXES)),
                      key=lambda r: r["slo_attainment"])
            versus = (f"no reactive setting reaches it (best: {top['policy']} {top['slo_attainment'] * 100:.2f}% "
                      f"at {top['gpu_hours_vs_oracle']:.2f}x)")
        print(
            f"  {scenario['trace']:<13} {int(scenario['cold_start_seconds']):>4}s: "
            f"attainment {scenario['ours_attainment'] * 100:6.2f}% [{'ok' if attainment_ok else 'MISS'}]  "
            f"vs oracle {scenario['ours_vs_oracle']:.3f} [{'ok' if oracle_ok else 'MISS'}]  {versus}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 simulated days per NAB trace")
    parser.add_argument("--days", type=float, default=7.0, help="simulated days per NAB trace (default 7)")
    parser.add_argument("--peak-replicas", type=float, default=20.0)
    parser.add_argument("--slo-ttft", type=float, default=2.0)
    parser.add_argument("--tick", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", help="data folder (default ../shared/data)")
    parser.add_argument("--json", metavar="FILE", help="write every result as JSON")
    parser.add_argument("--frontier", action="store_true",
                        help="also run ours at forecast quantiles 0.8, 0.95 and 0.99 and compare cost/SLO frontiers")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    scenarios = run(args)
    if not scenarios:
        print("no traces found", file=sys.stderr)
        return 1
    print_table(scenarios)
    print(f"\nwall time {time.perf_counter() - started:.0f}s")
    if args.json:
        Path(args.json).write_text(json.dumps(scenarios, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
