"""Simulated GPU node agents for the emulated cluster (`digital-worker dev` and tests).

The emulated cluster has GPU nodes but no node agents, so GPU health had nothing to read. Here each
emulated node gets the real node agent (agents/agent.py `NodeAgent`: the NVML collector, the XID
watcher, the exposition and the HTTP server) on loopback, with these stand-ins for the hardware
and the kubelet:

- NVML: agents/nvml_fake.py, loaded once per node as its own module instance (the fake keeps its
  GPUs in module state), configured with the node's GPU count and a per-node UUID seed.
- The kubelet's device manager: GPUs are handed to the emulated pods scheduled on the node
  (`spec.nodeName`, set by the pod simulator) for their `nvidia.com/gpu` limits, lowest free healthy
  index first, kept for the pod's life; a GPU the agent reports unhealthy is not handed out again
  (as the NVIDIA device plugin marks it Unhealthy). The agent reads that map where it would read the
  kubelet's PodResources answer, so its series carry `pod`, `namespace` and `container` as on a
  real node.

Each agent announces itself on its Node (annotation `digitalworker.io/sim-agent-endpoint`), which is
how the operator reads GPU health without Prometheus (gpu_health.agent_endpoints). With Prometheus,
scrape `scrape_targets()`.

Entry points (for dev.py and the tour; nothing else here is meant to be called from outside):

    from digital_worker.operator.simnodes import start_simulated_node_agents

    agents = start_simulated_node_agents(cluster)       # an EmulatedCluster that is running
    agents.scrape_targets()   # [{"targets": ["127.0.0.1:PORT"], "labels": {"node": "gpu-node-1"}}, ...]
    agents.prometheus_scrape_config()   # one scrape_configs entry (static_configs, honor_labels)
    fault = agents.inject_gpu_fault("support-bot-5f8c2d-abcde")   # XID 79 on that pod's first GPU
    agents.inject_gpu_fault("gpu-node-1", ecc=True)    # uncorrectable ECC on that node's first GPU in use
    fault.node, fault.gpu, fault.uuid, fault.pod         # what was hit
    agents.gpu_assignments()  # {(namespace, pod): (node, (gpu indices...))}
    agents.stop()             # or: with start_simulated_node_agents(cluster) as agents: ...

The operator's GPU health loop runs every 15 s, so a fault is acted on within about 15 s plus one
agent interval.
"""
from __future__ import annotations

import importlib.util
import itertools
import logging
import re
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from digital_worker.operator.gpu_health import AGENT_ENDPOINT_ANNOTATION
from digital_worker.operator.kube import KubeClient

logger = logging.getLogger("digital_worker.operator.simnodes")

GPU_RESOURCE = "nvidia.com/gpu"
AGENT_JOB = "digital-worker-gpu-agent"
_module_counter = itertools.count(1)


# ---------------------------------------------------------------- the device manager (pure)


def gpu_request(pod: Mapping[str, Any]) -> int:
    """GPUs a pod asks for: the sum of its containers' `nvidia.com/gpu` limits (or requests)."""
    total = 0
    for container in (pod.get("spec") or {}).get("containers") or []:
        resources = container.get("resources") or {}
        value = (resources.get("limits") or {}).get(GPU_RESOURCE, (resources.get("requests") or {}).get(GPU_RESOURCE, 0))
        try:
            total += int(str(value))
        except ValueError:
            continue
    return total


def allocate_gpus(current: Mapping[str, tuple[int, ...]], requests: Mapping[str, int], gpu_count: int,
                  unhealthy: Iterable[int] = ()) -> dict[str, tuple[int, ...]]:
    """Which GPU indices each pod on a node holds, like the kubelet's device manager.

    `current`: last allocation; `requests`: the pods on the node now and their GPU counts. A pod keeps
    what it has; pods gone free theirs; new pods get the lowest free healthy indices, in name
    order, or nothing when too few are free (the emulator schedules without counting GPUs)."""
    bad = set(unhealthy)
    kept = {pod: gpus for pod, gpus in current.items() if pod in requests}
    used = {gpu for gpus in kept.values() for gpu in gpus}
    for pod in sorted(requests):
        if pod in kept or requests[pod] <= 0:
            continue
        free = [gpu for gpu in range(gpu_count) if gpu not in used and gpu not in bad]
        if len(free) < requests[pod]:
            continue
        kept[pod] = tuple(free[:requests[pod]])
        used.update(kept[pod])
    return kept


# ---------------------------------------------------------------- the agents


@dataclass(frozen=True)
class GpuFault:
    """What `inject_gpu_fault` hit."""

    node: str
    gpu: int
    uuid: str
    pod: str | None
    kind: str  # "xid:79" or "ecc-uncorrectable"


class _EmulatedKubelet:
    """Stands where the agent's PodAttribution is: the GPU -> pod map of one node."""

    def __init__(self, fleet: SimulatedNodeAgents, node: str) -> None:
        self.fleet = fleet
        self.node = node
        self.up = True
        self.owners: dict[str, tuple[Any, ...]] = {}

    def refresh(self, now: float | None = None) -> dict[str, tuple[Any, ...]]:
        from digital_worker.agents.collector import GpuOwner

        self.fleet.sync()
        sim = self.fleet.nodes[self.node]
        owners: dict[str, list[GpuOwner]] = {}
        for (namespace, pod), gpus in sim.allocations.items():
            container = sim.containers.get((namespace, pod), "sglang")
            for gpu in gpus:
                owners.setdefault(sim.uuid(gpu), []).append(GpuOwner(pod=pod, namespace=namespace, container=container))
        self.owners = {uuid: tuple(holders) for uuid, holders in owners.items()}
        return self.owners

    def close(self) -> None:
        return None


class _SimNode:
    def __init__(self, name: str, gpus: int, seed: int, interval: float) -> None:
        from digital_worker.agents import nvml_fake
        from digital_worker.agents.agent import AgentConfig, NodeAgent

        self.name = name
        self.gpu_count = gpus
        # A module instance of its own: the fake keeps its GPUs in module state.
        spec = importlib.util.spec_from_file_location(
            f"digital_worker.agents._sim_nvml_{next(_module_counter)}_{re.sub(r'[^a-zA-Z0-9_]', '_', name)}",
            nvml_fake.__file__)
        assert spec is not None and spec.loader is not None
        self.nvml = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.nvml)
        self.nvml.fake_configure(gpus=gpus, uuid_seed=seed)
        self.agent = NodeAgent(AgentConfig(port=0, listen_address="127.0.0.1", interval=interval, node_name=name,
                                           pod_resources_socket=None), nvml=self.nvml)
        self.allocations: dict[tuple[str, str], tuple[int, ...]] = {}
        self.containers: dict[tuple[str, str], str] = {}
        self.port = 0

    def uuid(self, gpu: int) -> str:
        return self.nvml._state.devices[gpu].uuid

    def unhealthy(self) -> set[int]:
        return {device.index for device in self.agent.collector.devices if not device.healthy}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class SimulatedNodeAgents:
    """One real node agent per emulated GPU node; see the module docstring for the API."""

    def __init__(self, kube: KubeClient, nodes: Iterable[tuple[str, int]], *, interval: float = 1.0,
                 refresh_seconds: float = 0.5) -> None:
        self.kube = kube
        self.interval = interval
        self.refresh_seconds = refresh_seconds
        self.nodes = {name: _SimNode(name, gpus, seed, interval)
                      for seed, (name, gpus) in enumerate(nodes, start=1)}
        self._lock = threading.Lock()
        self._synced_at = 0.0
        self._started = False

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> SimulatedNodeAgents:
        for sim in self.nodes.values():
            sim.agent.attribution = _EmulatedKubelet(self, sim.name)
            sim.port = sim.agent.start()
            self._announce(sim.name, sim.url)
        self._started = True
        logger.info("simulated node agents: %s", ", ".join(f"{s.name}={s.url}" for s in self.nodes.values()))
        return self

    def stop(self) -> None:
        for sim in self.nodes.values():
            if sim.port:
                self._announce(sim.name, None)
                sim.agent.stop()
                sim.port = 0
        self._started = False

    def __enter__(self) -> SimulatedNodeAgents:
        return self if self._started else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _announce(self, node: str, url: str | None) -> None:
        try:
            self.kube.patch("v1", "nodes", None, node, {"metadata": {"annotations": {AGENT_ENDPOINT_ANNOTATION: url}}})
        except Exception as exc:  # a cluster already gone on stop is fine
            logger.debug("could not annotate node %s: %s", node, exc)

    # --- the kubelet's view -----------------------------------------------------------------------
    def sync(self, force: bool = False) -> None:
        """Refresh every node's GPU allocations from the API's pods (at most every refresh_seconds)."""
        with self._lock:
            now = time.monotonic()
            if not force and now - self._synced_at < self.refresh_seconds:
                return
            try:
                pods = self.kube.list("v1", "pods")
            except Exception as exc:  # keep the last map, like the agent does when the kubelet hiccups
                logger.debug("listing pods failed: %s", exc)
                return
            self._synced_at = now
            by_node: dict[str, dict[tuple[str, str], int]] = {name: {} for name in self.nodes}
            containers: dict[tuple[str, str], str] = {}
            for pod in pods:
                node = (pod.get("spec") or {}).get("nodeName")
                phase = (pod.get("status") or {}).get("phase")
                if node not in by_node or phase in ("Succeeded", "Failed"):
                    continue
                key = (pod["metadata"]["namespace"], pod["metadata"]["name"])
                by_node[node][key] = gpu_request(pod)
                holders = [c.get("name", "") for c in (pod.get("spec") or {}).get("containers") or []
                           if (c.get("resources") or {}).get("limits", {}).get(GPU_RESOURCE)]
                containers[key] = holders[0] if holders else "main"
            for name, sim in self.nodes.items():
                sim.allocations = allocate_gpus(sim.allocations, by_node[name], sim.gpu_count, sim.unhealthy())
                sim.containers = {key: containers[key] for key in sim.allocations}

    def gpu_assignments(self) -> dict[tuple[str, str], tuple[str, tuple[int, ...]]]:
        """{(namespace, pod): (node, GPU indices)} as the agents attribute them now."""
        self.sync()
        return {key: (name, gpus) for name, sim in self.nodes.items() for key, gpus in sim.allocations.items()}

    # --- faults -----------------------------------------------------------------------------------
    def inject_gpu_fault(self, node_or_pod: str, xid: int = 79, *, ecc: bool = False,
                         gpu: int | None = None) -> GpuFault:
        """Break one GPU as the driver would report it: an XID critical error event (default 79, fell
        off the bus) or, with `ecc=True`, uncorrectable ECC errors. `node_or_pod` is a node name, a
        pod name or `namespace/pod`; for a pod its first GPU, for a node `gpu` or else the first GPU
        a pod holds there (else GPU 0). Raises KeyError when nothing matches."""
        self.sync(force=True)
        node, pod = self._locate(node_or_pod, gpu)
        sim = self.nodes[node]
        if gpu is None:
            held = sorted((gpus[0], key) for key, gpus in sim.allocations.items()
                          if pod is None or key == pod)
            gpu, owner = held[0] if held else (0, None)
            pod = pod or owner
        if not 0 <= gpu < sim.gpu_count:
            raise KeyError(f"node {node} has no GPU {gpu}")
        if ecc:
            sim.nvml.fake_set(gpu, ecc_dbe_volatile=1, ecc_dbe_aggregate=1)
            kind = "ecc-uncorrectable"
        else:
            sim.nvml.fake_inject_xid(gpu, xid)
            kind = f"xid:{xid}"
        fault = GpuFault(node, gpu, sim.uuid(gpu), pod[1] if pod else None, kind)
        logger.info("injected %s on %s GPU %d (%s)%s", kind, node, gpu, fault.uuid, f" held by {fault.pod}" if pod else "")
        return fault

    def _locate(self, target: str, gpu: int | None) -> tuple[str, tuple[str, str] | None]:
        if target in self.nodes:
            return target, None
        namespace, _, name = target.rpartition("/")
        for node, sim in self.nodes.items():
            for key in sim.allocations:
                if key[1] == name and (not namespace or key[0] == namespace):
                    return node, key
        raise KeyError(f"{target!r} is neither a simulated node nor a pod holding a GPU on one")

    # --- Prometheus -------------------------------------------------------------------------------
    def scrape_targets(self) -> list[dict[str, Any]]:
        """Prometheus targets (file_sd / static_configs shape), one per agent, with the label the
        platform's scrape configs add (`node`, from the pod's node name)."""
        return [{"targets": [f"127.0.0.1:{sim.port}"], "labels": {"node": sim.name}} for sim in self.nodes.values()]

    def prometheus_scrape_config(self, job: str = AGENT_JOB, interval: str = "5s") -> dict[str, Any]:
        """A `scrape_configs` entry for these agents. honor_labels keeps the GPU owner's `pod` and
        `namespace` (as the platform's PodMonitor does)."""
        return {"job_name": job, "scrape_interval": interval, "honor_labels": True,
                "static_configs": self.scrape_targets()}


def start_simulated_node_agents(cluster: Any, *, interval: float = 1.0, nodes: Iterable[Any] | None = None) -> SimulatedNodeAgents:
    """Start a node agent for each GPU node of a running EmulatedCluster (or `nodes`: objects with
    `name` and `gpus`, e.g. the cluster's SimulatedNode list) and announce them on their Nodes."""
    kube = KubeClient.from_kubeconfig(str(cluster.kubeconfig_path))
    chosen = [(node.name, int(node.gpus)) for node in (nodes if nodes is not None else cluster.nodes) if node.gpus > 0]
    return SimulatedNodeAgents(kube, chosen, interval=interval).start()
