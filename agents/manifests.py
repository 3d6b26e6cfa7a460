"""Kubernetes manifests of the node agent, as plain dicts (no dependencies).

The stacks deploy exactly these with pulumi-kubernetes; `digital-worker agent-manifests` prints
them as YAML for kubectl.
"""
from __future__ import annotations

import copy
import re

NAME = "digital-worker-gpu-agent"
LABELS = {"app.kubernetes.io/name": NAME, "app.kubernetes.io/component": "node-agent",
          "app.kubernetes.io/part-of": "digital-worker"}
POD_RESOURCES_DIR = "/var/lib/kubelet/pod-resources"
# Set by NVIDIA GPU feature discovery on every GPU node.
DEFAULT_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}
# The agent must stay on GPU nodes that are tainted, above all on the ones we tainted for a bad GPU:
# it is what reports when the GPU is healthy again.
DEFAULT_TOLERATIONS = [
    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
    {"key": "digitalworker.io/gpu-unhealthy", "operator": "Exists", "effect": "NoSchedule"},
]
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def _validate(namespace: str, image: str, port: int) -> None:
    if not isinstance(namespace, str) or not _DNS_LABEL.match(namespace):
        raise ValueError(f"namespace must be a DNS-1123 label, got {namespace!r}")
    if not isinstance(image, str) or not image.strip() or any(ch.isspace() for ch in image):
        raise ValueError(f"image must be a non-empty image reference, got {image!r}")
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"port must be 1..65535, got {port!r}")


def agent_manifests(namespace: str, image: str, port: int = 9400, node_selector: dict | None = None,
                    tolerations: list | None = None) -> list[dict]:
    """DaemonSet and Service (with Prometheus scrape annotations) of the node agent.

    `node_selector` replaces the default GPU-node selector; `tolerations` are added to the defaults.
    """
    _validate(namespace, image, port)
    selector = dict(DEFAULT_NODE_SELECTOR if node_selector is None else node_selector)
    all_tolerations = copy.deepcopy(DEFAULT_TOLERATIONS)
    for toleration in tolerations or []:
        if toleration not in all_tolerations:
            all_tolerations.append(copy.deepcopy(toleration))
    probe = {"httpGet": {"port": "metrics"}, "periodSeconds": 10, "timeoutSeconds": 3}
    container = {
        "name": "agent",
        "image": image,
        "command": ["digital-worker", "agent"],
        "args": ["--port", str(port), "--pod-resources-socket", f"{POD_RESOURCES_DIR}/kubelet.sock"],
        "env": [
            {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            # The NVIDIA container runtime mounts the driver's NVML into the container for these,
            # without handing the agent a GPU (it requests no nvidia.com/gpu).
            {"name": "NVIDIA_VISIBLE_DEVICES", "value": "all"},
            {"name": "NVIDIA_DRIVER_CAPABILITIES", "value": "utility"},
            {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
        ],
        "ports": [{"name": "metrics", "containerPort": port, "protocol": "TCP"}],
        "livenessProbe": {**copy.deepcopy(probe), "httpGet": {"path": "/healthz", "port": "metrics"},
                          "failureThreshold": 6},
        "readinessProbe": {**copy.deepcopy(probe), "httpGet": {"path": "/readyz", "port": "metrics"}},
        "resources": {"requests": {"cpu": "10m", "memory": "48Mi"}, "limits": {"memory": "96Mi"}},
        "securityContext": {
            # NVML reads need no privilege; uid 0 is only for connecting to the kubelet's root-owned
            # pod-resources socket, so every capability is dropped and nothing can be written.
            "runAsUser": 0,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": "pod-resources", "mountPath": POD_RESOURCES_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    daemonset = {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": NAME, "namespace": namespace, "labels": dict(LABELS)},
        "spec": {
            "selector": {"matchLabels": {"app.kubernetes.io/name": NAME}},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": dict(LABELS)},
                "spec": {
                    "nodeSelector": selector,
                    "tolerations": all_tolerations,
                    "automountServiceAccountToken": False,
                    "hostPID": False,
                    "priorityClassName": "system-node-critical",
                    "terminationGracePeriodSeconds": 10,
                    "containers": [container],
                    "volumes": [
                        {"name": "pod-resources", "hostPath": {"path": POD_RESOURCES_DIR, "type": "Directory"}},
                        {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
                    ],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": NAME,
            "namespace": namespace,
            "labels": dict(LABELS),
            "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(port),
                            "prometheus.io/path": "/metrics"},
        },
        "spec": {
            "clusterIP": "None",  # one endpoint per node agent, nothing to load-balance
            "selector": {"app.kubernetes.io/name": NAME},
            "ports": [{"name": "metrics", "port": port, "targetPort": "metrics", "protocol": "TCP"}],
        },
    }
    return [daemonset, service]


def agent_podmonitor(namespace: str, interval: str = "15s") -> dict:
    """Prometheus Operator PodMonitor for the agent pods.

    honorLabels keeps the agent's `pod`/`namespace` labels (the pod that holds the GPU) instead of
    renaming them `exported_pod`/`exported_namespace` in favour of the agent's own pod.
    """
    if not isinstance(namespace, str) or not _DNS_LABEL.match(namespace):
        raise ValueError(f"namespace must be a DNS-1123 label, got {namespace!r}")
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": {"name": NAME, "namespace": namespace, "labels": dict(LABELS)},
        "spec": {
            "selector": {"matchLabels": {"app.kubernetes.io/name": NAME}},
            "namespaceSelector": {"matchNames": [namespace]},
            "podMetricsEndpoints": [{"port": "metrics", "path": "/metrics", "interval": interval,
                                     "honorLabels": True}],
        },
    }
