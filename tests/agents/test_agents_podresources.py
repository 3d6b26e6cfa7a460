"""PodResources client against a real gRPC server on a unix socket speaking the kubelet's protobuf."""
from __future__ import annotations

import os

import pytest
from kubelet_fake import FakeKubelet

from digital_worker.agents import api_pb2, nvml_fake
from digital_worker.agents.agent import AgentConfig, NodeAgent
from digital_worker.agents.collector import GpuOwner
from digital_worker.agents.podresources import PodAttribution, PodResourcesClient, gpu_owners_from_response

UUID0 = "GPU-fa4e0000-0000-4000-8000-000000000000"
UUID1 = "GPU-fa4e0000-0000-4000-8000-000000000001"


@pytest.fixture
def kubelet(tmp_path):
    # unix socket paths are limited to 107 bytes: keep it short
    path = f"/tmp/dw-kubelet-{os.getpid()}-{id(tmp_path) % 10000}.sock"
    with FakeKubelet(path) as server:
        yield server
    if os.path.exists(path):
        os.unlink(path)


def test_list_over_the_unix_socket(kubelet):
    kubelet.servicer.set_pods([
        ("worker-a", "team", "sglang", "nvidia.com/gpu", [UUID0]),
        ("worker-b", "team", "sglang", "nvidia.com/gpu", [UUID1]),
        ("worker-b", "team", "sidecar", "example.com/nic", ["nic0"]),  # not a GPU
        ("shared", "other", "main", "nvidia.com/gpu", [f"{UUID0}::3"]),  # time-sliced replica of GPU 0
    ])
    client = PodResourcesClient(kubelet.socket_path)
    try:
        response = client.list()
        assert isinstance(response, api_pb2.ListPodResourcesResponse)
        assert {pod.name for pod in response.pod_resources} == {"worker-a", "worker-b", "shared"}
        owners = client.gpu_owners()
    finally:
        client.close()
    assert owners == {
        UUID0: (GpuOwner("worker-a", "team", "sglang"), GpuOwner("shared", "other", "main")),
        UUID1: (GpuOwner("worker-b", "team", "sglang"),),
    }


def test_response_decodes_what_the_kubelet_encodes():
    # Bytes as the kubelet would send them (built field by field, then parsed back).
    pod = api_pb2.PodResources(name="p", namespace="n", containers=[api_pb2.ContainerResources(
        name="c", devices=[api_pb2.ContainerDevices(resource_name="nvidia.com/gpu", device_ids=["GPU-1", "GPU-2"],
                                                     topology=api_pb2.TopologyInfo(nodes=[api_pb2.NUMANode(ID=1)]))])])
    wire = api_pb2.ListPodResourcesResponse(pod_resources=[pod]).SerializeToString()
    # Field 1 of ListPodResourcesResponse, length-delimited (tag 0x0a): the kubelet's wire layout.
    assert wire[0] == 0x0A
    decoded = api_pb2.ListPodResourcesResponse.FromString(wire)
    assert gpu_owners_from_response(decoded) == {"GPU-1": (GpuOwner("p", "n", "c"),), "GPU-2": (GpuOwner("p", "n", "c"),)}


def test_attribution_refreshes_at_most_every_interval_and_keeps_last_map(kubelet):
    kubelet.servicer.set_pods([("worker-a", "team", "sglang", "nvidia.com/gpu", [UUID0])])
    attribution = PodAttribution(kubelet.socket_path, refresh_seconds=10)
    try:
        assert attribution.refresh(now=100.0)[UUID0][0].pod == "worker-a"
        assert attribution.up
        kubelet.servicer.set_pods([("worker-z", "team", "sglang", "nvidia.com/gpu", [UUID0])])
        assert attribution.refresh(now=105.0)[UUID0][0].pod == "worker-a"  # cached
        assert kubelet.servicer.calls == 1
        assert attribution.refresh(now=111.0)[UUID0][0].pod == "worker-z"
        assert kubelet.servicer.calls == 2
        kubelet.server.stop(grace=None).wait(5)  # kubelet restarting
        assert attribution.refresh(now=122.0)[UUID0][0].pod == "worker-z"
        assert not attribution.up
    finally:
        attribution.close()


def test_without_the_socket_labels_are_omitted_and_said_once(tmp_path, caplog):
    attribution = PodAttribution(str(tmp_path / "missing.sock"), refresh_seconds=0)
    with caplog.at_level("INFO", logger="digital_worker.agents.podresources"):
        for now in range(3):
            assert attribution.refresh(now=float(now)) == {}
    assert not attribution.up
    assert sum("no kubelet PodResources socket" in r.getMessage() for r in caplog.records) == 1


def test_agent_labels_gpu_series_with_the_pod(kubelet):
    nvml_fake.fake_configure(gpus=2)
    kubelet.servicer.set_pods([("worker-a", "team", "sglang", "nvidia.com/gpu", [UUID1])])
    agent = NodeAgent(AgentConfig(port=0, listen_address="127.0.0.1", node_name="gpu-node-1",
                                  pod_resources_socket=kubelet.socket_path), nvml=nvml_fake)
    agent.collector.start()
    try:
        agent.collect_once()
        text = agent.metrics_body.decode()
    finally:
        agent.stop()
    assert ('DCGM_FI_DEV_GPU_UTIL{gpu="1",UUID="' + UUID1 + '",device="nvidia1",modelName="NVIDIA H100 80GB HBM3",'
            'Hostname="gpu-node-1",pci_bus_id="00000000:19:00.0",DCGM_FI_DRIVER_VERSION="560.35.03",'
            'container="sglang",namespace="team",pod="worker-a"} 38') in text
    assert 'digital_worker_pod_resources_up{Hostname="gpu-node-1"} 1' in text
    gpu0 = [line for line in text.splitlines() if line.startswith('DCGM_FI_DEV_GPU_UTIL{gpu="0"')]
    assert gpu0 and 'pod="' not in gpu0[0]
