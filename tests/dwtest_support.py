"""Shared test helpers (import as `from dwtest_support import ...`): free ports, HTTP waits, a real Prometheus."""
from __future__ import annotations

import socket
import time
import urllib.request
from pathlib import Path

import pytest

from digital_worker.operator.devprom import PrometheusLauncher, PrometheusUnavailable

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status < 500:
                    return
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout}s: {last}")


class PrometheusServer(PrometheusLauncher):
    """A real Prometheus process scraping the given targets every second (dev mode's launcher,
    operator/devprom.py); a missing binary fails the test rather than skipping it."""

    def start(self) -> None:
        try:
            super().start()
        except PrometheusUnavailable:
            pytest.fail("Debian's prometheus package is not installed (.ci/run installs it)")
