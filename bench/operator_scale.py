"""How the real operator scales: N DigitalWorkers on the emulated API, operator in its own process.

    python bench/operator_scale.py --count 1000 --json out.json

Measures, per DigitalWorker, the time from its creation to its first Deployment existing (p50, p99),
the time until every one has a status written by the operator for its generation
(`all_reconciled_seconds`), the operator process's peak RSS, and API requests per reconcile (from the
emulated API's own request counts, less the benchmark's requests). Three processes: the emulated API
(no pod simulation: this measures the operator), the operator (`digital-worker run`), and this driver.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import copy
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from digital_worker.operator import schema as api  # noqa: E402
from digital_worker.operator.kube import KubeClient  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def watch(url: str, on_event, stop: threading.Event) -> None:
    """Follow a watch stream (raw HTTP, one JSON event per line) until `stop`."""
    while not stop.is_set():
        try:
            with urllib.request.urlopen(url + "?watch=true", timeout=5) as response:
                for line in response:
                    if stop.is_set():
                        return
                    if line.strip():
                        on_event(json.loads(line))
        except Exception:
            time.sleep(0.1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--namespaces", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--json", default=None)
    parser.add_argument("--autoscaling", choices=("Off", "DryRun"), default="Off",
                        help="DryRun: every worker runs its autoscaling timer (no replicas: ticks hold)")
    parser.add_argument("--interval", type=int, default=20, help="spec.autoscaling.intervalSeconds")
    parser.add_argument("--steady-seconds", type=float, default=0.0,
                        help="after all are reconciled, measure the operator's CPU for this long")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="dw-scale-"))
    kubeconfig = workdir / "kubeconfig"
    stats = workdir / "stats.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cluster = subprocess.Popen([sys.executable, "-m", "digital_worker", "emulated-cluster", "--no-pods",
                                "--kubeconfig-out", str(kubeconfig), "--stats-out", str(stats)],
                               stdout=subprocess.PIPE, text=True, env=env, cwd="/")
    cluster.stdout.readline()
    client = KubeClient.from_kubeconfig(str(kubeconfig))
    server = client.api_client.configuration.host
    namespaces = [f"scale-{i}" for i in range(args.namespaces)]
    for namespace in namespaces:
        client.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})

    example = yaml.safe_load((REPO / "examples" / "digitalworker.yaml").read_text())
    example["spec"]["replicas"] = 1
    example["spec"]["autoscaling"] = {"mode": args.autoscaling, "intervalSeconds": args.interval}
    # The example carries a fallback model (a second Deployment per worker): the target is about workers.
    example["spec"].pop("fallback", None)
    created: dict[str, float] = {}
    first_deployment: dict[str, float] = {}
    reconciled: dict[str, float] = {}
    stop = threading.Event()

    def on_deployment(event):
        meta = event["object"]["metadata"]
        owner = (meta.get("labels") or {}).get(api.LABEL_INSTANCE)
        key = f"{meta['namespace']}/{owner}"
        first_deployment.setdefault(key, time.monotonic())

    def on_worker(event):
        body = event["object"]
        meta = body["metadata"]
        status = body.get("status") or {}
        if status.get("observedGeneration") == meta.get("generation") and status.get("currentRevision"):
            reconciled.setdefault(f"{meta['namespace']}/{meta['name']}", time.monotonic())

    threads = [threading.Thread(target=watch, args=(f"{server}/apis/apps/v1/deployments", on_deployment, stop), daemon=True),
               threading.Thread(target=watch, args=(f"{server}/apis/{api.API_VERSION}/{api.PLURAL}", on_worker, stop), daemon=True)]
    for thread in threads:
        thread.start()

    operator_env = {**env, "KUBECONFIG": str(kubeconfig), "DW_RESYNC_SECONDS": "600"}
    operator = subprocess.Popen([sys.executable, "-m", "digital_worker", "run", "--liveness", "http://127.0.0.1:0/healthz",
                                 "--metrics-port", "0"],
                                stdout=subprocess.DEVNULL, stderr=open(workdir / "operator.log", "w"),
                                env=operator_env, cwd="/")
    time.sleep(3)  # let the operator start watching before the burst
    profiler = None
    if os.environ.get("DW_BENCH_PYSPY"):  # optional: where does the operator's time go?
        target = cluster.pid if os.environ.get("DW_BENCH_PYSPY_TARGET") == "api" else operator.pid
        extra = os.environ.get("DW_BENCH_PYSPY_ARGS", "").split()  # e.g. --gil: only samples holding the GIL
        profiler = subprocess.Popen(["py-spy", "record", "--format", "raw", "--threads", "--nonblocking", *extra,
                                     "-o", os.environ["DW_BENCH_PYSPY"], "--pid", str(target)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def create(index: int) -> None:
        body = copy.deepcopy(example)
        namespace = namespaces[index % len(namespaces)]
        body["metadata"] = {"name": f"w{index}", "namespace": namespace}
        created[f"{namespace}/w{index}"] = time.monotonic()
        client.create(body)

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(create, range(args.count)))
    create_seconds = time.monotonic() - started
    deadline = started + args.timeout
    while time.monotonic() < deadline and len(reconciled) < args.count:
        time.sleep(0.2)
    all_reconciled = (max(reconciled.values()) - started) if len(reconciled) == args.count else float("nan")
    steady_cpu_share = float("nan")
    if args.steady_seconds > 0:
        time.sleep(min(30.0, args.steady_seconds))  # the last creations' finalizers and first ticks settle
        cpu_before, at = cpu_seconds(operator.pid), time.monotonic()
        time.sleep(args.steady_seconds)
        steady_cpu_share = (cpu_seconds(operator.pid) - cpu_before) / (time.monotonic() - at)
    rss = peak_rss_mb(operator.pid)
    operator_cpu, cluster_cpu = cpu_seconds(operator.pid), cpu_seconds(cluster.pid)
    stop.set()
    if profiler is not None:
        profiler.send_signal(signal.SIGINT)
        profiler.wait(30)
    operator.send_signal(signal.SIGTERM)
    try:
        operator.wait(30)
    except subprocess.TimeoutExpired:
        operator.kill()
    cluster.send_signal(signal.SIGTERM)
    cluster.wait(30)
    counts = json.loads(stats.read_text())
    # The driver's own requests: namespaces, the creations, the watches.
    own = counts.get("POST digitalworkers", 0) + counts.get("POST x-namespaces", 0)
    own += sum(v for k, v in counts.items() if k.endswith(" watch"))
    operator_requests = sum(counts.values()) - own
    latencies = [first_deployment[key] - created[key] for key in created if key in first_deployment]
    result = {
        "count": args.count,
        "autoscaling": args.autoscaling,
        "steady_operator_cpu_cores": round(steady_cpu_share, 3),
        "p50_seconds": round(percentile(latencies, 0.50), 3),
        "p99_seconds": round(percentile(latencies, 0.99), 3),
        "all_reconciled_seconds": round(all_reconciled, 2),
        "operator_rss_mb": round(rss, 1),
        "api_requests_per_reconcile": round(operator_requests / max(1, len(reconciled)), 2),
        "reconciled": len(reconciled),
        "with_deployment": len(latencies),
        "create_burst_seconds": round(create_seconds, 2),
        "operator_cpu_seconds": round(operator_cpu, 1),
        "emulated_api_cpu_seconds": round(cluster_cpu, 1),
        "request_counts": counts,
    }
    rows = [("count", result["count"]), ("create → first Deployment p50 (s)", result["p50_seconds"]),
            ("create → first Deployment p99 (s)", result["p99_seconds"]),
            ("all reconciled (s)", result["all_reconciled_seconds"]), ("operator peak RSS (MB)", result["operator_rss_mb"]),
            ("API requests per reconcile", result["api_requests_per_reconcile"]),
            ("creation burst (s)", result["create_burst_seconds"]),
            ("operator CPU (s)", result["operator_cpu_seconds"]),
            ("emulated API CPU (s)", result["emulated_api_cpu_seconds"]),
            (f"steady operator CPU (cores), autoscaling {args.autoscaling}", result["steady_operator_cpu_cores"])]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if len(reconciled) == args.count else 1


if __name__ == "__main__":
    raise SystemExit(main())
