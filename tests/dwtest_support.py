"""Shared test helpers (import as `from dwtest_support import ...`): free ports, HTTP waits, a real Prometheus."""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
import yaml

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


class PrometheusServer:
    """A real Prometheus process scraping the given targets every second."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = workdir / "prometheus.yml"
        self.process: subprocess.Popen | None = None
        self.jobs: dict[str, list[str]] = {}
        self.job_labels: dict[str, dict[str, str]] = {}

    def write_config(self) -> None:
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {"job_name": job, "scrape_interval": "1s",
                 "static_configs": [{"targets": targets, **({"labels": self.job_labels[job]}
                                                            if self.job_labels.get(job) else {})}]}
                for job, targets in self.jobs.items()
            ],
        }
        self.config_path.write_text(yaml.safe_dump(config))

    def set_targets(self, job: str, targets: list[str], labels: dict[str, str] | None = None) -> None:
        """Replace one job's targets (and the labels its series get) and hot-reload Prometheus
        (it watches no files: we POST /-/reload)."""
        self.jobs[job] = list(targets)
        if labels is not None:
            self.job_labels[job] = dict(labels)
        self.write_config()
        if self.process is not None:
            request = urllib.request.Request(f"{self.url}/-/reload", method="POST")
            urllib.request.urlopen(request, timeout=5).close()

    def start(self) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("Debian's prometheus package is not installed (.ci/run installs it)")
        self.write_config()
        log = open(self.workdir / "prometheus.log", "wb")
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--web.enable-lifecycle",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        wait_http(f"{self.url}/-/ready", timeout=60)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def query(self, promql: str) -> list[dict]:
        import json
        import urllib.parse

        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)["data"]["result"]

    def wait_for(self, promql: str, timeout: float = 30.0, predicate=None) -> list[dict]:
        """Poll until `promql` returns something (and `predicate(result)` holds, when given)."""
        deadline = time.monotonic() + timeout
        result: list[dict] = []
        while time.monotonic() < deadline:
            result = self.query(promql)
            if result and (predicate is None or predicate(result)):
                return result
            time.sleep(0.5)
        raise TimeoutError(f"no result for {promql!r} within {timeout}s (last: {result})")
