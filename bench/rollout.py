"""A bad canary on the simulated fleet: how fast is it rolled back, and how much traffic did it serve?

    python bench/rollout.py [--json FILE] [--error-rate 0.3] [--interval 5]

Runs the whole product in one process tree: the emulated API, the real kopf operator, one simulated
SGLang replica per pod (the new revision injected with errors), a real Prometheus (Debian's
`prometheus`, started here on loopback) scraping them, and an open-loop load generator that sends
each request to a replica chosen in proportion to the replicas of each revision (what the shared
Service does). Per scenario it reports:

- `rollback_seconds`: first request answered by the bad revision -> its replicas at 0 and the stable
  revision back at full size;
- `analysis_interval_seconds`, and the rollback in intervals;
- `bad_revision_request_share`: requests the bad revision answered / all requests from the start of
  the rollout to the rollback, next to `configured_canary_weight`.
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tests" / "operator"))

from digital_worker.operator import render, schema as api, spec as dw_spec  # noqa: E402
from digital_worker.operator.emulator import EmulatedCluster  # noqa: E402
from digital_worker.operator.kube import KubeClient  # noqa: E402
from digital_worker.operator.runner import OperatorThread  # noqa: E402
from digital_worker.operator.simpods import SimulatedSglangPods  # noqa: E402
from dwtest_support import PrometheusServer, example_worker  # noqa: E402
from operator_support import sync_targets_by_revision  # noqa: E402  (stands in for pod discovery)

NAMESPACE = "ai"


def worker(name: str, replicas: int, weight: int, interval: int) -> dict:
    # No fallback: the breaker watches the stable, which stays healthy (not measured here).
    return example_worker(name, NAMESPACE, replicas=replicas, fallback=None, rollout={
        "strategy": "Canary",
        "canary": {"steps": [{"setWeight": weight}, {"analysis": {}}, {"setWeight": 100}], "maxSurge": 1},
        "analysis": {"intervalSeconds": interval, "windowSeconds": 2 * interval, "minRequests": 5,
                     "failureLimit": 1, "inconclusiveLimit": 6, "maxErrorRate": 0.02},
    })


class Traffic:
    """Open-loop requests spread over the pods, counted per revision and outcome."""

    def __init__(self, kube: KubeClient, name: str, rate: float) -> None:
        self.kube, self.name, self.rate = kube, name, rate
        self.counts: dict[str, dict[str, int]] = {}
        self.first_bad_answer: dict[str, float] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.pods: list[tuple[str, str]] = []

    def refresh(self) -> None:
        while not self.stop.wait(0.5):
            pods = self.kube.list("v1", "pods", NAMESPACE, f"{api.LABEL_INSTANCE}={self.name}")
            self.pods = [(p["metadata"]["labels"][api.LABEL_REVISION],
                          p["metadata"]["annotations"][f"{api.GROUP}/sim-endpoint"]) for p in pods
                         if (p["metadata"].get("annotations") or {}).get(f"{api.GROUP}/sim-endpoint")
                         and any(c.get("type") == "Ready" and c.get("status") == "True"
                                 for c in (p.get("status") or {}).get("conditions") or [])]

    def send(self, revision: str, url: str) -> None:
        body = json.dumps({"model": "qwen2.5-7b", "max_tokens": 32,
                           "messages": [{"role": "user", "content": "hello " * 50}]}).encode()
        request = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(request, timeout=30).read()
            outcome = "ok"
        except Exception:
            outcome = "error"
        with self.lock:
            self.counts.setdefault(revision, {"ok": 0, "error": 0})[outcome] += 1
            self.first_bad_answer.setdefault(revision, time.monotonic())

    def run(self) -> None:
        threading.Thread(target=self.refresh, daemon=True).start()
        index = 0
        deadline = time.monotonic() + 300
        while not self.stop.is_set() and time.monotonic() < deadline:
            pods = list(self.pods)
            if pods:
                revision, url = pods[index % len(pods)]
                threading.Thread(target=self.send, args=(revision, url), daemon=True).start()
                index += 1
            time.sleep(1.0 / self.rate)

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return {revision: sum(c.values()) for revision, c in self.counts.items()}


def _since(start: float | None, end: float | None) -> float | None:
    return round(end - start, 2) if start is not None and end is not None else None


def scenario(replicas: int, weight: int, interval: int, error_rate: float, rate: float) -> dict:
    name = f"bench-{replicas}-{weight}"
    body = worker(name, replicas, weight, interval)
    bad_spec = copy.deepcopy(body["spec"])
    bad_spec["model"]["revision"] = "bad"
    bad = render.revision_hash(dw_spec.normalize_spec(bad_spec)[0])
    runtime = SimulatedSglangPods()
    runtime.inject(bad, error_rate=error_rate)
    workdir = Path(tempfile.mkdtemp(prefix="dw-rollout-bench-"))
    prometheus = PrometheusServer(workdir)
    prometheus.start()
    try:
        with EmulatedCluster(runtime=runtime, pod_startup_seconds=0.2, namespaces=("default", NAMESPACE)) as cluster, \
                OperatorThread(str(cluster.operator_kubeconfig_path), resync_seconds=5, env={"DW_PROMETHEUS_URL": prometheus.url}):
            kube = KubeClient.from_kubeconfig(str(cluster.kubeconfig_path))
            kube.create(body)
            while ((kube.get(api.API_VERSION, api.PLURAL, NAMESPACE, name).get("status") or {}).get("phase")) != "Ready":
                time.sleep(0.2)
            stable = kube.get(api.API_VERSION, api.PLURAL, NAMESPACE, name)["status"]["currentRevision"]
            traffic = Traffic(kube, name, rate)
            sync_stop = threading.Event()
            threading.Thread(target=sync_targets_by_revision, args=(kube, prometheus, name, sync_stop), daemon=True).start()
            threading.Thread(target=traffic.run, daemon=True).start()
            time.sleep(2 * interval)  # the stable revision has a history before the rollout
            before = traffic.snapshot()
            kube.patch(api.API_VERSION, api.PLURAL, NAMESPACE, name, {"spec": {"model": {"revision": "bad"}}})
            deadline = time.monotonic() + 180
            rolled_back_at = aborted_at = analysis_started_at = None
            runs: dict = {}
            while time.monotonic() < deadline:
                deployments = {d["metadata"]["labels"][api.LABEL_REVISION]: d for d in
                               kube.list("apps/v1", "deployments", NAMESPACE, f"{api.LABEL_INSTANCE}={name}")}
                status = kube.get(api.API_VERSION, api.PLURAL, NAMESPACE, name).get("status") or {}
                state = status.get("rollout") or {}
                if analysis_started_at is None and state.get("step") == 1:
                    analysis_started_at = time.monotonic()
                if aborted_at is None and state.get("phase") == "Aborted":
                    aborted_at, runs = time.monotonic(), state.get("analysis") or {}
                if (status.get("rollout") or {}).get("phase") == "Aborted" and \
                        (deployments.get(bad, {}).get("status") or {}).get("replicas", 0) == 0 and \
                        (deployments.get(stable, {}).get("status") or {}).get("readyReplicas", 0) >= replicas:
                    rolled_back_at = time.monotonic()
                    break
                time.sleep(0.2)
            after = traffic.snapshot()
            traffic.stop.set()
            sync_stop.set()
            first_bad = traffic.first_bad_answer.get(bad)
            served = {rev: after.get(rev, 0) - before.get(rev, 0) for rev in after}
            total = sum(served.values()) or 1
            rollback = (rolled_back_at - first_bad) if rolled_back_at and first_bad else float("nan")
            return {
                "scenario": f"{error_rate:.0%} errors, {replicas} replicas at {weight}%",
                "rolled_back": rolled_back_at is not None,
                "rollback_seconds": round(rollback, 2),
                "analysis_interval_seconds": interval,
                "rollback_intervals": round(rollback / interval, 2),
                "bad_revision_request_share": round(served.get(bad, 0) / total, 4),
                "configured_canary_weight": weight / 100,
                "share_over_weight": round(served.get(bad, 0) / total / (weight / 100), 2),
                "requests": total,
                # Where the rollback time goes: canary serving -> analysis step -> abort -> stable whole.
                "analysis_step_after_first_bad_seconds": _since(first_bad, analysis_started_at),
                "abort_after_first_bad_seconds": _since(first_bad, aborted_at),
                "restore_after_abort_seconds": _since(aborted_at, rolled_back_at),
                "analysis_runs": runs.get("runs"),
                "inconclusive_runs": (runs.get("runs") or 0) - (runs.get("consecutiveFailures") or 0)
                - (runs.get("successfulRuns") or 0),
            }
    finally:
        prometheus.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None)
    parser.add_argument("--interval", type=int, default=5, help="analysis interval (s)")
    parser.add_argument("--error-rate", type=float, default=0.3)
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second")
    args = parser.parse_args()
    if shutil.which("prometheus") is None:
        print("needs Debian's prometheus package on PATH", file=sys.stderr)
        return 2
    results = [scenario(replicas, weight, args.interval, args.error_rate, args.rate)
               for replicas, weight in ((4, 25), (10, 10))]
    columns = ("scenario", "rolled_back", "rollback_seconds", "rollback_intervals", "bad_revision_request_share",
               "configured_canary_weight", "share_over_weight", "requests", "analysis_step_after_first_bad_seconds",
               "abort_after_first_bad_seconds", "restore_after_abort_seconds", "inconclusive_runs")
    print(" | ".join(columns))
    for row in results:
        print(" | ".join(str(row[c]) for c in columns))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
