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


def test_both_transports_agree_on_a_big_node(kubelet):
    # ~2500 pods: a response of several hundred KB, many DATA frames, past the default 64 KB window.
    assignments = [(f"pod-{i:05d}", f"ns-{i % 7}", "main", "nvidia.com/gpu", [f"GPU-{i:08x}-aaaa-bbbb-cccc-dddddddddddd"])
                   for i in range(2500)]
    kubelet.servicer.set_pods(assignments)
    light = PodResourcesClient(kubelet.socket_path, transport="http2")
    heavy = PodResourcesClient(kubelet.socket_path, transport="grpcio")
    try:
        response = light.list()
        assert response.ByteSize() > 200_000
        assert response == heavy.list()
        owners = light.gpu_owners()
    finally:
        light.close()
        heavy.close()
    assert len(owners) == 2500
    assert owners["GPU-000009c3-aaaa-bbbb-cccc-dddddddddddd"] == (GpuOwner("pod-02499", "ns-0", "main"),)


def test_grpc_errors_and_dead_sockets_raise(kubelet, tmp_path):
    import grpc

    from digital_worker.agents.h2grpc import GrpcCallError, unary_call

    kubelet.servicer.fail_with = (grpc.StatusCode.UNAVAILABLE, "kubelet shutting down")
    with pytest.raises(GrpcCallError, match="without a response message"):
        PodResourcesClient(kubelet.socket_path).list()
    with pytest.raises(GrpcCallError):
        unary_call(kubelet.socket_path, "/v1.PodResourcesLister/NoSuchMethod", b"", timeout=5)
    import socket as socket_module

    stale = str(tmp_path / "stale.sock")
    listener = socket_module.socket(socket_module.AF_UNIX)
    listener.bind(stale)
    listener.close()  # the file stays, nobody listens: a kubelet that died
    with pytest.raises(GrpcCallError, match="cannot connect"):
        unary_call(stale, "/v1.PodResourcesLister/List", b"", timeout=2)


def test_the_light_transport_never_imports_grpcio(kubelet):
    import subprocess
    import sys

    kubelet.servicer.set_pods([("worker-a", "team", "sglang", "nvidia.com/gpu", [UUID0])])
    code = (
        "import sys\n"
        "from digital_worker.agents.agent import AgentConfig, NodeAgent\n"
        "from digital_worker.agents import nvml_fake\n"
        "nvml_fake.fake_configure(gpus=1)\n"
        f"agent = NodeAgent(AgentConfig(pod_resources_socket={kubelet.socket_path!r}), nvml=nvml_fake)\n"
        "agent.collector.start(); agent.collect_once()\n"
        "assert 'pod=\"worker-a\"' in agent.metrics_body.decode()\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('grpc', 'kopf', 'statsmodels', 'pulumi', 'prometheus_client', 'kubernetes', 'aiohttp'))\n"
        "heavy += [m for m in sys.modules if m.startswith('digital_worker.') and "
        "not m.startswith('digital_worker.agents')]\n"
        "print(heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
