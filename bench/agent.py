"""Node agent overhead: CPU, memory and scrape latency of the real agent process.

Runs `python -m digital_worker.agents agent` as a subprocess with the instant NVML fake (8 GPUs,
1 s collection interval) in three configurations: pod attribution through a real gRPC (grpcio)
PodResources server on a unix socket with the agent's own HTTP/2 client (the default, deployed
configuration: the headline figures), the same with the agent on grpcio, and no attribution. It
measures the agent process itself from /proc: CPU (utime+stime over wall time), RSS, and the
latency of /metrics scrapes over a keep-alive connection like Prometheus'.

    python bench/agent.py [--seconds 20] [--scrapes 500] [--json FILE]

Targets (issue 6): under 1% of one core, under 40 MB RSS, scrape p99 under 20 ms.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path

TARGETS = {"cpu_percent_of_one_core": 1.0, "rss_mb": 40.0, "scrape_p99_ms": 20.0}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
GPUS = 8


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def memory_mb(pid: int) -> tuple[float, float]:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


def start_kubelet(socket_path: str):
    """A real gRPC server speaking the kubelet's PodResources v1, one pod per GPU."""
    import grpc

    from digital_worker.agents import api_pb2, api_pb2_grpc

    pods = [api_pb2.PodResources(name=f"worker-{i}", namespace="team", containers=[api_pb2.ContainerResources(
        name="sglang", devices=[api_pb2.ContainerDevices(
            resource_name="nvidia.com/gpu", device_ids=[f"GPU-fa4e0000-0000-4000-8000-{i:012d}"])])])
        for i in range(GPUS)]

    class Lister(api_pb2_grpc.PodResourcesListerServicer):
        def List(self, request, context):
            return api_pb2.ListPodResourcesResponse(pod_resources=pods)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    api_pb2_grpc.add_PodResourcesListerServicer_to_server(Lister(), server)
    server.add_insecure_port(f"unix://{socket_path}")
    server.start()
    return server


def wait_ready(port: int, process: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"agent exited with {process.returncode}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/readyz")
            if connection.getresponse().status == 200:
                connection.close()
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError("agent not ready")


def agent_command() -> list[str]:
    """The deployed command (`digital-worker agent`, as the DaemonSet runs it) when installed."""
    script = shutil.which("digital-worker")
    if script:
        return [script, "agent"]
    return [sys.executable, "-m", "digital_worker.agents", "agent"]


def measure(pod_resources: str | None, seconds: float, scrapes: int, interval: float) -> dict:
    """`pod_resources`: None (no socket), "http2" (our client, the default) or "grpcio"."""
    workdir = tempfile.mkdtemp(prefix="dw-agent-bench-")
    socket_path = os.path.join(workdir, "kubelet.sock")
    kubelet = start_kubelet(socket_path) if pod_resources else None
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DW_")}
    env["DW_FAKE_NVML"] = json.dumps({"gpus": GPUS})
    argv = [*agent_command(), "--port", str(port),
            "--listen-address", "127.0.0.1", "--interval", str(interval), "--node-name", "bench-node",
            "--nvml-backend", "digital_worker.agents.nvml_fake", "--log-level", "WARNING",
            "--pod-resources-socket", socket_path if pod_resources else "",
            "--pod-resources-client", pod_resources or "http2", "--pod-resources-refresh", "10"]
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_ready(port, process)
        time.sleep(3.0)  # past start-up: imports, first collections, first PodResources List
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)

        def scrape() -> bytes:
            connection.request("GET", "/metrics", headers={"Accept-Encoding": "gzip"})
            response = connection.getresponse()
            body = response.read()
            if response.status != 200:
                raise RuntimeError(f"/metrics answered {response.status}")
            return body

        # CPU: the collection loop alone, with a scrape every 15 s as a default Prometheus would.
        rss_at_start, _ = memory_mb(process.pid)
        cpu_before, wall_before = cpu_seconds(process.pid), time.monotonic()
        next_scrape = wall_before
        while time.monotonic() - wall_before < seconds:
            if time.monotonic() >= next_scrape:
                scrape()
                next_scrape += 15.0
            time.sleep(0.05)
        cpu_percent = 100.0 * (cpu_seconds(process.pid) - cpu_before) / (time.monotonic() - wall_before)

        # Scrape latency: back to back over one keep-alive connection.
        latencies = []
        body = b""
        for _ in range(scrapes):
            started = time.perf_counter()
            body = scrape()
            latencies.append((time.perf_counter() - started) * 1000.0)
        connection.close()
        latencies.sort()
        rss, rss_peak = memory_mb(process.pid)
        text = body.decode()
        series = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
        attributed = text.count('pod="worker-')
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if kubelet is not None:
            kubelet.stop(grace=None).wait(5)
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "pod_resources_client": pod_resources,
        "cpu_percent_of_one_core": round(cpu_percent, 3),
        "rss_mb": round(rss, 1),
        "rss_peak_mb": round(rss_peak, 1),
        "rss_growth_mb": round(rss - rss_at_start, 2),  # over the CPU window and the scrape burst
        "scrape_p50_ms": round(statistics.median(latencies), 3),
        "scrape_p99_ms": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3),
        "scrape_max_ms": round(latencies[-1], 3),
        "metrics_bytes": len(body),
        "series": series,
        "series_with_pod_labels": attributed,
    }


def render_cost(repeat: int = 200) -> dict:
    """Our hand-written exposition vs prometheus_client rendering the same 8-GPU families."""
    from digital_worker.agents import nvml_fake
    from digital_worker.agents.collector import GpuCollector
    from digital_worker.agents.exposition import render

    nvml_fake.fake_configure(gpus=GPUS)
    collector = GpuCollector(nvml_fake, "bench-node")
    collector.start()
    collector.collect()
    started = time.perf_counter()
    for _ in range(repeat):
        collector.collect()
    collect_ms = (time.perf_counter() - started) * 1000 / repeat
    families = collector.families()
    started = time.perf_counter()
    for _ in range(repeat):
        render(collector.families())
    ours_ms = (time.perf_counter() - started) * 1000 / repeat
    result = {"collect_ms": round(collect_ms, 3), "families_and_render_ms": round(ours_ms, 3)}
    try:
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    except ImportError:
        return result
    import re

    label_pair = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
    # Label dicts prepared once: a prometheus_client collector would get them from the collector as is.
    prepared = [(family.name, family.help, family.type,
                 [(dict(label_pair.findall(labels)), value) for labels, value in family.samples])
                for family in families]

    class Families:
        def collect(self):
            for name, help_text, kind, samples in prepared:
                names = list(samples[0][0]) if samples else []
                family_class = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                metric = family_class(name, help_text, labels=names)
                for labels, value in samples:
                    metric.add_metric([labels.get(n, "") for n in names], value)
                yield metric

    registry = CollectorRegistry()
    registry.register(Families())
    started = time.perf_counter()
    for _ in range(repeat):
        generate_latest(registry)
    client_ms = (time.perf_counter() - started) * 1000 / repeat
    result["prometheus_client_render_ms"] = round(client_ms, 3)
    result["prometheus_client_over_ours"] = round(client_ms / ours_ms, 2) if ours_ms else None
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Node agent overhead benchmark")
    parser.add_argument("--seconds", type=float, default=20.0, help="CPU measurement window (default 20)")
    parser.add_argument("--scrapes", type=int, default=500, help="scrapes for the latency percentiles")
    parser.add_argument("--interval", type=float, default=1.0, help="agent collection interval (default 1 s)")
    parser.add_argument("--json", dest="json_path", help="write the results to this JSON file")
    args = parser.parse_args(argv)

    runs = {name: measure(name if name != "none" else None, args.seconds, args.scrapes, args.interval)
            for name in ("http2", "grpcio", "none")}
    headline = runs["http2"]
    rendering = render_cost()
    results = {
        # Headline figures: the deployed configuration (pod attribution, the agent's HTTP/2 client).
        "cpu_percent_of_one_core": headline["cpu_percent_of_one_core"],
        "rss_mb": headline["rss_mb"],
        "scrape_p99_ms": headline["scrape_p99_ms"],
        "targets": TARGETS,
        "within_targets": all(headline[key] < target for key, target in TARGETS.items()),
        "ratio_to_target": {key: round(headline[key] / target, 3) for key, target in TARGETS.items()},
        "rss_ratio_grpcio_over_http2": round(runs["grpcio"]["rss_mb"] / headline["rss_mb"], 2),
        "gpus": GPUS,
        "command": " ".join(agent_command()),
        "interval_seconds": args.interval,
        "runs": runs,
        "rendering": rendering,
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
    }
    rows = [("metric", "http2 (default)", "grpcio", "no PodResources", "target", "ratio")]
    for key, target in TARGETS.items():
        rows.append((key, *(f"{runs[name][key]:.3f}" for name in runs), f"< {target:g}",
                     f"{results['ratio_to_target'][key]:.2f}"))
    for key in ("rss_peak_mb", "rss_growth_mb", "scrape_p50_ms", "scrape_max_ms", "metrics_bytes", "series", "series_with_pod_labels"):
        rows.append((key, *(str(runs[name][key]) for name in runs), "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
    print(f"RSS grpcio / http2 client: {results['rss_ratio_grpcio_over_http2']}x")
    print(f"collection of {GPUS} GPUs: {rendering['collect_ms']} ms; families+render: "
          f"{rendering['families_and_render_ms']} ms"
          + (f"; prometheus_client render: {rendering['prometheus_client_render_ms']} ms "
             f"({rendering['prometheus_client_over_ours']}x ours)" if "prometheus_client_render_ms" in rendering else ""))
    print("within targets" if results["within_targets"] else "OUTSIDE TARGETS")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
