"""Autoscaling from a real Prometheus: kopf operator + emulated API + simulated SGLang replicas that a
real Prometheus scrapes (targets kept in sync with the pods, labelled like the platform's scrape
configs do) + load. Auto follows the load; with Prometheus gone the autoscaler holds and says why."""
from __future__ import annotations

import threading
import time

from digital_worker.operator import schema as api
from digital_worker.operator.emulator import EmulatedCluster
from digital_worker.operator.kube import KubeClient
from digital_worker.operator.simpods import SimulatedSglangPods
from operator_support import load, scaling_worker, wait_until


def keep_targets_in_sync(kube: KubeClient, prometheus, name: str, stop: threading.Event) -> None:
    """Plays Prometheus' pod discovery: every replica's endpoint, with namespace and worker labels."""
    current: list[str] = []
    while not stop.wait(1.0):
        pods = kube.list("v1", "pods", "ai", f"{api.LABEL_INSTANCE}={name}")
        targets = sorted(p["metadata"]["annotations"][f"{api.GROUP}/sim-endpoint"].split("//", 1)[1]
                         for p in pods if (p["metadata"].get("annotations") or {}).get(f"{api.GROUP}/sim-endpoint"))
        if targets != current and prometheus.process is not None:
            prometheus.set_targets("dw", targets, labels={"namespace": "ai", "digitalworker_io_instance": name})
            current = targets


def test_auto_follows_load_from_prometheus_and_holds_without_it(prometheus):
    from digital_worker.operator.runner import OperatorThread

    with EmulatedCluster(runtime=SimulatedSglangPods(), pod_startup_seconds=0.2, namespaces=("default", "ai")) as cluster, \
            OperatorThread(str(cluster.kubeconfig_path), resync_seconds=5, env={"DW_PROMETHEUS_URL": prometheus.url}):
        kube = KubeClient.from_kubeconfig(str(cluster.kubeconfig_path))
        kube.create(scaling_worker("prom-bot", "Auto"))
        wait_until(lambda: ((kube.get(api.API_VERSION, api.PLURAL, "ai", "prom-bot") or {}).get("status") or {})
                   .get("phase") == "Ready", timeout=30, message="Ready")
        stop = threading.Event()
        threads = [threading.Thread(target=keep_targets_in_sync, args=(kube, prometheus, "prom-bot", stop), daemon=True),
                   threading.Thread(target=load, args=(kube, "prom-bot", 12.0, stop), daemon=True)]
        for thread in threads:
            thread.start()
        try:
            prometheus.wait_for('sglang_num_requests_total{digitalworker_io_instance="prom-bot"} or '
                                'sglang:num_requests_total{digitalworker_io_instance="prom-bot"}', timeout=30)
            wait_until(lambda: kube.get(api.API_VERSION, api.PLURAL, "ai", "prom-bot")["spec"]["replicas"] >= 3,
                       timeout=100, interval=1,
                       message=lambda: kube.get(api.API_VERSION, api.PLURAL, "ai", "prom-bot").get("status"))
            prometheus.stop()
            held = wait_until(lambda: ((kube.get(api.API_VERSION, api.PLURAL, "ai", "prom-bot").get("status") or {})
                                       .get("autoscaling") or {}).get("holdCondition"), timeout=40, interval=1,
                              message="a hold once Prometheus is gone")
            replicas = kube.get(api.API_VERSION, api.PLURAL, "ai", "prom-bot")["spec"]["replicas"]
            time.sleep(12)  # two more ticks: no change without metrics
            assert kube.get(api.API_VERSION, api.PLURAL, "ai", "prom-bot")["spec"]["replicas"] == replicas
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
        assert held in ("MetricsMissing", "MetricsStale")
        warnings = [e for e in kube.list("v1", "events", "ai")
                    if e["involvedObject"]["name"] == "prom-bot" and e["type"] == "Warning"]
        assert any(e["reason"] == held for e in warnings)
