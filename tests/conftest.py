"""Shared fixtures. Helpers live in dwtest_support (tests/ is on pytest's pythonpath)."""
from __future__ import annotations

from typing import Iterator

import pytest

from dwtest_support import PrometheusServer, free_port


@pytest.fixture
def prometheus(tmp_path_factory) -> Iterator[PrometheusServer]:
    """A real Prometheus on loopback; add scrape targets with `set_targets(job, ['127.0.0.1:PORT'])`."""
    server = PrometheusServer(tmp_path_factory.mktemp("prometheus"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def port() -> int:
    return free_port()
