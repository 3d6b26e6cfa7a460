"""`digital-worker simulate`: replay a demand trace against a simulated fleet under any policy.

Module level imports argparse and stdlib only; the handler imports numpy/statsmodels lazily.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

POLICY_CHOICES = (
    "all", "forecast", "oracle", "reactive-hpa-50", "reactive-hpa-60", "reactive-hpa-70", "reactive-hpa-80",
    "reactive-hpa-90", "keda-inflight", "aibrix-kpa-linear", "dynamo-arima",
    # Analysis only (ours fed the true future demand per bucket): how much of ours is forecast error.
    "forecast-clairvoyant",
)
AZURE_CONV = "azure-llm-2023/AzureLLMInferenceTrace_conv.csv"


def default_data_dir() -> Path:
    """`$DIGITAL_WORKER_DATA`, else `<repo>/../shared/data`."""
    if os.environ.get("DIGITAL_WORKER_DATA"):
        return Path(os.environ["DIGITAL_WORKER_DATA"])
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "simulate",
        help="replay a demand trace against a simulated GPU fleet and compare autoscaling policies",
        description=(
            "Replay a demand series (NAB timestamp,value, scaled so its peak needs --peak-replicas) or an "
            "Azure LLM request trace (TIMESTAMP,ContextTokens,GeneratedTokens) against a simulated SGLang "
            "fleet with cold starts and queueing, under one policy or all of them (--policy all)."
        ),
    )
    parser.add_argument("--demand", required=True, metavar="FILE", help="NAB series or Azure LLM trace (CSV)")
    parser.add_argument("--peak-replicas", type=float, default=20.0, metavar="N",
                        help="scale demand so its peak needs N replicas (default 20)")
    parser.add_argument("--cold-start", type=float, default=180.0, metavar="SECONDS",
                        help="replica start to ready (default 180)")
    parser.add_argument("--slo-ttft", type=float, default=2.0, metavar="SECONDS", help="TTFT SLO (default 2)")
    parser.add_argument("--tick", type=float, default=30.0, metavar="SECONDS", help="autoscaler interval (default 30)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the burstiness sample (default 0)")
    parser.add_argument("--policy", default="forecast", choices=POLICY_CHOICES, help="policy to run (default forecast)")
    parser.add_argument("--days", type=float, default=7.0,
                        help="replay the last DAYS of a NAB series; the rest is forecaster history (default 7)")
    parser.add_argument("--step", type=float, default=None, metavar="SECONDS",
                        help="replay time resolution (default 10 for NAB series, 5 for request traces)")
    parser.add_argument("--quantile", type=float, default=0.9, help="forecast quantile for ours (default 0.9)")
    parser.add_argument("--gpu", default="nvidia-h100-80gb", help="GPU profile of the replicas")
    parser.add_argument("--sizes", metavar="FILE", default=None,
                        help="Azure LLM trace for request sizes and burstiness (default: the conversation trace "
                             "under ../shared/data)")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="draw demand, replicas and SLO misses over time")
    parser.set_defaults(handler=run_simulate)


def _check(args: argparse.Namespace):
    from digital_worker.cli import UserError

    demand = Path(args.demand)
    if not demand.is_file():
        raise UserError(f"--demand: no such file: {demand}")
    if args.peak_replicas <= 0:
        raise UserError("--peak-replicas must be positive")
    if args.cold_start < 0:
        raise UserError("--cold-start must not be negative")
    if args.slo_ttft <= 0:
        raise UserError("--slo-ttft must be positive")
    if args.tick <= 0:
        raise UserError("--tick must be positive")
    if args.days <= 0:
        raise UserError("--days must be positive")
    if args.step is not None and (args.step <= 0 or args.step > args.tick):
        raise UserError("--step must be positive and at most --tick")
    if not 0.5 <= args.quantile < 1.0:
        raise UserError("--quantile must be in [0.5, 1)")
    sizes = Path(args.sizes) if args.sizes else default_data_dir() / AZURE_CONV
    if args.sizes and not sizes.is_file():
        raise UserError(f"--sizes: no such file: {sizes}")
    return demand, sizes if sizes.is_file() else None


def run_simulate(args: argparse.Namespace) -> int:
    from digital_worker.cli import UserError

    demand, sizes_path = _check(args)
    import json

    from digital_worker.runtime.perfmodel import ReplicaParams, profile_for

    from . import simulator

    params = ReplicaParams(profile=profile_for(args.gpu), cold_start_seconds=args.cold_start)
    config = simulator.SimulationConfig(
        cold_start_seconds=args.cold_start, slo_ttft_seconds=args.slo_ttft, tick_seconds=args.tick,
        params=params, max_replicas=max(2, int(args.peak_replicas * 1.5 + 1)), forecast_quantile=args.quantile,
    )
    try:
        workload = simulator.load_workload(
            demand, peak_replicas=args.peak_replicas, config=config, sizes_trace=sizes_path,
            replay_days=args.days, step_seconds=args.step, seed=args.seed,
        )
        names = ["all"] if args.policy == "all" else [args.policy] + (["oracle"] if args.policy != "oracle" else [])
        results = simulator.compare(workload, names, config, keep_timeline=bool(args.plot))
    except ValueError as exc:
        raise UserError(str(exc).splitlines()[0]) from None
    oracle = next(r for r in results if r.policy == "oracle")
    rows = []
    for result in results:
        row = result.summary()
        row["gpu_hours_vs_oracle"] = round(result.gpu_hours / oracle.gpu_hours, 4) if oracle.gpu_hours else None
        rows.append(row)
    print(simulator.format_table(workload, config, rows))
    if args.json:
        if args.policy == "all":
            payload = rows
        else:
            payload = dict(next(r for r in rows if r["policy"] == args.policy))
            payload["oracle"] = next(r for r in rows if r["policy"] == "oracle")
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    if args.plot:
        simulator.plot(results, args.plot, title=f"{workload.name}: cold start {args.cold_start:g}s, "
                                                  f"TTFT SLO {args.slo_ttft:g}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m digital_worker.operator.autoscaling.cli simulate ...` before the CLI lists us."""
    import sys

    from digital_worker.cli import UserError

    parser = argparse.ArgumentParser(prog="digital-worker")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except UserError as exc:
        print(f"digital-worker: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
