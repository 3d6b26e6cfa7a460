"""Which pod holds which GPU: the kubelet's PodResources API (v1) over its unix socket.

The kubelet serves ``v1.PodResourcesLister`` on ``/var/lib/kubelet/pod-resources/kubelet.sock``;
``List`` returns every pod with the device IDs its containers were given. For ``nvidia.com/gpu`` the
NVIDIA device plugin hands out GPU UUIDs (``GPU-…``); with time-slicing they carry a ``::<n>``
replica suffix, which we strip. The call goes over our own small HTTP/2 client (h2grpc) unless
the grpcio transport is asked for; protobuf is imported only once the socket exists.
"""
from __future__ import annotations

import logging
import os
import time

from digital_worker.agents.collector import GpuOwner

log = logging.getLogger("digital_worker.agents.podresources")

DEFAULT_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"
GPU_RESOURCE_PREFIXES = ("nvidia.com/gpu", "nvidia.com/mig-")


def gpu_owners_from_response(response, resource_prefixes=GPU_RESOURCE_PREFIXES) -> dict[str, tuple[GpuOwner, ...]]:
    """Map device ID (GPU UUID or index) -> the containers that hold it, from a ListPodResourcesResponse."""
    owners: dict[str, list[GpuOwner]] = {}
    for pod in response.pod_resources:
        for container in pod.containers:
            for devices in container.devices:
                if not devices.resource_name.startswith(resource_prefixes):
                    continue
                for device_id in devices.device_ids:
                    gpu_id = device_id.split("::", 1)[0]
                    owner = GpuOwner(pod=pod.name, namespace=pod.namespace, container=container.name)
                    holders = owners.setdefault(gpu_id, [])
                    if owner not in holders:
                        holders.append(owner)
    return {gpu_id: tuple(holders) for gpu_id, holders in owners.items()}


class PodResourcesClient:
    """A small client of the kubelet's v1 PodResourcesLister on a unix socket.

    transport "http2" (default) speaks the one unary call itself (digital_worker.agents.h2grpc) and
    needs only protobuf; "grpcio" uses the generated stubs and costs about 18 MB more RSS.
    """

    LIST_METHOD = "/v1.PodResourcesLister/List"

    def __init__(self, socket_path: str = DEFAULT_SOCKET, timeout: float = 5.0, transport: str = "http2") -> None:
        from digital_worker.agents import api_pb2

        if transport not in ("http2", "grpcio"):
            raise ValueError(f"transport must be http2 or grpcio, got {transport!r}")
        self.socket_path = socket_path
        self.timeout = timeout
        self.transport = transport
        self._api = api_pb2
        self._channel = None
        if transport == "grpcio":
            import grpc

            from digital_worker.agents import api_pb2_grpc

            # The kubelet answers with the whole node's pods; a big node can exceed grpc's 4 MiB default.
            self._channel = grpc.insecure_channel(
                f"unix://{socket_path}", options=[("grpc.max_receive_message_length", 16 * 1024 * 1024)])
            self._stub = api_pb2_grpc.PodResourcesListerStub(self._channel)

    def list(self):
        request = self._api.ListPodResourcesRequest()
        if self._channel is not None:
            return self._stub.List(request, timeout=self.timeout)
        from digital_worker.agents.h2grpc import unary_call

        answer = unary_call(self.socket_path, self.LIST_METHOD, request.SerializeToString(), self.timeout)
        return self._api.ListPodResourcesResponse.FromString(answer)

    def gpu_owners(self) -> dict[str, tuple[GpuOwner, ...]]:
        return gpu_owners_from_response(self.list())

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()


class PodAttribution:
    """Keeps the GPU -> pod map fresh, refreshing at most every `refresh_seconds`.

    Without the socket (not on a kubelet node, or hostPath not mounted) there is no attribution:
    said once in the log, and `up` stays False. Errors and a vanished socket keep the last good map.
    """

    def __init__(self, socket_path: str | None = DEFAULT_SOCKET, refresh_seconds: float = 10.0,
                 transport: str = "http2") -> None:
        self.socket_path = socket_path
        self.transport = transport
        self.refresh_seconds = refresh_seconds
        self.owners: dict[str, tuple[GpuOwner, ...]] = {}
        self.up = False
        self._client: PodResourcesClient | None = None
        self._next_refresh = 0.0
        self._missing_logged = False
        self._error_logged = False

    def refresh(self, now: float | None = None) -> dict[str, tuple[GpuOwner, ...]]:
        now = time.monotonic() if now is None else now
        if now < self._next_refresh:
            return self.owners
        self._next_refresh = now + self.refresh_seconds
        if not self.socket_path or not os.path.exists(self.socket_path):
            if not self._missing_logged:
                if self.socket_path:
                    log.info("no kubelet PodResources socket at %s: GPU metrics carry no pod/namespace/"
                             "container labels", self.socket_path)
                else:
                    log.info("pod attribution disabled: GPU metrics carry no pod/namespace/container labels")
                self._missing_logged = True
            # A restarting kubelet removes and recreates its socket: keep the last map meanwhile.
            self.up = False
            return self.owners
        try:
            if self._client is None:
                self._client = PodResourcesClient(self.socket_path, transport=self.transport)
            self.owners = self._client.gpu_owners()
            self.up = True
            self._error_logged = False
        except Exception as exc:  # kubelet restarting: keep the last map, say so once per outage
            if not self._error_logged:
                log.warning("PodResources List on %s failed: %s", self.socket_path, exc)
                self._error_logged = True
            self.up = False
        return self.owners

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
