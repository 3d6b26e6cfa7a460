"""GPU health of a DigitalWorker's replicas: which pods to replace and which nodes to taint.

The node agent (and dcgm-exporter, under the same names) reports per GPU: the last XID
(`DCGM_FI_DEV_XID_ERRORS`), uncorrectable volatile ECC errors (`DCGM_FI_DEV_ECC_DBE_VOL_TOTAL`), row
remap failures (`DCGM_FI_DEV_ROW_REMAP_FAILURE`) and our `digital_worker_gpu_healthy`, labelled with
the pod that holds the GPU. `decide` turns those samples plus the worker's pods into a frozen
decision: delete the pods on bad GPUs (their Deployment reschedules them), taint the nodes
`digitalworker.io/gpu-unhealthy=<xid>:NoSchedule` so nothing new lands there, emit Events, and never
take more than `max_unavailable_share` of the replicas down at once (a flood of faults across many
nodes is held back and reported, not obeyed).

`decide` is pure; `fetch_gpu_health` (Prometheus over plain HTTP), `fetch_gpu_health_from_agents`
(the node agents' own /metrics, for an operator without Prometheus) and `apply_gpu_health_decision`
(the kubernetes client) are the only parts that talk to anything, at the bottom. `fetch_gpu_load`
gives the autoscaling policy GPU utilisation and memory as optional extra signals.
"""
from __future__ import annotations

import datetime
import json
import math
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

# The node agent keeps an identical copy (digital_worker.agents.collector.FATAL_XIDS; agents import
# nothing from the operator, a test keeps the two equal). 48: double-bit ECC; 63/64: row remapping
# recorded/failed; 74: NVLink error; 79: GPU fell off the bus; 94/95: contained/uncontained ECC.
FATAL_XIDS = frozenset({48, 63, 64, 74, 79, 94, 95})
TAINT_KEY = "digitalworker.io/gpu-unhealthy"
TAINT_EFFECT = "NoSchedule"

METRIC_XID = "DCGM_FI_DEV_XID_ERRORS"
METRIC_UNCORRECTABLE_ECC = "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL"
METRIC_REMAP_FAILURE = "DCGM_FI_DEV_ROW_REMAP_FAILURE"
METRIC_HEALTHY = "digital_worker_gpu_healthy"
HEALTH_METRICS = (METRIC_XID, METRIC_UNCORRECTABLE_ECC, METRIC_REMAP_FAILURE, METRIC_HEALTHY)
HEALTH_QUERY = '{__name__=~"' + "|".join(HEALTH_METRICS) + '"}'


# --- inputs ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GpuHealthSample:
    """What Prometheus knows about one GPU (and the pod holding it, when attributed)."""

    node: str
    gpu: str
    uuid: str
    pod: str | None = None
    namespace: str | None = None
    xid: int = 0
    uncorrectable_ecc: float = 0.0
    remap_failure: bool = False
    healthy: bool | None = None  # None: no digital_worker_gpu_healthy (a plain dcgm-exporter)

    def fault(self, fatal_xids: frozenset[int] = FATAL_XIDS) -> str | None:
        """The taint value naming what is wrong (the XID when there is one), or None if healthy."""
        if self.xid in fatal_xids:
            return str(self.xid)
        if self.uncorrectable_ecc > 0:
            return "ecc-uncorrectable"
        if self.remap_failure:
            return "row-remap-failure"
        if self.healthy is False:
            return "gpu-unhealthy"
        return None


@dataclass(frozen=True)
class PodInfo:
    name: str
    node: str
    ready: bool
    terminating: bool = False  # deletionTimestamp set: already on its way out (e.g. after an operator restart)


@dataclass(frozen=True)
class GpuHealthState:
    """Memory between reconciles: pods we already deleted (a terminating pod is still listed for a
    while, and must be neither deleted again nor counted as available) and pods already reported as
    held back (one Event per hold, not one per reconcile)."""

    replaced_pods: frozenset[str] = frozenset()
    held_back_pods: frozenset[str] = frozenset()


@dataclass(frozen=True)
class GpuHealthContext:
    namespace: str
    pods: tuple[PodInfo, ...]
    samples: tuple[GpuHealthSample, ...]
    tainted_nodes: frozenset[str] = frozenset()
    replicas: int = 1
    max_unavailable_share: float = 0.25
    fatal_xids: frozenset[int] = FATAL_XIDS
    state: GpuHealthState = field(default_factory=GpuHealthState)


# --- outputs --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PodReplacement:
    pod: str
    node: str
    fault: str
    gpu: str
    uuid: str


@dataclass(frozen=True)
class NodeTaint:
    node: str
    value: str
    key: str = TAINT_KEY
    effect: str = TAINT_EFFECT

    def as_dict(self) -> dict[str, str]:
        return {"key": self.key, "value": self.value, "effect": self.effect}


@dataclass(frozen=True)
class GpuHealthEvent:
    involved_kind: str  # "Pod" or "Node"
    involved_name: str
    reason: str
    message: str
    type: str = "Warning"


@dataclass(frozen=True)
class GpuHealthDecision:
    delete_pods: tuple[PodReplacement, ...] = ()
    taint_nodes: tuple[NodeTaint, ...] = ()
    events: tuple[GpuHealthEvent, ...] = ()
    held_back: tuple[PodReplacement, ...] = ()
    max_unavailable: int = 0

    @property
    def idle(self) -> bool:
        return not (self.delete_pods or self.taint_nodes or self.events)


def describe_fault(fault: str) -> str:
    if fault.isdigit():
        return f"fatal XID {fault}"
    return {"ecc-uncorrectable": "uncorrectable ECC errors", "row-remap-failure": "a row remapping failure",
            "gpu-unhealthy": "reported unhealthy by the node agent"}.get(fault, fault)


def max_unavailable(replicas: int, share: float) -> int:
    """Replicas that may be down at once: the share rounded down, but at least one, or a one-replica
    worker on a dead GPU could never heal."""
    return max(1, math.floor(max(0.0, share) * max(0, replicas) + 1e-9))


def decide(context: GpuHealthContext) -> tuple[GpuHealthDecision, GpuHealthState]:
    fatal = context.fatal_xids
    faulty = sorted(((sample, sample.fault(fatal)) for sample in context.samples if sample.fault(fatal)),
                    key=lambda item: (item[0].node, _gpu_order(item[0].gpu), item[0].uuid))

    # Nodes: taint each faulty node once, named after its first faulty GPU.
    taints: dict[str, NodeTaint] = {}
    events: list[GpuHealthEvent] = []
    for sample, fault in faulty:
        if sample.node and sample.node not in context.tainted_nodes and sample.node not in taints:
            taints[sample.node] = NodeTaint(sample.node, fault)
            events.append(GpuHealthEvent(
                "Node", sample.node, "GpuUnhealthy",
                f"GPU {sample.gpu} ({sample.uuid}) reported {describe_fault(fault)}; tainting node "
                f"{TAINT_KEY}={fault}:{TAINT_EFFECT}"))

    # Pods: only this worker's pods that an attributed GPU sample points at.
    pods = {pod.name: pod for pod in context.pods}
    replaced = (context.state.replaced_pods & pods.keys()) | {pod.name for pod in context.pods if pod.terminating}
    candidates: dict[str, PodReplacement] = {}
    for sample, fault in faulty:
        if not sample.pod or sample.pod not in pods or sample.pod in replaced or sample.pod in candidates:
            continue
        if sample.namespace and sample.namespace != context.namespace:
            continue
        candidates[sample.pod] = PodReplacement(sample.pod, pods[sample.pod].node or sample.node, fault,
                                                sample.gpu, sample.uuid)

    limit = max_unavailable(context.replicas, context.max_unavailable_share)
    available = sum(1 for pod in pods.values() if pod.ready and pod.name not in replaced)
    budget = limit - max(0, context.replicas - available)
    delete: list[PodReplacement] = []
    held: list[PodReplacement] = []
    for name in sorted(candidates):
        replacement = candidates[name]
        if not pods[name].ready:
            delete.append(replacement)  # already unavailable: replacing it costs no availability
        elif budget > 0:
            delete.append(replacement)
            budget -= 1
        else:
            held.append(replacement)
    delete.sort(key=lambda r: r.pod)
    for replacement in delete:
        events.append(GpuHealthEvent(
            "Pod", replacement.pod, "GpuFaultReplaced",
            f"GPU {replacement.gpu} ({replacement.uuid}) on node {replacement.node} reported "
            f"{describe_fault(replacement.fault)}; deleting the pod so its Deployment replaces it"))
    for replacement in held:
        if replacement.pod not in context.state.held_back_pods:
            events.append(GpuHealthEvent(
                "Pod", replacement.pod, "GpuFaultReplacementHeld",
                f"GPU {replacement.gpu} ({replacement.uuid}) on node {replacement.node} reported "
                f"{describe_fault(replacement.fault)}; replacement held back: at most {limit} of "
                f"{context.replicas} replicas may be down at once"))

    decision = GpuHealthDecision(delete_pods=tuple(delete), taint_nodes=tuple(taints.values()),
                                 events=tuple(events), held_back=tuple(held), max_unavailable=limit)
    state = GpuHealthState(replaced_pods=frozenset(replaced | {r.pod for r in delete}),
                           held_back_pods=frozenset(r.pod for r in held))
    return decision, state


def _gpu_order(gpu: str) -> tuple[int, str]:
    return (int(gpu), "") if gpu.isdigit() else (1 << 30, gpu)


# --- Prometheus -----------------------------------------------------------------------------------

class GpuHealthUnavailable(RuntimeError):
    """Prometheus could not be asked (down, wrong URL, bad answer)."""


def samples_from_query_result(result: list[dict]) -> list[GpuHealthSample]:
    """Fold an instant-vector result of HEALTH_QUERY into one sample per GPU (and holding pod)."""
    merged: dict[tuple, dict] = {}
    for series in result:
        labels = series.get("metric", {})
        try:
            value = float(series["value"][1])
        except (KeyError, IndexError, TypeError, ValueError):
            continue
        if math.isnan(value):
            continue
        node = labels.get("node") or labels.get("Hostname") or labels.get("kubernetes_node") or ""
        # Scraped without honorLabels, the GPU owner's labels become exported_*.
        pod = labels.get("exported_pod") or labels.get("pod") or None
        namespace = labels.get("exported_namespace") or labels.get("namespace") or None
        gpu = labels.get("gpu", "")
        uuid = labels.get("UUID", "") or f"{node}/{gpu}"
        key = (node, uuid, pod, namespace)
        entry = merged.setdefault(key, {"node": node, "gpu": gpu, "uuid": uuid, "pod": pod, "namespace": namespace})
        name = labels.get("__name__")
        if name == METRIC_XID:
            entry["xid"] = max(entry.get("xid", 0), int(value))
        elif name == METRIC_UNCORRECTABLE_ECC:
            entry["uncorrectable_ecc"] = max(entry.get("uncorrectable_ecc", 0.0), value)
        elif name == METRIC_REMAP_FAILURE:
            entry["remap_failure"] = entry.get("remap_failure", False) or value > 0
        elif name == METRIC_HEALTHY:
            entry["healthy"] = entry.get("healthy", True) and value >= 1
    return [GpuHealthSample(**entry) for _, entry in sorted(merged.items(), key=lambda kv: tuple(map(str, kv[0])))]


def _instant_query(prom_url: str, query: str, what: str, timeout: float) -> list[dict]:
    """One Prometheus instant query's result vector; any failure is GpuHealthUnavailable."""
    url = prom_url.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": query})
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            payload = json.load(response)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise GpuHealthUnavailable(f"GPU {what} query to {prom_url} failed: {exc}") from exc
    if payload.get("status") != "success":
        raise GpuHealthUnavailable(f"GPU {what} query to {prom_url} answered {payload.get('error', payload)}")
    return payload.get("data", {}).get("result", [])


def fetch_gpu_health(prom_url: str, timeout: float = 5.0) -> list[GpuHealthSample]:
    """Per-GPU health from Prometheus' instant query API (one request for all four metrics)."""
    return samples_from_query_result(_instant_query(prom_url, HEALTH_QUERY, "health", timeout))


# --- the node agents' own /metrics, without Prometheus ------------------------------------------------

# On a Node: the base URL of its node agent's metrics, for an operator running without Prometheus
# (the simulated node agents of `digital-worker dev` set it; operator/simnodes.py).
AGENT_ENDPOINT_ANNOTATION = "digitalworker.io/sim-agent-endpoint"


def agent_endpoints(nodes: list[dict]) -> list[tuple[str, dict[str, str]]]:
    """(metrics URL, target labels) of each node agent announced on a Node; the labels are those a
    scrape config adds (`node`), so the samples fold exactly as they do from Prometheus."""
    endpoints = []
    for node in nodes:
        meta = node.get("metadata") or {}
        base = (meta.get("annotations") or {}).get(AGENT_ENDPOINT_ANNOTATION)
        if base:
            endpoints.append((base.rstrip("/") + "/metrics", {"node": meta.get("name", "")}))
    return endpoints


def samples_from_exposition(text: str, target_labels: dict[str, str] | None = None) -> list[GpuHealthSample]:
    """One node agent's /metrics page folded like `samples_from_query_result` folds Prometheus'
    answer to HEALTH_QUERY. The page's own labels win over the target's, as with honorLabels."""
    from prometheus_client.parser import text_string_to_metric_families

    result = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            # The parser appends `_total` to a counter's samples; Prometheus keeps the name as exposed.
            name = family.name if sample.name == f"{family.name}_total" else sample.name
            if name in HEALTH_METRICS:
                result.append({"metric": {**(target_labels or {}), **sample.labels, "__name__": name},
                               "value": [0, repr(float(sample.value))]})
    return samples_from_query_result(result)


def fetch_gpu_health_from_agents(endpoints: list[tuple[str, dict[str, str]]],
                                 timeout: float = 3.0) -> list[GpuHealthSample]:
    """Per-GPU health read from the node agents directly. An agent that does not answer just has no
    samples this round (like a down scrape target); none answering is GpuHealthUnavailable."""
    samples: list[GpuHealthSample] = []
    failures = []
    for url, labels in endpoints:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                text = response.read().decode("utf-8", "replace")
            samples.extend(samples_from_exposition(text, labels))
        except (urllib.error.URLError, OSError, ValueError) as exc:
            failures.append(f"{url}: {exc}")
    if endpoints and len(failures) == len(endpoints):
        raise GpuHealthUnavailable(f"no node agent answered: {'; '.join(failures)[:300]}")
    return samples


# --- GPU load: an optional extra signal for the autoscaling policy ------------------------------------

METRIC_UTIL = "DCGM_FI_DEV_GPU_UTIL"
METRIC_FB_USED = "DCGM_FI_DEV_FB_USED"
METRIC_FB_FREE = "DCGM_FI_DEV_FB_FREE"
LOAD_QUERY = '{__name__=~"' + "|".join((METRIC_UTIL, METRIC_FB_USED, METRIC_FB_FREE)) + '"}'


@dataclass(frozen=True)
class GpuLoad:
    """GPU load of one worker's pods: mean utilisation and the fullest GPU's memory, both 0..1."""

    gpus: int
    mean_utilisation: float
    max_memory_used_fraction: float


def gpu_load_from_query_result(result: list[dict], namespace: str, pods) -> GpuLoad | None:
    """Fold a LOAD_QUERY result into the load of the GPUs held by `pods` in `namespace`."""
    wanted = set(pods)
    per_gpu: dict[tuple[str, str], dict[str, float]] = {}
    for series in result:
        labels = series.get("metric", {})
        pod = labels.get("exported_pod") or labels.get("pod")
        pod_namespace = labels.get("exported_namespace") or labels.get("namespace")
        if pod not in wanted or pod_namespace != namespace:
            continue
        try:
            value = float(series["value"][1])
        except (KeyError, IndexError, TypeError, ValueError):
            continue
        if math.isnan(value):
            continue
        node = labels.get("node") or labels.get("Hostname") or ""
        per_gpu.setdefault((node, labels.get("UUID") or labels.get("gpu", "")), {})[labels.get("__name__", "")] = value
    utilisations = [gpu[METRIC_UTIL] / 100.0 for gpu in per_gpu.values() if METRIC_UTIL in gpu]
    memory = [gpu[METRIC_FB_USED] / (gpu[METRIC_FB_USED] + gpu[METRIC_FB_FREE]) for gpu in per_gpu.values()
              if METRIC_FB_USED in gpu and METRIC_FB_FREE in gpu and gpu[METRIC_FB_USED] + gpu[METRIC_FB_FREE] > 0]
    if not utilisations and not memory:
        return None
    return GpuLoad(gpus=len(per_gpu),
                   mean_utilisation=round(sum(utilisations) / len(utilisations), 4) if utilisations else 0.0,
                   max_memory_used_fraction=round(max(memory), 4) if memory else 0.0)


def fetch_gpu_load(prom_url: str, namespace: str, pods, timeout: float = 5.0) -> GpuLoad | None:
    """GPU load of a worker's pods from Prometheus; None when no GPU of theirs is reported."""
    return gpu_load_from_query_result(_instant_query(prom_url, LOAD_QUERY, "load", timeout), namespace, pods)


# --- Kubernetes -----------------------------------------------------------------------------------

def apply_gpu_health_decision(core_v1, namespace: str, decision: GpuHealthDecision,
                              component: str = "digital-worker-operator") -> None:
    """Carry a decision out with a kubernetes `CoreV1Api`: taint, then delete, then record Events."""
    from kubernetes.client.rest import ApiException

    for taint in decision.taint_nodes:
        node = core_v1.read_node(taint.node)
        taints = [t.to_dict() if hasattr(t, "to_dict") else dict(t) for t in (node.spec.taints or [])]
        taints = [{k: v for k, v in t.items() if v is not None} for t in taints
                  if t.get("key") != taint.key or t.get("effect") != taint.effect]
        core_v1.patch_node(taint.node, {"spec": {"taints": taints + [taint.as_dict()]}})
    for replacement in decision.delete_pods:
        try:
            core_v1.delete_namespaced_pod(replacement.pod, namespace)
        except ApiException as exc:
            if exc.status != 404:  # already gone is what we wanted
                raise
    now = datetime.datetime.now(tz=datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    for index, event in enumerate(decision.events):
        event_namespace = namespace if event.involved_kind == "Pod" else "default"
        core_v1.create_namespaced_event(event_namespace, {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"namespace": event_namespace,
                         "name": f"{event.involved_name}.gpu-health.{datetime.datetime.now().strftime('%H%M%S%f')}{index}"},
            "involvedObject": {"kind": event.involved_kind, "name": event.involved_name,
                               **({"namespace": namespace, "apiVersion": "v1"} if event.involved_kind == "Pod"
                                  else {"apiVersion": "v1"})},
            "reason": event.reason, "message": event.message, "type": event.type,
            "source": {"component": component}, "firstTimestamp": now, "lastTimestamp": now, "count": 1,
            "reportingComponent": component,
        })
