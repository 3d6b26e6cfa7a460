"""How fast does rollout analysis catch a bad canary, and how much traffic does it serve meanwhile?

Real parts: a real Prometheus (Debian's package) scraping a prometheus_client server every second
that exposes SGLang-named metrics per revision; the PrometheusProvider, `measure_run` and
`evaluate` exactly as the operator calls them; the traffic routers' effective weights. Requests
replay the Azure LLM inference trace 2023 (conversation; Splitwise, ISCA'24, CC-BY): its
inter-arrival shape scaled to `--rps`, its prompt/output sizes driving latencies from the shared
SGLang performance model (runtime/perfmodel.py, H100 profile).

Per scenario the canary is bad from its first request (5% aborted requests, or 2x TTFT), or
healthy (control). Routing: replica ratio (a request lands on a uniformly chosen pod, so the canary
gets canary/(stable+canary) of requests) or Gateway API (exact weight). When the analysis aborts,
traffic goes back to stable at once (rollback of routing; pod scale-down is the strategy's job).

Reported per scenario: rollback_seconds (first bad request -> abort decision), the ratio to the
analysis interval, bad_revision_request_share and its ratio to the configured canary weight.

    python bench/rollout_analysis.py [--rps 200] [--interval 3] [--window 6] [--json out.json]

This measures the analysis half of the issue's `bench/rollout.py` targets (rollback within 2
analysis intervals; bad revision under 1.5x its configured weight); the full one adds the
operator's reconcile and pod scale-down on the simulated fleet.
"""
from __future__ import annotations

import argparse
import csv
import http.server
import json
import random
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from digital_worker.operator.analysis import Action, AnalysisSpec, AnalysisState, evaluate, measure_run, next_run_at
from digital_worker.operator.devprom import PrometheusLauncher, PrometheusUnavailable
from digital_worker.operator.metric_providers import PrometheusProvider
from digital_worker.operator.traffic import GatewayApiRouter, ParentRef, ReplicaRatioRouter
from digital_worker.runtime.perfmodel import (
    ReplicaParams,
    capacity_rps,
    decode_step_seconds,
    profile_for,
    ttft_quantile,
)
from digital_worker.runtime.sglang_metrics import E2E_BUCKETS, INTER_TOKEN_BUCKETS, TTFT_BUCKETS

REPO = Path(__file__).resolve().parents[1]
TRACE = REPO.parent / "shared" / "data" / "azure-llm-2023" / "AzureLLMInferenceTrace_conv.csv"
LABELS = ["model_name", "namespace", "digitalworker_io_instance", "digitalworker_io_revision"]
# A decode batch typical of a moderately loaded replica, for the latency model.
TYPICAL_BATCH = 16


@dataclass(frozen=True)
class Scenario:
    name: str
    router: str  # "replicaRatio" or "gatewayAPI"
    total_replicas: int
    canary_weight: int
    fault: str  # "errors" (5% aborted), "ttft2x", or "none"


SCENARIOS = (
    Scenario("errors-5pct/ratio-10x10%", "replicaRatio", 10, 10, "errors"),
    Scenario("ttft-2x/ratio-10x10%", "replicaRatio", 10, 10, "ttft2x"),
    Scenario("errors-5pct/gateway-10%", "gatewayAPI", 4, 10, "errors"),
    Scenario("ttft-2x/gateway-10%", "gatewayAPI", 4, 10, "ttft2x"),
    Scenario("ttft-2x/ratio-4x25%", "replicaRatio", 4, 25, "ttft2x"),
    Scenario("errors-5pct/ratio-3x10%", "replicaRatio", 3, 10, "errors"),
    Scenario("healthy/ratio-10x10%", "replicaRatio", 10, 10, "none"),
)


# ---------------------------------------------------------------- trace and latency model


def load_trace(limit: int = 5000) -> list[tuple[float, int, int]]:
    """(seconds since the first request, prompt tokens, output tokens) from the Azure trace."""
    rows = []
    with TRACE.open() as handle:
        for row in csv.DictReader(handle):
            stamp = datetime.fromisoformat(row["TIMESTAMP"][:26])
            rows.append((stamp.timestamp(), int(row["ContextTokens"]), int(row["GeneratedTokens"])))
            if len(rows) >= limit:
                break
    start = rows[0][0]
    return [(t - start, prompt, output) for t, prompt, output in rows]


class LatencyModel:
    """TTFT and ITL of requests on an H100 replica at 70% of its capacity, from the shared SGLang
    performance model: TTFT is drawn from the model's TTFT distribution (inverse CDF over a
    quantile table, queueing included) and shifted by the request's own prompt size."""

    LOAD = 0.7

    def __init__(self, trace: list[tuple[float, int, int]], rng: random.Random) -> None:
        self.params = ReplicaParams(profile=profile_for("nvidia-h100-80gb"))
        self.rng = rng
        self.mean_prompt = sum(p for _, p, _ in trace) / len(trace)
        self.mean_output = sum(o for _, _, o in trace) / len(trace)
        rps = capacity_rps(self.params, self.mean_prompt, self.mean_output) * self.LOAD
        self.ttft_table = [ttft_quantile(self.params, rps, self.mean_prompt, self.mean_output, (i + 0.5) / 100)
                           for i in range(100)]
        self.step = decode_step_seconds(self.params, TYPICAL_BATCH)

    def ttft(self, prompt_tokens: int) -> float:
        own_prefill = (prompt_tokens - self.mean_prompt) / self.params.profile.prefill_tokens_per_second
        return max(self.step, self.rng.choice(self.ttft_table) + own_prefill)

    def itl(self) -> float:
        return self.step


# ---------------------------------------------------------------- metrics server and Prometheus


class RevisionMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("sglang:num_requests_total", "requests", LABELS, registry=r)
        self.aborted = Counter("sglang:num_aborted_requests_total", "aborted", LABELS, registry=r)
        self.ttft = Histogram("sglang:time_to_first_token_seconds", "ttft", LABELS, buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("sglang:inter_token_latency_seconds", "itl", LABELS, buckets=INTER_TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("sglang:e2e_request_latency_seconds", "e2e", LABELS, buckets=E2E_BUCKETS, registry=r)
        self.queue = Gauge("sglang:num_queue_reqs", "queue", LABELS, registry=r)

    @staticmethod
    def labels(revision: str) -> dict[str, str]:
        return {"model_name": "bench", "namespace": "bench", "digitalworker_io_instance": "dw",
                "digitalworker_io_revision": revision}

    def declare(self, revision: str) -> None:
        labels = self.labels(revision)
        for metric in (self.requests, self.aborted, self.ttft, self.itl, self.e2e):
            metric.labels(**labels)
        self.queue.labels(**labels).set(0)

    def record(self, revision: str, ttft: float, itl: float, output_tokens: int, aborted: bool) -> None:
        labels = self.labels(revision)
        if aborted:  # as SGLang counts a client gone: aborted, not finished
            self.aborted.labels(**labels).inc()
            return
        self.requests.labels(**labels).inc()
        self.ttft.labels(**labels).observe(ttft)
        self.itl.labels(**labels).observe(itl)
        self.e2e.labels(**labels).observe(ttft + itl * max(0, output_tokens - 1))


def serve(registry: CollectorRegistry) -> http.server.ThreadingHTTPServer:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = generate_latest(registry)
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# ---------------------------------------------------------------- one scenario


def canary_probability(scenario: Scenario) -> float:
    """Share of requests the canary gets: exact for the Gateway API, replica share otherwise."""
    if scenario.router == "gatewayAPI":
        router = GatewayApiRouter("r", "bench", ParentRef("gw"), "stable", "canary")
    else:
        router = ReplicaRatioRouter(max_surge=1, max_unavailable=0)
    return router.plan(scenario.total_replicas, scenario.canary_weight).effective_weight / 100


def run_scenario(index: int, scenario: Scenario, metrics: RevisionMetrics, provider: PrometheusProvider,
                 spec: AnalysisSpec, trace: list, rps: float, seed: int) -> dict:
    rng = random.Random(seed + index)
    model = LatencyModel(trace, rng)
    stable_rev, canary_rev = f"s{index}-stable", f"s{index}-canary"
    metrics.declare(stable_rev)
    metrics.declare(canary_rev)
    probability = canary_probability(scenario)
    # Trace arrivals, compressed to the target mean rate.
    trace_rate = len(trace) / max(trace[-1][0], 1e-9)
    scale = trace_rate / rps
    # The stable serves alone for one window first, so the relative checks have a baseline.
    warmup = spec.window_seconds
    counts = {"stable": 0, "canary": 0}
    first_bad = None
    decision = None
    decided_at = None
    state = None
    errors_every = 20  # 5% of the bad canary's requests are aborted
    canary_seen = 0
    start = time.monotonic()
    cursor = 0
    trace_offset = trace[0][0]
    deadline_after_canary = spec.interval_seconds * 8 + spec.window_seconds
    while True:
        now = time.monotonic() - start
        if first_bad is not None and now - first_bad > deadline_after_canary:
            decision = "Timeout"
            break
        # Replay every request due by now.
        while cursor < len(trace) and (trace[cursor][0] - trace_offset) * scale <= now:
            _, prompt, output = trace[cursor]
            cursor += 1
            to_canary = now >= warmup and rng.random() < probability
            if to_canary:
                canary_seen += 1
                if first_bad is None:
                    first_bad = now
                    state = AnalysisState.start(now)
                ttft = model.ttft(prompt) * (2.0 if scenario.fault == "ttft2x" else 1.0)
                aborted = scenario.fault == "errors" and canary_seen % errors_every == 0
                metrics.record(canary_rev, ttft, model.itl(), output, aborted)
                counts["canary"] += 1
            else:
                metrics.record(stable_rev, model.ttft(prompt), model.itl(), output, False)
                if first_bad is not None:
                    counts["stable"] += 1
        if cursor >= len(trace):
            trace_offset -= trace[-1][0]  # loop the trace
            cursor = 0
        if state is not None and now >= next_run_at(state, spec):
            run = measure_run(provider, spec, MetricsMatchers.of(canary_rev), MetricsMatchers.of(stable_rev))
            result, state = evaluate(state, run, time.monotonic() - start, spec)
            if result.action in (Action.ABORT, Action.PASS, Action.PAUSE):
                decision, decided_at = result.action.value, time.monotonic() - start
                break
        time.sleep(0.005)
    served = counts["canary"] + counts["stable"]
    share = counts["canary"] / served if served else 0.0
    rollback = (decided_at - first_bad) if decision == "Abort" else None
    return {
        "scenario": scenario.name,
        "router": scenario.router,
        "fault": scenario.fault,
        "total_replicas": scenario.total_replicas,
        "configured_canary_weight": scenario.canary_weight,
        "effective_canary_weight": round(probability * 100, 2),
        "decision": decision,
        "runs": state.runs if state else 0,
        "rollback_seconds": round(rollback, 2) if rollback is not None else None,
        "analysis_interval_seconds": spec.interval_seconds,
        "rollback_in_intervals": round(rollback / spec.interval_seconds, 2) if rollback is not None else None,
        "bad_revision_request_share": round(share, 4) if scenario.fault != "none" else None,
        "share_over_configured_weight": (round(share / (scenario.canary_weight / 100), 2)
                                         if scenario.fault != "none" else None),
        "requests_during_rollout": served,
        "failed_checks": [c.name for c in (state.checks if state else ()) if c.verdict.value == "Failed"],
        "last_checks": {c.name: {"verdict": c.verdict.value, "value": c.value, "baseline": c.baseline}
                        for c in (state.checks if state else ())},
    }


class MetricsMatchers:
    @staticmethod
    def of(revision: str) -> dict[str, str]:
        return {"namespace": "bench", "digitalworker_io_instance": "dw", "digitalworker_io_revision": revision}


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summarize(results: list[dict]) -> list[dict]:
    """Per scenario over its repeats: decisions, mean and max rollback and bad-revision share."""
    by_name: dict[str, list[dict]] = {}
    for result in results:
        by_name.setdefault(result["scenario"], []).append(result)
    summary = []
    for name, runs in by_name.items():
        def mean(key: str, runs: list[dict] = runs) -> float | None:
            found = [run[key] for run in runs if run[key] is not None]
            return round(sum(found) / len(found), 3) if found else None

        def maximum(key: str, runs: list[dict] = runs) -> float | None:
            found = [run[key] for run in runs if run[key] is not None]
            return max(found) if found else None

        decisions = sorted({run["decision"] for run in runs})
        summary.append({
            "scenario": name,
            "decisions": " ".join(f"{d} {sum(run['decision'] == d for run in runs)}/{len(runs)}" for d in decisions),
            "configured_canary_weight": runs[0]["configured_canary_weight"],
            "effective_canary_weight": runs[0]["effective_canary_weight"],
            "analysis_interval_seconds": runs[0]["analysis_interval_seconds"],
            "rollback_seconds_mean": mean("rollback_seconds"),
            "rollback_in_intervals_mean": mean("rollback_in_intervals"),
            "rollback_in_intervals_max": maximum("rollback_in_intervals"),
            "bad_revision_request_share_mean": mean("bad_revision_request_share"),
            "share_over_configured_weight_mean": mean("share_over_configured_weight"),
            "share_over_configured_weight_max": maximum("share_over_configured_weight"),
        })
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rps", type=float, default=200.0, help="mean request rate replayed (default 200)")
    parser.add_argument("--interval", type=float, default=3.0, help="analysis intervalSeconds (default 3)")
    parser.add_argument("--window", type=float, default=6.0, help="analysis windowSeconds (default 6)")
    parser.add_argument("--min-requests", type=int, default=10)
    parser.add_argument("--confidence", type=float, default=None,
                        help="errorRateConfidence: judge the error rate by a Wilson bound at this level")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=1, help="runs per scenario (different seeds)")
    parser.add_argument("--only", help="run scenarios whose name contains this text")
    parser.add_argument("--json", type=Path, help="write results as JSON to this file")
    args = parser.parse_args(argv)

    spec = AnalysisSpec.from_dict({
        "windowSeconds": args.window, "intervalSeconds": args.interval, "minRequests": args.min_requests,
        "maxErrorRate": 0.02, "maxTTFTP95Ratio": 1.5, "maxITLP95Ratio": 1.5,
        "failureLimit": 1, "inconclusiveLimit": 3, "successfulRuns": 2,
        **({"errorRateConfidence": args.confidence} if args.confidence else {}),
    })
    trace = load_trace()
    metrics = RevisionMetrics()
    server = serve(metrics.registry)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-rollout-analysis-") as workdir:
        prometheus = PrometheusLauncher(Path(workdir))  # dev mode's: 1 s scrapes on loopback
        prometheus.set_targets("sglang", [f"127.0.0.1:{server.server_port}"])
        try:
            try:
                prometheus.start()
            except PrometheusUnavailable as exc:
                sys.exit(str(exc))
            provider = PrometheusProvider(prometheus.url, timeout=3)
            scenarios = [s for s in SCENARIOS if not args.only or args.only in s.name]
            for repeat in range(args.repeat):
                for position, scenario in enumerate(scenarios):
                    index = repeat * len(scenarios) + position
                    results.append(run_scenario(index, scenario, metrics, provider, spec, trace, args.rps, args.seed))
                    print(f"  done: {scenario.name} #{repeat + 1}: {results[-1]['decision']}", file=sys.stderr)
            # What a stopped Prometheus costs one analysis run (it must be an error, not a hang).
            prometheus.stop()
            started = time.monotonic()
            run = measure_run(provider, spec, MetricsMatchers.of("x"), MetricsMatchers.of("y"))
            unreachable_seconds = time.monotonic() - started
            unreachable_all_errors = all(m.error for m in run.canary.values())
        finally:
            prometheus.stop()
            server.shutdown()
            server.server_close()

    summary = summarize(results)
    header = (f"{'scenario':28} {'decisions':>11} {'eff w%':>7} {'rollback s':>10} {'/interval':>15} "
              f"{'bad share':>9} {'/weight':>13}")
    print(header)
    print("-" * len(header))
    for row in summary:
        rollback = _fmt(row["rollback_seconds_mean"])
        intervals = f"{_fmt(row['rollback_in_intervals_mean'])} (max {_fmt(row['rollback_in_intervals_max'])})"
        share = _fmt(row["bad_revision_request_share_mean"], 3)
        over = (f"{_fmt(row['share_over_configured_weight_mean'])} "
                f"(max {_fmt(row['share_over_configured_weight_max'])})")
        print(f"{row['scenario']:28} {row['decisions']:>11} {row['effective_canary_weight']:>7} {rollback:>10} "
              f"{intervals:>15} {share:>9} {over:>13}")
    confidence = f", errorRateConfidence {args.confidence}" if args.confidence else ""
    print(f"\nanalysis: interval {args.interval}s, window {args.window}s, minRequests {args.min_requests}{confidence}, "
          f"{args.rps} req/s replayed from the Azure LLM trace; a stopped Prometheus cost one run "
          f"{unreachable_seconds:.2f}s (all errors: {unreachable_all_errors})")
    if args.json:
        args.json.write_text(json.dumps({
            "spec": spec.to_dict(), "rps": args.rps, "repeat": args.repeat, "summary": summary, "scenarios": results,
            "prometheus_unreachable_run_seconds": round(unreachable_seconds, 3),
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
