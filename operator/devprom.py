"""A real Prometheus for dev mode and tests: Debian's `prometheus` binary on loopback, 1 s scrapes.

`PrometheusLauncher` writes a config of static jobs and hot-reloads it (`POST /-/reload`) when the
targets change. `PodTargetSync` plays Prometheus' pod discovery for the emulated cluster: one job per
revision of a DigitalWorker, with the labels the platform's scrape configs add (namespace,
digitalworker_io_instance, digitalworker_io_revision), plus any extra jobs (e.g. simulated node
agents) a caller supplies.
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable

import yaml

from digital_worker.operator import pods, schema as api



class PrometheusUnavailable(RuntimeError):
    pass


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


def stop_process(process: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout`; always reaps it."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


class PrometheusLauncher:
    """A Prometheus process scraping the configured static jobs every second."""

    def __init__(self, workdir: Path, binary: str | None = None, file_sd: list[Path] | None = None) -> None:
        self.workdir = Path(workdir)
        self.file_sd = [Path(p) for p in file_sd or ()]  # also scrape what these file_sd files list
        self.binary = binary
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = self.workdir / "prometheus.yml"
        self.process: subprocess.Popen | None = None
        self.jobs: dict[str, list[str]] = {}
        self.job_labels: dict[str, dict[str, str]] = {}
        self._lock = threading.Lock()

    def write_config(self) -> None:
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {"job_name": job, "scrape_interval": "1s",
                 "static_configs": [{"targets": targets, **({"labels": self.job_labels[job]}
                                                            if self.job_labels.get(job) else {})}]}
                for job, targets in self.jobs.items()
            ] + ([{"job_name": "file-sd", "scrape_interval": "1s",
                   "file_sd_configs": [{"files": [str(p) for p in self.file_sd], "refresh_interval": "1s"}]}]
                 if self.file_sd else []),
        }
        self.config_path.write_text(yaml.safe_dump(config))

    def set_targets(self, job: str, targets: list[str], labels: dict[str, str] | None = None) -> None:
        """Replace one job's targets (and its series' labels) and hot-reload Prometheus."""
        with self._lock:
            self.jobs[job] = list(targets)
            if labels is not None:
                self.job_labels[job] = dict(labels)
            self.write_config()
            if self.process is not None:
                request = urllib.request.Request(f"{self.url}/-/reload", method="POST")
                urllib.request.urlopen(request, timeout=5).close()

    def start(self) -> None:
        binary = self.binary or prometheus_binary()
        if binary is None:
            raise PrometheusUnavailable("no `prometheus` binary on PATH (Debian: apt-get install prometheus)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.write_config()
        log = open(self.workdir / "prometheus.log", "wb")
        self.process = subprocess.Popen(
            [binary, f"--config.file={self.config_path}", f"--storage.tsdb.path={self.workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-lifecycle", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_http(f"{self.url}/-/ready", timeout=60)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
        self.process = None

    def __enter__(self) -> "PrometheusLauncher":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def query(self, promql: str) -> list[dict]:
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


class FileTargets:
    """The same jobs as a file_sd JSON file, for a Prometheus we do not run (`dev --prometheus URL`):
    point its `file_sd_configs` at `path` and it scrapes the simulated replicas and agents."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.jobs: dict[str, tuple[list[str], dict[str, str]]] = {}

    def set_targets(self, job: str, targets: list[str], labels: dict[str, str] | None = None) -> None:
        self.jobs[job] = (list(targets), dict(labels or self.jobs.get(job, ([], {}))[1]))
        groups = [{"targets": targets, "labels": {**labels, "job": job}}
                  for job, (targets, labels) in sorted(self.jobs.items()) if targets]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".tmp")
        partial.write_text(json.dumps(groups, indent=1))
        partial.replace(self.path)  # Prometheus never reads a half-written file


def revision_targets(kube, namespace: str, name: str) -> dict[str, list[str]]:
    """host:port of each simulated replica of a DigitalWorker, by revision."""
    by_revision: dict[str, list[str]] = {}
    for pod in kube.list("v1", "pods", namespace, f"{api.LABEL_WORKER}={name}"):
        endpoint = pods.sim_endpoint(pod)
        if endpoint and not pod["metadata"].get("deletionTimestamp"):
            revision = (pod["metadata"].get("labels") or {}).get(api.LABEL_REVISION, "")
            by_revision.setdefault(revision, []).append(endpoint.split("//", 1)[-1])
    return {revision: sorted(targets) for revision, targets in by_revision.items()}


class PodTargetSync:
    """Keeps Prometheus' jobs equal to the worker's pods (one job per revision) on a thread."""

    def __init__(self, prometheus: "PrometheusLauncher | FileTargets", kube, namespace: str, name: str, *, interval: float = 1.0,
                 extra_jobs: Callable[[], dict[str, tuple[list[str], dict[str, str]]]] | None = None) -> None:
        self.prometheus, self.kube, self.namespace, self.name = prometheus, kube, namespace, name
        self.interval = interval
        self.extra_jobs = extra_jobs
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._current: dict[str, tuple[list[str], dict[str, str]]] = {}

    def sync_once(self) -> None:
        wanted: dict[str, tuple[list[str], dict[str, str]]] = {}
        for revision, targets in revision_targets(self.kube, self.namespace, self.name).items():
            wanted[f"dw-{self.name}-{revision}"] = (targets, {
                "namespace": self.namespace, "digitalworker_io_instance": self.name,
                "digitalworker_io_revision": revision})
        if self.extra_jobs is not None:
            wanted.update(self.extra_jobs())
        for job in set(self._current) | set(wanted):
            targets, labels = wanted.get(job, ([], self._current.get(job, ([], {}))[1]))
            if self._current.get(job) != (targets, labels):
                self.prometheus.set_targets(job, targets, labels)
        self._current = {job: value for job, value in wanted.items()}

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sync_once()
            except Exception:  # API or Prometheus briefly away: try again next round
                pass

    def start(self) -> "PodTargetSync":
        self.sync_once()
        self._thread = threading.Thread(target=self._run, name="prometheus-targets", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
