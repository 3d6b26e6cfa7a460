"""Autoscaling from a real Prometheus: kopf operator + emulated API + simulated SGLang replicas that a
real Prometheus scrapes (targets kept in sync with the pods, labelled like the platform's scrape
configs do) + a load generator ramping up. Auto follows the ramp step by step while a DryRun twin
under the same ramp decides the same way and changes nothing; with Prometheus gone the autoscaler
holds and says why."""
from __future__ import annotations

import concurrent.futures
import json
import math
import threading
import time
import urllib.request

import pytest

from digital_worker.operator import schema as api
from digital_worker.operator.emulator import EmulatedCluster
from digital_worker.operator.kube import KubeClient
from digital_worker.operator.simpods import SimulatedSglangPods
from operator_support import endpoints, scaling_worker, wait_until

RAMP_SECONDS = 30.0


def ramp_rate(elapsed: float) -> float:
    """req/s: 0.5 rising to 4.5 over RAMP_SECONDS, then flat (the spec says 1 req/s per replica)."""
    return 0.5 + 4.0 * min(1.0, elapsed / RAMP_SECONDS)


def ramp_load(kube: KubeClient, name: str, started: float, stop: threading.Event) -> None:
    """Open-loop chat completions at ramp_rate(t), spread over the worker's replicas."""
    body = json.dumps({"model": "qwen2.5-7b", "max_tokens": 200,
                       "messages": [{"role": "user", "content": "hello " * 400}]}).encode()

    def send(url: str) -> None:
        request = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(request, timeout=30).read()
        except Exception:
            pass

    pool = concurrent.futures.ThreadPoolExecutor(32)
    in_flight = threading.BoundedSemaphore(32)  # open loop, but never an unbounded backlog

    def send_bounded(url: str) -> None:
        try:
            send(url)
        finally:
            in_flight.release()

    try:
        index = 0
        urls: list[str] = []
        refreshed = 0.0
        while not stop.is_set():
            if time.monotonic() - refreshed > 1.0:
                urls, refreshed = endpoints(kube, name), time.monotonic()
            if urls and in_flight.acquire(timeout=1):
                pool.submit(send_bounded, urls[index % len(urls)])
                index += 1
            stop.wait(1.0 / ramp_rate(time.monotonic() - started))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def keep_targets_in_sync(kube: KubeClient, prometheus, name: str, stop: threading.Event) -> None:
    """Plays Prometheus' pod discovery: every replica's endpoint, with namespace and worker labels."""
    current: list[str] = []
    while not stop.wait(1.0):
        pods = kube.list("v1", "pods", "ai", f"{api.LABEL_INSTANCE}={name}")
        targets = sorted(p["metadata"]["annotations"][f"{api.GROUP}/sim-endpoint"].split("//", 1)[1]
                         for p in pods if (p["metadata"].get("annotations") or {}).get(f"{api.GROUP}/sim-endpoint"))
        if targets != current and prometheus.process is not None:
            prometheus.set_targets(f"dw-{name}", targets, labels={"namespace": "ai", "digitalworker_io_instance": name})
            current = targets


def test_auto_follows_a_ramp_from_prometheus_dry_run_changes_nothing_and_it_holds_without_it(prometheus):
    from digital_worker.operator.runner import OperatorThread

    with EmulatedCluster(runtime=SimulatedSglangPods(), pod_startup_seconds=0.2, namespaces=("default", "ai")) as cluster, \
            OperatorThread(str(cluster.operator_kubeconfig_path), resync_seconds=5, env={"DW_PROMETHEUS_URL": prometheus.url}):
        kube = KubeClient.from_kubeconfig(str(cluster.kubeconfig_path))
        for name, mode in (("prom-bot", "Auto"), ("prom-dry", "DryRun")):
            kube.create(scaling_worker(name, mode))
        for name in ("prom-bot", "prom-dry"):
            wait_until(lambda name=name: ((kube.get(api.API_VERSION, api.PLURAL, "ai", name) or {}).get("status") or {})
                       .get("phase") == "Ready", timeout=30, message=f"{name} Ready")
        stop = threading.Event()
        started = time.monotonic()
        threads = [threading.Thread(target=target, args=args, daemon=True) for target, args in (
            (keep_targets_in_sync, (kube, prometheus, "prom-bot", stop)),
            (keep_targets_in_sync, (kube, prometheus, "prom-dry", stop)),
            (ramp_load, (kube, "prom-bot", started, stop)),
            (ramp_load, (kube, "prom-dry", started, stop)))]
        for thread in threads:
            thread.start()
        followed: list[tuple[float, int]] = []  # (seconds into the ramp, spec.replicas) at each change

        def auto_replicas() -> int:
            replicas = kube.get(api.API_VERSION, api.PLURAL, "ai", "prom-bot")["spec"]["replicas"]
            if not followed or followed[-1][1] != replicas:
                followed.append((round(time.monotonic() - started, 1), replicas))
            return replicas

        try:
            prometheus.wait_for('sglang_num_requests_total{digitalworker_io_instance="prom-bot"} or '
                                'sglang:num_requests_total{digitalworker_io_instance="prom-bot"}', timeout=30)
            wait_until(lambda: auto_replicas() >= 4, timeout=RAMP_SECONDS + 60, interval=0.5,
                       message=lambda: (followed, kube.get(api.API_VERSION, api.PLURAL, "ai", "prom-bot").get("status")))
            dry = kube.get(api.API_VERSION, api.PLURAL, "ai", "prom-dry")
            prometheus.stop()
            held = wait_until(lambda: ((kube.get(api.API_VERSION, api.PLURAL, "ai", "prom-bot").get("status") or {})
                                       .get("autoscaling") or {}).get("holdCondition"), timeout=40, interval=1,
                              message="a hold once Prometheus is gone")
            replicas = auto_replicas()
            time.sleep(12)  # two more ticks: no change without metrics
            assert auto_replicas() == replicas
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
        # Followed the ramp: grew in more than one step, each step no further ahead of the load
        # than the forecast's lead allows (at 1 req/s per replica: the rate a tick or two later, + 1).
        print("replicas over the ramp (seconds, replicas):", followed)
        assert followed[0][1] == 1 and len(followed) >= 3, followed
        for elapsed, count in followed[1:]:
            assert count <= math.ceil(ramp_rate(elapsed + 15.0)) + 1, followed
        assert held in ("MetricsMissing", "MetricsStale")
        warnings = [e for e in kube.list("v1", "events", "ai")
                    if e["involvedObject"]["name"] == "prom-bot" and e["type"] == "Warning"]
        assert any(e["reason"] == held for e in warnings)
        # The DryRun twin under the same ramp wanted more replicas, said so, and changed nothing.
        assert dry["spec"]["replicas"] == 1
        assert dry["status"]["autoscaling"]["mode"] == "DryRun" and dry["status"]["autoscaling"]["desiredReplicas"] >= 2
        deployment = kube.list("apps/v1", "deployments", "ai", f"{api.LABEL_INSTANCE}=prom-dry")[0]
        assert deployment["spec"]["replicas"] == 1
        reasons = [e["reason"] for e in kube.list("v1", "events", "ai") if e["involvedObject"]["name"] == "prom-dry"]
        assert "WouldScale" in reasons and "Scaled" not in reasons


def test_gpu_load_of_the_workers_pods_reaches_the_autoscaler(prometheus):
    """The node agents (real agent code per emulated GPU node, fake NVML, GPUs attributed to the
    emulated pods) scraped by a real Prometheus: the operator's autoscaler reads the utilisation and
    memory of the GPUs held by this worker's pods (and no others) and reports them in status."""
    from digital_worker.operator.runner import OperatorThread
    from digital_worker.operator.simnodes import start_simulated_node_agents

    name = "gpu-watch"
    with EmulatedCluster(runtime=SimulatedSglangPods(), pod_startup_seconds=0.2, namespaces=("default", "ai")) as cluster, \
            OperatorThread(str(cluster.operator_kubeconfig_path), resync_seconds=5, env={"DW_PROMETHEUS_URL": prometheus.url}), \
            start_simulated_node_agents(cluster, interval=0.5) as agents:
        kube = KubeClient.from_kubeconfig(str(cluster.kubeconfig_path))
        kube.create(scaling_worker(name, "DryRun"))
        wait_until(lambda: ((kube.get(api.API_VERSION, api.PLURAL, "ai", name) or {}).get("status") or {})
                   .get("phase") == "Ready", timeout=30, message="Ready")
        assignments = wait_until(lambda: {key: value for key, value in agents.gpu_assignments().items()
                                          if key[0] == "ai"}, message="GPUs attributed to the worker's pod")
        for target in agents.scrape_targets():
            prometheus.set_targets(f"gpu-agent-{target['labels']['node']}", target["targets"], target["labels"])
        stop = threading.Event()
        syncer = threading.Thread(target=keep_targets_in_sync, args=(kube, prometheus, name, stop), daemon=True)
        syncer.start()
        try:
            pod = next(iter(assignments))[1]
            reported = prometheus.wait_for(f'DCGM_FI_DEV_GPU_UTIL{{namespace="ai",pod="{pod}"}}', timeout=30,
                                           predicate=lambda result: len(result) == 2)
            expected = sum(float(series["value"][1]) for series in reported) / len(reported) / 100.0
            autoscaling = wait_until(
                lambda: (a := ((kube.get(api.API_VERSION, api.PLURAL, "ai", name).get("status") or {})
                               .get("autoscaling") or {})).get("gpuUtilization") is not None and a,
                timeout=40, interval=1, message="GPU utilisation in status.autoscaling")
        finally:
            stop.set()
            syncer.join(10)
    assert autoscaling["gpuUtilization"] == pytest.approx(expected, abs=0.02)
    assert 0 < autoscaling["gpuMemoryUsed"] < 1
