"""The fallback breaker end to end: kopf operator + emulated API + simulated SGLang replicas (errors
injected into the stable revision) scraped by a real Prometheus, with load sent the way kube-proxy
would: to the pods the worker's Service selects at that moment. The stable revision starts failing,
the Service moves to the warm fallback model's pods, status and Events say so; the primary heals,
passes a trial and takes the traffic back; removing spec.fallback removes the fallback."""
from __future__ import annotations

import concurrent.futures
import json
import threading
import time
import urllib.request

from digital_worker.operator import schema as api
from digital_worker.operator.emulator import EmulatedCluster
from digital_worker.operator.kube import KubeClient
from digital_worker.operator.simpods import SimulatedSglangPods
from dwtest_support import example_worker
from operator_support import wait_until

NAME, NAMESPACE = "fb-bot", "ai"
SIM_ENDPOINT = f"{api.GROUP}/sim-endpoint"


def worker_pods(kube: KubeClient) -> list[dict]:
    """Every pod of the worker, the fallback's too (they all carry digitalworker.io/instance)."""
    return [p for p in kube.list("v1", "pods", NAMESPACE, f"{api.LABEL_WORKER}={NAME}")
            if (p["metadata"].get("annotations") or {}).get(SIM_ENDPOINT) and not p["metadata"].get("deletionTimestamp")]


def sync_targets(kube: KubeClient, prometheus, stop: threading.Event) -> None:
    """Plays Prometheus' pod discovery: one job per revision label, with the labels the scrape configs add."""
    current: dict[str, list[str]] = {}
    while not stop.wait(1.0):
        by_revision: dict[str, list[str]] = {}
        for pod in worker_pods(kube):
            address = pod["metadata"]["annotations"][SIM_ENDPOINT].split("//", 1)[1]
            by_revision.setdefault(pod["metadata"]["labels"][api.LABEL_REVISION], []).append(address)
        for revision in set(current) | set(by_revision):
            targets = sorted(by_revision.get(revision, []))
            if targets != current.get(revision):
                prometheus.set_targets(f"{NAME}-{revision}", targets, labels={
                    "namespace": NAMESPACE, "digitalworker_io_instance": NAME, "digitalworker_io_revision": revision})
        current = {revision: sorted(targets) for revision, targets in by_revision.items()}


class ServiceLoad:
    """Open-loop chat completions through the Service: each request goes to a pod its selector matches
    (refreshed every 0.25 s, as endpoints follow a selector), and the outcome is recorded per revision."""

    def __init__(self, kube: KubeClient, rate: float) -> None:
        self.kube, self.rate = kube, rate
        self.results: list[tuple[float, str, bool]] = []  # (time, revision, ok)
        self.stop = threading.Event()
        self._lock = threading.Lock()

    def endpoints(self) -> list[tuple[str, str]]:
        service = self.kube.get("v1", "services", NAMESPACE, NAME)
        selector = (service or {}).get("spec", {}).get("selector") or {}
        return [(p["metadata"]["labels"][api.LABEL_REVISION], p["metadata"]["annotations"][SIM_ENDPOINT])
                for p in worker_pods(self.kube)
                if selector and all(p["metadata"]["labels"].get(k) == v for k, v in selector.items())]

    def send(self, revision: str, url: str) -> None:
        body = json.dumps({"model": "qwen2.5-7b", "max_tokens": 8,
                           "messages": [{"role": "user", "content": "hello"}]}).encode()
        request = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                ok = response.status == 200
        except Exception:
            ok = False
        with self._lock:
            self.results.append((time.monotonic(), revision, ok))

    def run(self) -> None:
        pool = concurrent.futures.ThreadPoolExecutor(16)
        targets, refreshed, index = [], 0.0, 0
        try:
            while not self.stop.is_set():
                if time.monotonic() - refreshed > 0.25:
                    targets, refreshed = self.endpoints(), time.monotonic()
                if targets:
                    pool.submit(self.send, *targets[index % len(targets)])
                    index += 1
                time.sleep(1.0 / self.rate)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def served(self, since: float, until: float = float("inf")) -> dict[str, list[bool]]:
        with self._lock:
            rows = list(self.results)
        out: dict[str, list[bool]] = {}
        for at, revision, ok in rows:
            if since <= at < until:
                out.setdefault(revision, []).append(ok)
        return out


def test_failing_stable_switches_to_the_fallback_and_back(prometheus):
    from digital_worker.operator.runner import OperatorThread

    body = example_worker(NAME, NAMESPACE, replicas=2, rollout=None, fallback={
        "model": {"name": "qwen2.5-1.5b", "source": "hf://Qwen/Qwen2.5-1.5B-Instruct"},
        "replicas": 1, "errorRateThreshold": 0.5, "unhealthySeconds": 4})

    def status() -> dict:
        return kube.get(api.API_VERSION, api.PLURAL, NAMESPACE, NAME).get("status") or {}

    def selector() -> dict:
        return kube.get("v1", "services", NAMESPACE, NAME)["spec"]["selector"]

    def reasons() -> list[str]:
        return [e["reason"] for e in sorted(kube.list("v1", "events", NAMESPACE),
                                            key=lambda e: e.get("lastTimestamp") or "")
                if e["reason"].startswith("Fallback")]

    runtime = SimulatedSglangPods()
    with EmulatedCluster(runtime=runtime, pod_startup_seconds=0.2, namespaces=("default", NAMESPACE)) as cluster, \
            OperatorThread(str(cluster.operator_kubeconfig_path), resync_seconds=5, env={"DW_PROMETHEUS_URL": prometheus.url}):
        kube = KubeClient.from_kubeconfig(str(cluster.kubeconfig_path))
        kube.create(body)
        ready = wait_until(lambda: (s := status()).get("phase") == "Ready" and
                           (s.get("fallback") or {}).get("phase") == "Closed" and s, timeout=30, message=status)
        stable = ready["stableRevision"]
        assert ready["fallback"]["active"] is False and ready["fallback"]["model"] == "qwen2.5-1.5b"
        assert [r["revision"] for r in ready["revisions"]] == [stable]  # the fallback is no revision
        fallback = wait_until(lambda: (d := kube.get("apps/v1", "deployments", NAMESPACE, f"{NAME}-fallback"))
                              and (d.get("status") or {}).get("readyReplicas") == 1 and d, message="fallback warm")
        assert fallback["metadata"]["labels"][api.LABEL_INSTANCE] == f"{NAME}.fallback"
        assert selector() == {api.LABEL_INSTANCE: NAME, api.LABEL_NAME: api.APP_NAME}

        load = ServiceLoad(kube, rate=12.0)
        stop = threading.Event()
        threads = [threading.Thread(target=sync_targets, args=(kube, prometheus, stop), daemon=True),
                   threading.Thread(target=load.run, daemon=True)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(3)
            assert set(load.served(0)) == {stable}  # the primary alone serves while healthy

            runtime.inject(stable, error_rate=1.0)
            failing_since = time.monotonic()
            wait_until(lambda: selector() == {api.LABEL_INSTANCE: f"{NAME}.fallback"}, timeout=40, interval=0.2,
                       message=status)
            switched_at = time.monotonic()
            tripped = wait_until(lambda: (s := status()).get("fallback", {}).get("active") and s, message=status)
            assert tripped["fallback"]["phase"] == "Open" and tripped["fallback"]["since"]
            assert "error rate" in tripped["fallback"]["reason"]
            wait_until(lambda: sum(load.served(switched_at + 0.5).get("fallback", [])) >= 10, timeout=15,
                       message=lambda: load.served(switched_at))
            # Before the first trial (5 s after the switch) only the fallback gets requests, and it answers.
            on_fallback = load.served(switched_at + 0.5, switched_at + 4)
            assert set(on_fallback) == {"fallback"} and all(on_fallback["fallback"])  # it answers, under our name
            assert "FallbackActivated" in reasons()

            runtime.inject(stable, error_rate=0.0)
            healed_at = time.monotonic()
            wait_until(lambda: selector() == {api.LABEL_WORKER: NAME}, timeout=30, interval=0.2, message=status)
            wait_until(lambda: selector() == {api.LABEL_INSTANCE: NAME, api.LABEL_NAME: api.APP_NAME},
                       timeout=40, interval=0.2, message=status)
            recovered_at = time.monotonic()
            recovered = wait_until(lambda: (s := status()).get("fallback", {}).get("phase") == "Closed" and s,
                                   message=status)
            assert recovered["fallback"]["active"] is False
            time.sleep(1)
            after = load.served(time.monotonic() - 0.5)
            assert set(after) <= {stable}
        finally:
            stop.set()
            load.stop.set()
            for thread in threads:
                thread.join(15)
        events = reasons()
        assert events.index("FallbackActivated") < events.index("FallbackTrial") < events.index("FallbackRecovered")
        during = load.served(failing_since, switched_at)
        failed = sum(not ok for oks in during.values() for ok in oks)
        total = sum(len(oks) for oks in during.values())
        print(f"\nfallback e2e: switch {switched_at - failing_since:.1f}s after the primary started failing "
              f"({failed}/{total} requests failed meanwhile); traffic back {recovered_at - healed_at:.1f}s after it "
              f"healed; fallback served {len(load.served(0).get('fallback', []))} requests")

        kube.patch(api.API_VERSION, api.PLURAL, NAMESPACE, NAME, {"spec": {"fallback": None}})
        wait_until(lambda: kube.get("apps/v1", "deployments", NAMESPACE, f"{NAME}-fallback") is None and
                   kube.get("v1", "configmaps", NAMESPACE, f"{NAME}-fallback") is None and
                   "fallback" not in status(), timeout=20, message=status)
        assert [d["metadata"]["name"] for d in kube.list("apps/v1", "deployments", NAMESPACE)] == [f"{NAME}-{stable}"]
