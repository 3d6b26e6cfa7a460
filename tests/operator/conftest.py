"""End-to-end fixtures: the emulated API (kmock over HTTP) and the real kopf operator on a thread."""
from __future__ import annotations

import uuid

import pytest

from digital_worker.operator.emulator import EmulatedCluster, SimulatedNode
from digital_worker.operator.kube import KubeClient


@pytest.fixture(scope="session")
def cluster():
    # Workers of every test in the session stay until the end: room enough that no rollout waits for GPUs
    # (test_operator_bluegreen_e2e has its own small cluster for that).
    with EmulatedCluster(pod_startup_seconds=0.3, nodes=[SimulatedNode(f"gpu-node-{i}", gpus=64) for i in range(4)]) as emulated:
        yield emulated


@pytest.fixture(scope="session")
def operator(cluster):
    from digital_worker.operator.runner import OperatorThread

    with OperatorThread(str(cluster.operator_kubeconfig_path), resync_seconds=2) as running:
        yield running


@pytest.fixture
def kube(cluster) -> KubeClient:
    return KubeClient.from_kubeconfig(str(cluster.kubeconfig_path))


@pytest.fixture
def namespace(kube) -> str:
    name = f"t-{uuid.uuid4().hex[:8]}"
    kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    return name
