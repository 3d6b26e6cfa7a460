"""Autoscaling end to end: kopf operator + emulated API + one simulated SGLang replica per pod +
the operator's in-process scraper (the embedded default) + a load generator. Auto follows the load;
DryRun reports the same decision and changes nothing."""
from __future__ import annotations

import concurrent.futures
import copy
import json
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from digital_worker.operator import schema as api
from digital_worker.operator.emulator import EmulatedCluster
from digital_worker.operator.kube import KubeClient
from digital_worker.operator.simpods import SimulatedSglangPods
from operator_support import wait_until

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = yaml.safe_load((REPO / "examples" / "digitalworker.yaml").read_text())


@pytest.fixture(scope="module")
def scaling_cluster():
    from digital_worker.operator.runner import OperatorThread

    runtime = SimulatedSglangPods()
    with EmulatedCluster(runtime=runtime, pod_startup_seconds=0.2, namespaces=("default", "ai")) as cluster, \
            OperatorThread(str(cluster.kubeconfig_path), resync_seconds=5):
        yield cluster


def worker(name: str, mode: str) -> dict:
    body = copy.deepcopy(EXAMPLE)
    body["metadata"] = {"name": name, "namespace": "ai"}
    body["spec"]["runtime"].pop("apiKeySecretRef")
    body["spec"]["runtime"]["maxRunningRequests"] = 4
    body["spec"]["replicas"] = 1
    body["spec"]["autoscaling"] = {
        "mode": mode, "minReplicas": 1, "maxReplicas": 4, "intervalSeconds": 5,
        "targetRequestsPerReplica": 1.0, "slo": {"ttftP95Seconds": 1.0},
        "reactive": {"queueLengthPerReplica": 2}, "scaleDown": {"stabilizationSeconds": 600},
    }
    return body


def endpoints(kube: KubeClient, name: str) -> list[str]:
    pods = kube.list("v1", "pods", "ai", f"{api.LABEL_INSTANCE}={name}")
    return [p["metadata"]["annotations"][f"{api.GROUP}/sim-endpoint"] for p in pods
            if (p["metadata"].get("annotations") or {}).get(f"{api.GROUP}/sim-endpoint")]


def load(kube: KubeClient, name: str, rate: float, stop: threading.Event) -> None:
    """Open-loop chat completions at `rate` req/s, spread over the worker's replicas (bounded in time)."""
    body = json.dumps({"model": "qwen2.5-7b", "max_tokens": 200,
                       "messages": [{"role": "user", "content": "hello " * 400}]}).encode()

    def send(url: str) -> None:
        request = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(request, timeout=30).read()
        except Exception:
            pass

    deadline = time.monotonic() + 120
    pool = concurrent.futures.ThreadPoolExecutor(64)
    in_flight = threading.BoundedSemaphore(64)  # open loop, but never an unbounded backlog

    def send_bounded(url: str) -> None:
        try:
            send(url)
        finally:
            in_flight.release()

    try:
        index = 0
        while not stop.is_set() and time.monotonic() < deadline:
            urls = endpoints(kube, name)
            if urls and in_flight.acquire(timeout=1):
                pool.submit(send_bounded, urls[index % len(urls)])
                index += 1
            time.sleep(1.0 / rate)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def run_case(scaling_cluster, name: str, mode: str):
    kube = KubeClient.from_kubeconfig(str(scaling_cluster.kubeconfig_path))
    kube.create(worker(name, mode))
    wait_until(lambda: ((kube.get(api.API_VERSION, api.PLURAL, "ai", name) or {}).get("status") or {})
               .get("phase") == "Ready", timeout=30, message="Ready")
    stop = threading.Event()
    generator = threading.Thread(target=load, args=(kube, name, 12.0, stop), daemon=True)
    generator.start()
    return kube, stop, generator


def test_auto_scales_out_under_load(scaling_cluster):
    kube, stop, generator = run_case(scaling_cluster, "auto-bot", "Auto")
    try:
        final = wait_until(lambda: (b := kube.get(api.API_VERSION, api.PLURAL, "ai", "auto-bot"))["spec"]["replicas"] >= 3 and b,
                           timeout=90, interval=1, message=lambda: kube.get(api.API_VERSION, api.PLURAL, "ai", "auto-bot").get("status"))
    finally:
        stop.set()
        generator.join(30)
    autoscaling = final["status"]["autoscaling"]
    assert autoscaling["mode"] == "Auto" and autoscaling["desiredReplicas"] >= 3
    wait_until(lambda: len(kube.list("apps/v1", "deployments", "ai", f"{api.LABEL_INSTANCE}=auto-bot")) == 1 and
               kube.list("apps/v1", "deployments", "ai", f"{api.LABEL_INSTANCE}=auto-bot")[0]["spec"]["replicas"] >= 3,
               message="the Deployment follows")
    reasons = [e["reason"] for e in kube.list("v1", "events", "ai") if e["involvedObject"]["name"] == "auto-bot"]
    assert "Scaled" in reasons


def test_dry_run_decides_but_changes_nothing(scaling_cluster):
    kube, stop, generator = run_case(scaling_cluster, "dry-bot", "DryRun")
    try:
        status = wait_until(lambda: ((s := (kube.get(api.API_VERSION, api.PLURAL, "ai", "dry-bot").get("status") or {})
                                      .get("autoscaling") or {}).get("desiredReplicas", 1) >= 2) and s,
                            timeout=90, interval=1, message="a DryRun decision to scale out")
    finally:
        stop.set()
        generator.join(30)
    assert status["mode"] == "DryRun"
    body = kube.get(api.API_VERSION, api.PLURAL, "ai", "dry-bot")
    assert body["spec"]["replicas"] == 1
    assert kube.list("apps/v1", "deployments", "ai", f"{api.LABEL_INSTANCE}=dry-bot")[0]["spec"]["replicas"] == 1
    reasons = [e["reason"] for e in kube.list("v1", "events", "ai") if e["involvedObject"]["name"] == "dry-bot"]
    assert "WouldScale" in reasons and "Scaled" not in reasons
