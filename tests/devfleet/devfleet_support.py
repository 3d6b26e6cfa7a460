"""Helpers for the dev-fleet tests: waiting, and open-loop chat load on a worker's simulated replicas."""
from __future__ import annotations

import concurrent.futures
import json
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any

from digital_worker.operator import schema as api
from digital_worker.operator.kube import KubeClient


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.2, message: Any = "") -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    text = message() if callable(message) else message
    raise AssertionError(f"timed out after {timeout}s: {text or predicate} (last: {last!r})")


def worker_status(kube: KubeClient, namespace: str, name: str) -> dict:
    return (kube.get(api.API_VERSION, api.PLURAL, namespace, name) or {}).get("status") or {}


def endpoints(kube: KubeClient, namespace: str, name: str) -> list[str]:
    pods = kube.list("v1", "pods", namespace, f"{api.LABEL_INSTANCE}={name}")
    return [p["metadata"]["annotations"][f"{api.GROUP}/sim-endpoint"] for p in pods
            if (p["metadata"].get("annotations") or {}).get(f"{api.GROUP}/sim-endpoint")
            and not p["metadata"].get("deletionTimestamp")]


def load(kube: KubeClient, namespace: str, name: str, rate: float, stop: threading.Event,
         model: str = "qwen2.5-7b", max_seconds: float = 120.0) -> None:
    """Short chat completions at `rate` req/s round-robin over the worker's replicas, until `stop`."""
    body = json.dumps({"model": model, "max_tokens": 16,
                       "messages": [{"role": "user", "content": "hello " * 50}]}).encode()
    in_flight = threading.BoundedSemaphore(32)  # open loop, but never an unbounded backlog

    def send(url: str) -> None:
        request = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(request, timeout=30).read()
        except Exception:
            pass
        finally:
            in_flight.release()

    pool = concurrent.futures.ThreadPoolExecutor(32)
    deadline = time.monotonic() + max_seconds
    index, urls, refreshed = 0, [], 0.0
    try:
        while not stop.is_set() and time.monotonic() < deadline:
            if time.monotonic() - refreshed > 1.0:
                urls, refreshed = endpoints(kube, namespace, name), time.monotonic()
            if urls and in_flight.acquire(timeout=1):
                pool.submit(send, urls[index % len(urls)])
                index += 1
            time.sleep(1.0 / rate)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
