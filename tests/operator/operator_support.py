"""Helpers for the operator tests."""
from __future__ import annotations

import contextlib
import threading

from digital_worker.operator.devprom import PodTargetSync
from digital_worker.operator.kube import KubeClient
from dwtest_support import EXAMPLE, chat_load, example_worker, sim_endpoints, wait_until  # noqa: F401  (re-exported)



def scaling_worker(name: str, mode: str) -> dict:
    body = example_worker(name, "ai", replicas=1, autoscaling={
        "mode": mode, "minReplicas": 1, "maxReplicas": 4, "intervalSeconds": 5,
        "targetRequestsPerReplica": 1.0, "slo": {"ttftP95Seconds": 1.0},
        "reactive": {"queueLengthPerReplica": 2}, "scaleDown": {"stabilizationSeconds": 600},
    })
    body["spec"]["runtime"]["maxRunningRequests"] = 4
    return body


def endpoints(kube: KubeClient, name: str) -> list[str]:
    return sim_endpoints(kube, "ai", name)


def load(kube: KubeClient, name: str, rate: float, stop: threading.Event) -> None:
    """Open-loop chat completions with long prompts at `rate` req/s over the worker's replicas (bounded in time)."""
    chat_load(kube, "ai", name, rate, stop, max_tokens=200, prompt_words=400, concurrency=64)


def sync_targets_by_revision(kube: KubeClient, prometheus, name: str, stop: threading.Event,
                             namespace: str = "ai") -> None:
    """Plays Prometheus' pod discovery until `stop`: dev mode's PodTargetSync (one job per revision,
    with the labels the platform's scrape configs add), a pass a second on the caller's thread."""
    sync = PodTargetSync(prometheus, kube, namespace, name)
    while not stop.wait(1.0):
        try:
            sync.sync_once()
        except Exception:  # API or Prometheus briefly away (a test may stop its own): next pass
            pass


@contextlib.contextmanager
def simulated_fleet(resync_seconds: float = 2, **operator_env: str):
    """An emulated cluster whose pods run simulated SGLang replicas, and the real operator on it."""
    from digital_worker.operator.emulator import EmulatedCluster
    from digital_worker.operator.runner import OperatorThread
    from digital_worker.operator.simpods import SimulatedSglangPods

    with EmulatedCluster(runtime=SimulatedSglangPods(), pod_startup_seconds=0.2, namespaces=("default", "ai")) \
            as cluster, OperatorThread(str(cluster.operator_kubeconfig_path), resync_seconds=resync_seconds, env=operator_env):
        yield cluster
