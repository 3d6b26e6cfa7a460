"""Simulated SGLang replicas for the emulated cluster: one `runtime.sim` server per simulated pod.

The pod simulator calls this `PodRuntime` for each pod it starts. The replica is configured from the
very ConfigMap the operator rendered for the pod's revision (the same launch contract a real pod
reads), so what the operator asks for is what the simulated replica serves. Faults can be set per
revision (for bad-canary stories) before or while pods run.
"""
from __future__ import annotations

import json
import logging
from typing import Any

from digital_worker.operator import schema as api

logger = logging.getLogger(__name__)


class SimulatedSglangPods:
    def __init__(self, *, cold_start_seconds: float = 0.0, gpu_type: str | None = None) -> None:
        self.cold_start_seconds = cold_start_seconds
        self.gpu_type = gpu_type
        self.faults_by_revision: dict[str, dict[str, Any]] = {}
        self.servers: dict[str, Any] = {}
        self._emulator = None

    def bind(self, emulator) -> None:
        self._emulator = emulator

    def _configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        for (resource, ns, obj_name), obj in list(self._emulator.objects.items()):
            if resource.plural == "configmaps" and ns == namespace and obj_name == name and not obj.deleted:
                return obj.raw
        return None

    @staticmethod
    def _key(pod: dict[str, Any]) -> str:
        return f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"

    async def start(self, pod: dict[str, Any]) -> str | None:
        from digital_worker.runtime.contract import LaunchConfig
        from digital_worker.runtime.sim import SimConfig, SimulatedSGLang

        meta = pod["metadata"]
        volumes = (pod.get("spec") or {}).get("volumes") or []
        config_name = next((v["configMap"]["name"] for v in volumes if "configMap" in v), None)
        configmap = self._configmap(meta["namespace"], config_name) if config_name else None
        if configmap is None:
            return None  # not a DigitalWorker pod: nothing to run
        launch = LaunchConfig.from_dict(json.loads(configmap["data"]["runtime.json"]))
        revision = (meta.get("labels") or {}).get(api.LABEL_REVISION)
        node_selector = (pod.get("spec") or {}).get("nodeSelector") or {}
        config = SimConfig.from_launch_config(
            launch, host="127.0.0.1", port=0, revision=revision,
            gpu_type=self.gpu_type or node_selector.get(api.LABEL_GPU_TYPE),
            cold_start_seconds=self.cold_start_seconds,
        )
        server = SimulatedSGLang(config)
        await server.start()
        faults = self.faults_by_revision.get(revision or "")
        if faults:
            server.set_faults(**faults)
        self.servers[self._key(pod)] = server
        return server.url

    async def ready(self, pod: dict[str, Any]) -> bool:
        server = self.servers.get(self._key(pod))
        return server is None or server.ready

    async def stop(self, pod: dict[str, Any], grace_seconds: float = 0.0) -> None:
        server = self.servers.pop(self._key(pod), None)
        if server is not None:
            await server.stop(grace_seconds)

    def inject(self, revision: str, **faults: Any) -> None:
        """Faults for every replica of `revision`, now and for those started later."""
        self.faults_by_revision[revision] = {**self.faults_by_revision.get(revision, {}), **faults}
        for server in list(self.servers.values()):
            if server.config.revision == revision:
                server.set_faults(**faults)
