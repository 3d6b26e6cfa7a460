"""A stand-in kubelet for tests: a real gRPC server on a unix socket speaking the kubelet's v1
PodResources protobuf (the only thing the agent needs from the kubelet)."""
from __future__ import annotations

import threading
from concurrent import futures

import grpc

from digital_worker.agents import api_pb2, api_pb2_grpc


class PodResourcesServicer(api_pb2_grpc.PodResourcesListerServicer):
    def __init__(self) -> None:
        self.pods: list[api_pb2.PodResources] = []
        self.calls = 0
        self.fail_with: tuple | None = None  # (grpc.StatusCode, details): answer with that error
        self.lock = threading.Lock()

    def set_pods(self, assignments: list[tuple[str, str, str, str, list[str]]]) -> None:
        """assignments: (pod, namespace, container, resource name, device ids)."""
        pods: dict[tuple[str, str], api_pb2.PodResources] = {}
        for pod, namespace, container, resource, device_ids in assignments:
            message = pods.setdefault((pod, namespace), api_pb2.PodResources(name=pod, namespace=namespace))
            message.containers.append(api_pb2.ContainerResources(
                name=container, devices=[api_pb2.ContainerDevices(resource_name=resource, device_ids=device_ids)],
                cpu_ids=[2, 3]))
        with self.lock:
            self.pods = list(pods.values())

    def List(self, request, context):
        if self.fail_with is not None:
            context.abort(*self.fail_with)
        with self.lock:
            self.calls += 1
            return api_pb2.ListPodResourcesResponse(pod_resources=self.pods)


class FakeKubelet:
    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.servicer = PodResourcesServicer()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        api_pb2_grpc.add_PodResourcesListerServicer_to_server(self.servicer, self.server)
        self.server.add_insecure_port(f"unix://{socket_path}")

    def __enter__(self) -> "FakeKubelet":
        self.server.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.stop(grace=None).wait(5)
