"""The checked-in gRPC/protobuf modules are exactly what api.proto generates."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from digital_worker.agents import protogen

pytest.importorskip("grpc_tools")

VERSION_LINES = re.compile(
    r"^(# Protobuf Python Version: .*|GRPC_GENERATED_VERSION = .*|    \d+,)$", re.MULTILINE)


def test_regenerating_gives_the_checked_in_files(tmp_path):
    import grpc_tools
    from importlib.metadata import version

    generated = protogen.generate(tmp_path)
    checked_in = {path.name: (protogen.AGENTS_DIR / path.name).read_text() for path in generated}
    fresh = {path.name: path.read_text() for path in generated}
    assert set(fresh) == {"api_pb2.py", "api_pb2_grpc.py", "api_pb2.pyi"}
    recorded = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", checked_in["api_pb2_grpc.py"]).group(1)
    if recorded == version("grpcio-tools"):
        assert fresh == checked_in, "run: python -m digital_worker.agents.protogen"
    else:
        # Another grpcio-tools release stamps other version numbers; everything else must match.
        for name in fresh:
            assert VERSION_LINES.sub("", fresh[name]) == VERSION_LINES.sub("", checked_in[name]), name


def test_stubs_speak_the_kubelet_service_name():
    from digital_worker.agents import api_pb2, api_pb2_grpc

    service = api_pb2.DESCRIPTOR.services_by_name["PodResourcesLister"]
    assert service.full_name == "v1.PodResourcesLister"
    assert {method.name for method in service.methods} == {"List", "GetAllocatableResources", "Get"}
    stub_source = Path(api_pb2_grpc.__file__).read_text()
    assert "'/v1.PodResourcesLister/List'" in stub_source
    assert "from digital_worker.agents import api_pb2" in stub_source
    fields = {f.name: f.number for f in api_pb2.ContainerDevices.DESCRIPTOR.fields}
    assert fields == {"resource_name": 1, "device_ids": 2, "topology": 3}
    assert {f.name: f.number for f in api_pb2.PodResources.DESCRIPTOR.fields} == {
        "name": 1, "namespace": 2, "containers": 3}
