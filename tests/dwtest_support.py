"""Shared test helpers (import as `from dwtest_support import ...`): free ports, HTTP waits, polling,
stopping processes, a real Prometheus. The port, HTTP and process
helpers are dev mode's own (operator/devprom.py), re-exported so there is one copy."""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from digital_worker.operator.devprom import (  # noqa: F401  (re-exported for the tests)
    PrometheusLauncher,
    PrometheusUnavailable,
    free_port,
    stop_process,
    wait_http,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


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

