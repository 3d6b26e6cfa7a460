"""Helpers for the operator tests."""
from __future__ import annotations

import time
import concurrent.futures
import copy
import json
import threading
import urllib.request
from pathlib import Path
from typing import Any, Callable

import yaml

from digital_worker.operator import schema as api
from digital_worker.operator.kube import KubeClient

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = yaml.safe_load((REPO / "examples" / "digitalworker.yaml").read_text())


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.1, message: Any = "") -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    text = message() if callable(message) else message
    raise AssertionError(f"timed out after {timeout}s: {text or predicate} (last: {last!r})")


def scaling_worker(name: str, mode: str) -> dict:
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


def sync_targets_by_revision(kube, prometheus, name, stop):
    """Plays Prometheus' pod discovery: one job per revision, with the labels the scrape configs add."""
    current: dict[str, list[str]] = {}
    while not stop.wait(1.0):
        by_revision: dict[str, list[str]] = {}
        for pod in kube.list("v1", "pods", "ai", f"{api.LABEL_INSTANCE}={name}"):
            endpoint = (pod["metadata"].get("annotations") or {}).get(f"{api.GROUP}/sim-endpoint")
            if endpoint:
                by_revision.setdefault(pod["metadata"]["labels"][api.LABEL_REVISION], []).append(endpoint.split("//", 1)[1])
        for revision in set(current) | set(by_revision):
            targets = sorted(by_revision.get(revision, []))
            if targets != current.get(revision) and prometheus.process is not None:
                prometheus.set_targets(f"dw-{revision}", targets, labels={
                    "namespace": "ai", "digitalworker_io_instance": name, "digitalworker_io_revision": revision})
        current = {revision: sorted(targets) for revision, targets in by_revision.items()}
