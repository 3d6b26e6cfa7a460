"""Shared test helpers (import as `from dwtest_support import ...`): free ports, HTTP waits, polling,
stopping processes, a real Prometheus, chat load on a worker's simulated replicas. The port, HTTP
and process helpers are dev mode's own (operator/devprom.py), re-exported so there is one copy."""
from __future__ import annotations

import concurrent.futures
import copy
import json
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from digital_worker.operator import schema as api
from digital_worker.operator.devprom import (  # noqa: F401  (re-exported for the tests)
    PrometheusLauncher,
    PrometheusUnavailable,
    free_port,
    stop_process,
    wait_http,
)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
EXAMPLE = yaml.safe_load((REPO / "examples" / "digitalworker.yaml").read_text())


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1, message: Any = "") -> Any:
    """Poll `predicate` until it returns something truthy and return that; fail the test after `timeout`.
    `message` (text, or a callable for a late description) says what was awaited."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    text = message() if callable(message) else message
    raise AssertionError(f"timed out after {timeout}s: {text or predicate} (last: {last!r})")


class PrometheusServer(PrometheusLauncher):
    """A real Prometheus process scraping the given targets every second (dev mode's launcher,
    operator/devprom.py); a missing binary fails the test rather than skipping it."""

    def start(self) -> None:
        try:
            super().start()
        except PrometheusUnavailable:
            pytest.fail("Debian's prometheus package is not installed (.ci/run installs it)")


def example_worker(name: str, namespace: str = "ai", *, replicas: int = 2, **spec: Any) -> dict:
    """examples/digitalworker.yaml as a worker for the emulated cluster: named `name` in `namespace`,
    without the API-key secret (there is none there), `replicas` fixed with autoscaling Off. Each
    keyword replaces that key of the spec; None removes it (e.g. `fallback=None`: no fallback pods)."""
    body = copy.deepcopy(EXAMPLE)
    body["metadata"] = {"name": name, "namespace": namespace}
    body["spec"]["runtime"].pop("apiKeySecretRef")
    body["spec"].update(replicas=replicas, autoscaling={"mode": "Off"})
    for key, value in spec.items():
        if value is None:
            body["spec"].pop(key, None)
        else:
            body["spec"][key] = value
    return body


def sim_endpoints(kube, namespace: str, name: str) -> list[str]:
    """Base URLs of the worker's simulated replicas (the pods' sim-endpoint annotation); pods being
    deleted are left out."""
    pods = kube.list("v1", "pods", namespace, f"{api.LABEL_INSTANCE}={name}")
    return [p["metadata"]["annotations"][f"{api.GROUP}/sim-endpoint"] for p in pods
            if (p["metadata"].get("annotations") or {}).get(f"{api.GROUP}/sim-endpoint")
            and not p["metadata"].get("deletionTimestamp")]


def chat_load(kube, namespace: str, name: str, rate: float | Callable[[float], float], stop: threading.Event, *,
              model: str = "qwen2.5-7b", max_tokens: int = 16, prompt_words: int = 50, concurrency: int = 32,
              max_seconds: float = 120.0) -> None:
    """Open-loop chat completions round-robin over the worker's replicas until `stop` (or `max_seconds`).
    `rate` is requests/s, or a function of the seconds since the load began (a ramp). At most
    `concurrency` requests are in flight: open loop, but never an unbounded backlog."""
    body = json.dumps({"model": model, "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": "hello " * prompt_words}]}).encode()
    in_flight = threading.BoundedSemaphore(concurrency)

    def send(url: str) -> None:
        request = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(request, timeout=30).read()
        except Exception:  # errors are the replicas' to count, not the load's
            pass
        finally:
            in_flight.release()

    pool = concurrent.futures.ThreadPoolExecutor(concurrency)
    started = time.monotonic()
    index, urls, refreshed = 0, [], 0.0
    try:
        while not stop.is_set() and time.monotonic() - started < max_seconds:
            if time.monotonic() - refreshed > 1.0:
                urls, refreshed = sim_endpoints(kube, namespace, name), time.monotonic()
            if urls and in_flight.acquire(timeout=1):
                pool.submit(send, urls[index % len(urls)])
                index += 1
            stop.wait(1.0 / (rate(time.monotonic() - started) if callable(rate) else rate))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
