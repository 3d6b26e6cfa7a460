"""The GpuHost provider through Pulumi's own dynamic-provider host, over gRPC, as the engine drives it.

`python -m pulumi.dynamic` is the process the Pulumi engine starts for dynamic resources: it
unpickles the provider from the `__provider` property and serves Check/Create/Diff/Update/Delete.
We play the engine's part (no Pulumi CLI here) against real sshd hosts, so pickling by
reference, property (de)serialisation and error reporting are the real ones.
"""
from __future__ import annotations

import asyncio
import subprocess
import sys

import grpc
import pytest
from google.protobuf import struct_pb2
from pulumi.dynamic.dynamic import serialize_provider
from pulumi.runtime import proto, rpc
from pulumi.runtime.proto import provider_pb2_grpc

from digital_worker.stacks.onprem import GpuHostProvider
from stacks_fakehosts import FakeFleet, has_tools

pytestmark = pytest.mark.skipif(not has_tools(), reason="needs root, unshare and Debian's openssh-server")

URN = "urn:pulumi:test::digital-worker::digitalworker:stacks:OnPremGpuNodes$pulumi-python:dynamic/digitalworker:GpuHost::{}"
TOKEN = "K10-grpc-token-7c1e5a9b"


def to_struct(props: dict) -> struct_pb2.Struct:
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(rpc.serialize_properties(props, {}))
    finally:
        loop.close()


def from_struct(struct: struct_pb2.Struct) -> dict:
    return rpc.deserialize_properties(struct)


@pytest.fixture
def dynamic_host():
    """Pulumi's dynamic provider host process, stopped by its pid afterwards."""
    process = subprocess.Popen([sys.executable, "-m", "pulumi.dynamic"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    try:
        port = int(process.stdout.readline().decode().strip())
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        yield provider_pb2_grpc.ResourceProviderStub(channel), process
        channel.close()
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def fleet(tmp_path):
    fleet = FakeFleet(tmp_path)
    try:
        yield fleet
    finally:
        fleet.stop()


def test_engine_lifecycle_through_the_dynamic_provider_host(fleet, dynamic_host):
    stub, process = dynamic_host
    host = fleet.add_host("gpu-a")
    props = {
        "__provider": serialize_provider(GpuHostProvider()),
        "node_name": "gpu-a", "role": "server", "address": "127.0.0.1", "port": host.port, "user": "root",
        "private_key": fleet.private_key, "host_key": host.host_key, "installer_script": fleet.installer,
        "k3s_token": TOKEN, "labels": {"pool": "prod"}, "taints": ["nvidia.com/gpu=present:NoSchedule"],
        "node_ready_timeout": 5, "kubeconfig": None, "gpu_product": None,
    }
    urn = URN.format("gpu-a")
    check = stub.Check(proto.CheckRequest(urn=urn, olds=to_struct({}), news=to_struct(props)))
    assert list(check.failures) == []

    created = stub.Create(proto.CreateRequest(urn=urn, properties=check.inputs))
    outs = from_struct(created.properties)
    assert created.id == f"gpu-a@127.0.0.1:{host.port}"
    assert outs["gpu_product"] == "NVIDIA A100-SXM4-80GB"
    assert outs["applied_labels"]["digitalworker.io/gpu-type"] == "nvidia-a100-80gb"
    assert outs["server_url"] == "https://127.0.0.1:6443"
    assert fleet.node("gpu-a")["metadata"]["labels"]["pool"] == "prod"

    # Re-running with the same inputs: the engine asks Diff and gets "no changes".
    diff = stub.Diff(proto.DiffRequest(id=created.id, urn=urn, olds=created.properties, news=check.inputs))
    assert diff.changes == proto.DiffResponse.DIFF_NONE

    news = dict(props, labels={"pool": "batch"})
    diff = stub.Diff(proto.DiffRequest(id=created.id, urn=urn, olds=created.properties, news=to_struct(news)))
    assert diff.changes == proto.DiffResponse.DIFF_SOME and list(diff.replaces) == []
    updated = stub.Update(proto.UpdateRequest(id=created.id, urn=urn, olds=created.properties, news=to_struct(news)))
    assert from_struct(updated.properties)["applied_labels"]["pool"] == "batch"
    assert fleet.node("gpu-a")["metadata"]["labels"]["pool"] == "batch"

    moved = dict(props, address="10.9.9.9")
    diff = stub.Diff(proto.DiffRequest(id=created.id, urn=urn, olds=updated.properties, news=to_struct(moved)))
    assert list(diff.replaces) == ["address"] and diff.deleteBeforeReplace is True

    stub.Delete(proto.DeleteRequest(id=created.id, urn=urn, properties=updated.properties))
    assert fleet.node("gpu-a") is None and not host.k3s_installed()
    assert fleet.installs() == ["gpu-a server", "uninstalled"]


def test_failures_reach_the_engine_as_clear_errors_without_secrets(fleet, dynamic_host):
    stub, process = dynamic_host
    host = fleet.add_host("gpu-a", gpu=None)
    props = {
        "__provider": serialize_provider(GpuHostProvider()),
        "node_name": "gpu-a", "role": "server", "address": "127.0.0.1", "port": host.port,
        "private_key": fleet.private_key, "host_key": host.host_key, "installer_script": fleet.installer,
        "k3s_token": TOKEN,
    }
    with pytest.raises(grpc.RpcError) as failure:
        stub.Create(proto.CreateRequest(urn=URN.format("gpu-a"), properties=to_struct(props)))
    details = failure.value.details()
    assert "host gpu-a: NVIDIA driver missing" in details
    assert TOKEN not in details and fleet.private_key.splitlines()[1] not in details

    bad = dict(props, node_name="GPU_A", host_key=None)
    check = stub.Check(proto.CheckRequest(urn=URN.format("GPU_A"), olds=to_struct({}), news=to_struct(bad)))
    reasons = [f.reason for f in check.failures]
    assert any("not a valid node name" in r for r in reasons) and any("hostKey" in r for r in reasons)
    assert process.poll() is None  # a failed resource never takes the provider host down


def test_preview_check_accepts_values_not_known_yet(dynamic_host):
    """During preview an agent's server URL, token and the server's host key are still unknown."""
    stub, _ = dynamic_host
    props = {
        "__provider": serialize_provider(GpuHostProvider()),
        "node_name": "gpu-b", "role": "agent", "address": "10.0.0.12", "port": 22,
        "private_key": "key-text", "host_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG9n5q0j8Gv8r2bZt3o8Qb2yL1tX2m2v0qkq3T9aJ1cV",
        "server_url": rpc.UNKNOWN, "k3s_token": rpc.UNKNOWN,
        "server": {"address": "10.0.0.11", "port": 22, "user": "root", "host_key": rpc.UNKNOWN},
    }
    check = stub.Check(proto.CheckRequest(urn=URN.format("gpu-b"), olds=to_struct({}), news=to_struct(props)))
    assert [f.reason for f in check.failures] == []
    # Known but wrong values are still refused in the same preview.
    bad = dict(props, taints=["no-effect"])
    check = stub.Check(proto.CheckRequest(urn=URN.format("gpu-b"), olds=to_struct({}), news=to_struct(bad)))
    assert any("taint 'no-effect'" in f.reason for f in check.failures)
