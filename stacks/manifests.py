"""Everything `Platform` deploys, as plain dicts and Helm values: no Pulumi here.

The objects come from their owners (the CRD from `operator.schema`, the operator's own objects
from `operator.deploy`, the node agent from `agents.manifests`); this module only chooses and
groups them, so `Platform` stays a thin loop and `digital-worker stacks manifests` can print the
same objects for kubectl users.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from digital_worker.operator import deploy

PROMETHEUS_MODES = ("podmonitor", "helm", "none")
# The Helm-installed Prometheus's server Service (fixed by fullnameOverride) and port.
HELM_PROMETHEUS_NAME = "digital-worker-prometheus"
HELM_PROMETHEUS_PORT = 80
DEFAULT_OPERATOR_PROMETHEUS_URL = "http://prometheus-operated.monitoring.svc:9090"
PROMETHEUS_CHART = {"chart": "prometheus", "repo": "https://prometheus-community.github.io/helm-charts",
                    "version": "27.5.0"}
DEVICE_PLUGIN_CHART = {"chart": "nvidia-device-plugin", "repo": "https://nvidia.github.io/k8s-device-plugin",
                       "version": "0.17.0"}
GPU_TAINT_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
# Runtime pods, as the operator labels them (operator/render.py) and names their port.
RUNTIME_POD_SELECTOR = {"app.kubernetes.io/name": "digital-worker",
                        "app.kubernetes.io/managed-by": "digital-worker-operator"}
RUNTIME_METRICS_PORT_NAME = "http"


@dataclass(frozen=True)
class PlatformSettings:
    """What the platform looks like; built from stack config by `stacks.config`."""

    namespace: str = "digital-worker-system"
    operator_image: str = "ghcr.io/digital-worker/operator:0.1.0"
    agent_image: str = "ghcr.io/digital-worker/agent:0.1.0"
    operator_replicas: int = 1  # see operator.deploy.MAX_REPLICAS
    watch_namespaces: tuple[str, ...] = ()
    agent_port: int = 9400
    agent_node_selector: dict[str, str] | None = None
    agent_tolerations: tuple[dict, ...] = ()
    prometheus_mode: str = "helm"  # podmonitor | helm | none ("auto" is resolved before this)
    prometheus_url: str | None = None  # podmonitor/none: the Prometheus the operator queries
    device_plugin: bool = False
    device_plugin_version: str = DEVICE_PLUGIN_CHART["version"]
    # k3s with the NVIDIA container runtime: GPU pods need this RuntimeClass (k3s registers the handler).
    gpu_runtime_class: str | None = None
    workers: tuple[dict, ...] = ()
    create_worker_namespaces: bool = True
    prometheus_chart_version: str = PROMETHEUS_CHART["version"]

    @property
    def resolved_prometheus_url(self) -> str | None:
        if self.prometheus_mode == "helm":
            return f"http://{HELM_PROMETHEUS_NAME}.{self.namespace}.svc:{HELM_PROMETHEUS_PORT}"
        if self.prometheus_mode == "podmonitor":
            return self.prometheus_url or DEFAULT_OPERATOR_PROMETHEUS_URL
        return self.prometheus_url


def validate_settings(settings: PlatformSettings) -> list[str]:
    """Problems with the settings, each naming its config key; DigitalWorkers go through the operator's validator."""
    from digital_worker.operator import spec as dw_spec

    problems: list[str] = []
    if settings.prometheus_mode not in PROMETHEUS_MODES:
        problems.append(f"prometheus.mode must be one of {', '.join(PROMETHEUS_MODES)} or auto, "
                        f"not {settings.prometheus_mode!r}")
    if not 1 <= settings.operator_replicas <= deploy.MAX_REPLICAS:
        problems.append(f"platform.operatorReplicas must be 1..{deploy.MAX_REPLICAS}: operator replicas share one "
                        "kopf peering priority, and peers with equal priorities all pause")
    seen: set[tuple[str, str]] = set()
    for index, body in enumerate(settings.workers):
        meta = body.get("metadata") or {} if isinstance(body, dict) else {}
        label = f"workers[{index}]" + (f" ({meta.get('name')})" if meta.get("name") else "")
        if not isinstance(body, dict):
            problems.append(f"{label}: must be a DigitalWorker mapping")
            continue
        problems += [f"{label}: {p}" for p in dw_spec.validate(worker_body(body, settings.namespace))]
        key = (meta.get("namespace") or settings.namespace, meta.get("name") or "")
        if key in seen:
            problems.append(f"{label}: {key[0]}/{key[1]} appears twice")
        seen.add(key)
    return problems


def worker_body(body: dict, default_namespace: str) -> dict:
    """A DigitalWorker from config, completed with apiVersion, kind and namespace."""
    from digital_worker.operator import schema

    worker = copy.deepcopy(body)
    worker.setdefault("apiVersion", schema.API_VERSION)
    worker.setdefault("kind", schema.KIND)
    worker.setdefault("metadata", {}).setdefault("namespace", default_namespace)
    return worker


@dataclass(frozen=True)
class PlatformObjects:
    """Objects in apply order, grouped so each group can wait for the one before it."""

    namespaces: list[dict] = field(default_factory=list)
    crds: list[dict] = field(default_factory=list)  # the DigitalWorker CRD and kopf's peering CRDs
    operator: list[dict] = field(default_factory=list)
    agents: list[dict] = field(default_factory=list)
    monitoring: list[dict] = field(default_factory=list)  # PodMonitors/ServiceMonitor (Prometheus Operator)
    workers: list[dict] = field(default_factory=list)

    def all(self) -> list[dict]:
        return self.namespaces + self.crds + self.operator + self.agents + self.monitoring + self.workers


def namespace_object(name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "digital-worker"}}}


def runtime_podmonitor(namespace: str, interval: str = "15s") -> dict:
    """Scrapes every SGLang runtime pod the operator creates, in any namespace."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": {"name": "digital-worker-runtime", "namespace": namespace,
                     "labels": {"app.kubernetes.io/part-of": "digital-worker"}},
        "spec": {
            "selector": {"matchLabels": dict(RUNTIME_POD_SELECTOR)},
            "namespaceSelector": {"any": True},
            # Series carry the worker and revision (digitalworker_io_instance, digitalworker_io_revision):
            # the operator's autoscaling and rollout analysis select on them.
            "podTargetLabels": ["digitalworker.io/instance", "digitalworker.io/revision"],
            "podMetricsEndpoints": [{"port": RUNTIME_METRICS_PORT_NAME, "path": "/metrics", "interval": interval}],
        },
    }


def operator_servicemonitor(namespace: str) -> dict:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": deploy.OPERATOR_NAME, "namespace": namespace,
                     "labels": {"app.kubernetes.io/part-of": "digital-worker"}},
        "spec": {
            "selector": {"matchLabels": {"app.kubernetes.io/name": deploy.OPERATOR_NAME}},
            "namespaceSelector": {"matchNames": [namespace]},
            # honorLabels keeps the per-worker `namespace` label of the operator's metrics (otherwise
            # renamed exported_namespace in favour of the operator's own namespace).
            "endpoints": [{"port": "metrics", "path": "/metrics", "interval": "30s", "honorLabels": True}],
        },
    }


def runtime_class(name: str) -> dict:
    return {"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "digital-worker"}},
            "handler": name}


def platform_objects(settings: PlatformSettings) -> PlatformObjects:
    from digital_worker.agents import manifests as agent_manifests
    from digital_worker.operator import schema
    from digital_worker.stacks import observability

    watch = list(settings.watch_namespaces) or None
    objects = PlatformObjects()
    objects.namespaces.append(namespace_object(settings.namespace))
    if settings.create_worker_namespaces:
        extra = sorted({worker_body(w, settings.namespace)["metadata"]["namespace"] for w in settings.workers}
                       - {settings.namespace})
        objects.namespaces.extend(namespace_object(ns) for ns in extra)
    objects.crds.append(schema.crd_manifest())
    peering = deploy.peering_manifests(watch)
    objects.crds.extend(obj for obj in peering if obj["kind"] == "CustomResourceDefinition")
    if settings.gpu_runtime_class:
        objects.crds.append(runtime_class(settings.gpu_runtime_class))
    objects.operator.extend(obj for obj in peering if obj["kind"] != "CustomResourceDefinition")
    objects.operator.extend(deploy.operator_manifests(
        settings.namespace, settings.operator_image, replicas=settings.operator_replicas,
        watch_namespaces=watch, prometheus_url=settings.resolved_prometheus_url,
    ))
    agents = agent_manifests.agent_manifests(
        settings.namespace, settings.agent_image, port=settings.agent_port,
        node_selector=settings.agent_node_selector, tolerations=list(settings.agent_tolerations) or None,
    )
    if settings.gpu_runtime_class:
        for obj in agents:
            if obj["kind"] == "DaemonSet":
                obj["spec"]["template"]["spec"]["runtimeClassName"] = settings.gpu_runtime_class
    objects.agents.extend(agents)
    if settings.prometheus_mode == "podmonitor":
        objects.monitoring.extend([
            agent_manifests.agent_podmonitor(settings.namespace),
            runtime_podmonitor(settings.namespace),
            operator_servicemonitor(settings.namespace),
            observability.prometheus_rule_object(settings.namespace),
        ])
    # Grafana's dashboard sidecar picks it up wherever Grafana runs with one (harmless otherwise).
    objects.monitoring.append(observability.dashboard_configmap(settings.namespace))
    objects.workers.extend(worker_body(w, settings.namespace) for w in settings.workers)
    return objects


def prometheus_helm_values(settings: PlatformSettings) -> dict[str, Any]:
    """A small single-replica Prometheus whose default jobs scrape annotated pods and services.

    The runtime pods carry `prometheus.io/scrape` annotations (operator/render.py) and so does the
    agent Service (agents/manifests.py); the chart's `kubernetes-pods` and
    `kubernetes-service-endpoints` jobs pick both up. Extras the platform does not use are off.
    Our alerting rules go in the chart's rule file (`stacks/observability`).
    """
    from digital_worker.stacks.observability import prometheus_rules

    return {
        "serverFiles": {"alerting_rules.yml": prometheus_rules()},
        "server": {
            "fullnameOverride": HELM_PROMETHEUS_NAME,
            "retention": "15d",
            "global": {"scrape_interval": "15s", "evaluation_interval": "15s"},
            "persistentVolume": {"enabled": True, "size": "20Gi"},
            "resources": {"requests": {"cpu": "200m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}},
            "securityContext": {"runAsNonRoot": True, "runAsUser": 65534, "runAsGroup": 65534, "fsGroup": 65534},
        },
        "alertmanager": {"enabled": False},
        "prometheus-pushgateway": {"enabled": False},
        "kube-state-metrics": {"enabled": True},
        "prometheus-node-exporter": {"enabled": False},
    }


def device_plugin_helm_values(settings: PlatformSettings) -> dict[str, Any]:
    values: dict[str, Any] = {
        "tolerations": [GPU_TAINT_TOLERATION,
                        {"key": "CriticalAddonsOnly", "operator": "Exists"}],
        # Our nodes carry nvidia.com/gpu.present (on-prem: hostprep; AWS: node group labels).
        "nodeSelector": {"nvidia.com/gpu.present": "true"},
        "affinity": None,
        "gfd": {"enabled": False},
    }
    if settings.gpu_runtime_class:
        values["runtimeClassName"] = settings.gpu_runtime_class
    return values


def kubectl_commands(settings: PlatformSettings) -> list[str]:
    ns = settings.namespace
    commands = [
        f"kubectl -n {ns} rollout status deployment/{deploy.OPERATOR_NAME}",
        f"kubectl -n {ns} logs deployment/{deploy.OPERATOR_NAME} -f",
        "kubectl get digitalworkers --all-namespaces",
        "kubectl get nodes -L digitalworker.io/gpu-type,nvidia.com/gpu.product,nvidia.com/gpu.count",
        f"kubectl -n {ns} get daemonset -l app.kubernetes.io/component=node-agent",
    ]
    if settings.prometheus_mode == "helm":
        commands.append(f"kubectl -n {ns} port-forward svc/{HELM_PROMETHEUS_NAME} 9090:{HELM_PROMETHEUS_PORT}")
    return commands
