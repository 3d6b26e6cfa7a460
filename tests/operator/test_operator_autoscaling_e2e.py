"""Autoscaling end to end: kopf operator + emulated API + one simulated SGLang replica per pod +
the operator's in-process scraper (the embedded default) + a load generator. Auto follows the load;
DryRun reports the same decision and changes nothing."""
from __future__ import annotations

import threading

import pytest

from digital_worker.operator import schema as api
from digital_worker.operator.kube import KubeClient
from operator_support import load, simulated_fleet, scaling_worker as worker, wait_until


@pytest.fixture(scope="module")
def scaling_cluster():
    with simulated_fleet(resync_seconds=5) as cluster:
        yield cluster


def run_case(scaling_cluster, name: str, mode: str):
    kube = KubeClient.from_kubeconfig(str(scaling_cluster.kubeconfig_path))
    kube.create(worker(name, mode))
    wait_until(lambda: ((kube.get(api.API_VERSION, api.PLURAL, "ai", name) or {}).get("status") or {})
               .get("phase") == "Ready", timeout=30, message="Ready")
    stop = threading.Event()
    generator = threading.Thread(target=load, args=(kube, name, 12.0, stop), daemon=True)
    generator.start()
    return kube, stop, generator


def test_auto_scales_out_under_load(scaling_cluster):
    kube, stop, generator = run_case(scaling_cluster, "auto-bot", "Auto")
    try:
        # The tick scales, posts its Event, then writes status.autoscaling (as the HPA does): wait for both.
        final = wait_until(lambda: (b := kube.get(api.API_VERSION, api.PLURAL, "ai", "auto-bot"))["spec"]["replicas"] >= 3
                           and ((b.get("status") or {}).get("autoscaling") or {}).get("desiredReplicas", 0) >= 3 and b,
                           timeout=90, interval=1, message=lambda: kube.get(api.API_VERSION, api.PLURAL, "ai", "auto-bot").get("status"))
    finally:
        stop.set()
        generator.join(30)
    autoscaling = final["status"]["autoscaling"]
    assert autoscaling["mode"] == "Auto" and autoscaling["desiredReplicas"] >= 3
    wait_until(lambda: len(kube.list("apps/v1", "deployments", "ai", f"{api.LABEL_INSTANCE}=auto-bot")) == 1 and
               kube.list("apps/v1", "deployments", "ai", f"{api.LABEL_INSTANCE}=auto-bot")[0]["spec"]["replicas"] >= 3,
               message="the Deployment follows")
    reasons = [e["reason"] for e in kube.list("v1", "events", "ai") if e["involvedObject"]["name"] == "auto-bot"]
    assert "Scaled" in reasons


def test_dry_run_decides_but_changes_nothing(scaling_cluster):
    kube, stop, generator = run_case(scaling_cluster, "dry-bot", "DryRun")
    try:
        status = wait_until(lambda: ((s := (kube.get(api.API_VERSION, api.PLURAL, "ai", "dry-bot").get("status") or {})
                                      .get("autoscaling") or {}).get("desiredReplicas", 1) >= 2) and s,
                            timeout=90, interval=1, message="a DryRun decision to scale out")
    finally:
        stop.set()
        generator.join(30)
    assert status["mode"] == "DryRun"
    body = kube.get(api.API_VERSION, api.PLURAL, "ai", "dry-bot")
    assert body["spec"]["replicas"] == 1
    assert kube.list("apps/v1", "deployments", "ai", f"{api.LABEL_INSTANCE}=dry-bot")[0]["spec"]["replicas"] == 1
    reasons = [e["reason"] for e in kube.list("v1", "events", "ai") if e["involvedObject"]["name"] == "dry-bot"]
    assert "WouldScale" in reasons and "Scaled" not in reasons


def test_the_autoscaling_timer_holds_a_finalizer_only_while_autoscaling_is_on(scaling_cluster):
    """kopf's timer per worker: its finalizer comes with autoscaling, goes when it is turned Off, and
    deleting the worker stops the timer and lets the object go."""
    from digital_worker.operator.handlers import FINALIZER

    kube = KubeClient.from_kubeconfig(str(scaling_cluster.kubeconfig_path))
    get = lambda: kube.get(api.API_VERSION, api.PLURAL, "ai", "timer-bot")
    finalizers = lambda: (get() or {}).get("metadata", {}).get("finalizers") or []
    body = worker("timer-bot", "Off")
    kube.create(body)
    wait_until(lambda: (get().get("status") or {}).get("phase") == "Ready", timeout=30, message="Ready")
    assert FINALIZER not in finalizers() and "autoscaling" not in (get().get("status") or {})

    kube.patch(api.API_VERSION, api.PLURAL, "ai", "timer-bot", {"spec": {"autoscaling": {"mode": "DryRun"}}})
    status = wait_until(lambda: (s := (get().get("status") or {}).get("autoscaling")) and s, timeout=30,
                        message="a first DryRun tick")
    assert FINALIZER in finalizers() and status["mode"] == "DryRun"

    kube.patch(api.API_VERSION, api.PLURAL, "ai", "timer-bot", {"spec": {"autoscaling": {"mode": "Off"}}})
    wait_until(lambda: FINALIZER not in finalizers(), timeout=30, message=finalizers)

    kube.patch(api.API_VERSION, api.PLURAL, "ai", "timer-bot", {"spec": {"autoscaling": {"mode": "DryRun"}}})
    wait_until(lambda: FINALIZER in finalizers(), timeout=30, message=finalizers)
    kube.delete(api.API_VERSION, api.PLURAL, "ai", "timer-bot")
    wait_until(lambda: get() is None, timeout=30, message=lambda: get().get("metadata"))
