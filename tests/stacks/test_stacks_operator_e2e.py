"""The platform objects against the real operator: `digital-worker run` started with the exact argv
the operator Deployment carries, on the emulated API (kmock, the lead's EmulatedCluster).

Checks what a cluster would: the liveness endpoint the probe targets answers, kopf peers through
the peering object the platform creates (and is not paused), the operator reconciles a
DigitalWorker from stack config, and a second replica with the same priority pauses both,
which is why operator/deploy.py allows one replica.
"""
from __future__ import annotations

import os
import subprocess
import sys
import urllib.request

import pytest

from digital_worker.operator import deploy
from digital_worker.stacks.manifests import PlatformSettings, platform_objects
from dwtest_support import free_port, stop_process as stop, wait_until

pytestmark = pytest.mark.e2e

NS = "dw-system"
WORKER = {"metadata": {"name": "support-bot", "namespace": "ai"},
          "spec": {"model": {"name": "qwen2.5-7b", "source": "hf://Qwen/Qwen2.5-7B-Instruct"},
                   "runtime": {"gpuType": "nvidia-l4-24gb", "gpusPerReplica": 1}, "replicas": 1}}
# What the emulated API serves; RBAC and DaemonSets are not enforced or run there.
SERVED_KINDS = {"Namespace", "CustomResourceDefinition", "ClusterKopfPeering", "ServiceAccount", "Deployment",
                "Service", "DigitalWorker"}


def start_operator(kubeconfig: str, log_path, health_port: int) -> subprocess.Popen:
    """The container's command and args from the Deployment, with the health port made free for the test."""
    container = deploy.deployment(NS, "unused", replicas=1)["spec"]["template"]["spec"]["containers"][0]
    args = list(container["args"])
    args[args.index("--liveness") + 1] = f"http://127.0.0.1:{health_port}{deploy.HEALTH_PATH}"
    env = dict(os.environ, KUBECONFIG=kubeconfig, DW_RESYNC_SECONDS="2")
    log = open(log_path, "wb")
    return subprocess.Popen([sys.executable, "-m", "digital_worker", *args], env=env, stdout=log,
                            stderr=subprocess.STDOUT)


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{deploy.HEALTH_PATH}", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def test_operator_runs_with_the_platform_objects(tmp_path):
    from digital_worker.operator.emulator import EmulatedCluster
    from digital_worker.operator.kube import KubeClient

    with EmulatedCluster(pod_simulator=False, install_crd=False, nodes=[]) as cluster:
        kube = KubeClient.from_kubeconfig(str(cluster.kubeconfig_path))
        objects = platform_objects(PlatformSettings(namespace=NS, prometheus_mode="none", workers=(WORKER,)))
        applied = [obj for obj in objects.all() if obj["kind"] in SERVED_KINDS]
        assert {o["kind"] for o in applied} == SERVED_KINDS
        for obj in applied:
            kube.create(obj)

        port = free_port()
        first = start_operator(str(cluster.operator_kubeconfig_path), tmp_path / "operator-1.log", port)
        second = None
        try:
            wait_until(lambda: healthy(port), timeout=60, message="the operator's liveness endpoint never answered")
            # kopf registers itself in the platform's ClusterKopfPeering (leader election is live).
            peers = wait_until(
                lambda: (kube.get("kopf.dev/v1", "clusterkopfpeerings", None, deploy.PEERING_NAME).get("status") or {}),
                timeout=30, message="the operator never joined the peering object")
            assert len(peers) == 1
            # And it is not paused: it reconciles the DigitalWorker from stack config.
            wait_until(
                lambda: (kube.get("digitalworker.io/v1alpha1", "digitalworkers", "ai", "support-bot")
                         .get("status") or {}).get("phase"),
                timeout=60, message="the DigitalWorker was never reconciled")

            # A second replica of the same Deployment has the same priority: kopf pauses both.
            second = start_operator(str(cluster.operator_kubeconfig_path), tmp_path / "operator-2.log", free_port())
            wait_until(lambda: b"Pausing all operators" in (tmp_path / "operator-1.log").read_bytes(), timeout=60,
                       message="two equal-priority peers did not pause")
        finally:
            if second is not None:
                stop(second)
            stop(first)
        assert first.returncode is not None and (second is None or second.returncode is not None)
