"""The operator's own platform manifests, as plain dicts: the one source of truth.

The Pulumi `Platform` component and `digital-worker stacks manifests` both render from here, so
the RBAC, the Deployment and the metrics Service never drift between install paths. Nothing here
talks to a cluster; every function returns fresh dicts the caller may serialise or mutate.
"""
from __future__ import annotations

from typing import Any

OPERATOR_NAME = "digital-worker-operator"
# kopf peering object shared by all operator replicas: only one of them handles events at a time.
PEERING_NAME = "digital-worker"
HEALTH_PORT = 8080
HEALTH_PATH = "/healthz"
METRICS_PORT = 9090
# See operator_manifests: more replicas need per-pod peering priorities, which `run` cannot set yet.
MAX_REPLICAS = 1
# A fixed non-root uid/gid (the distroless "nonroot" convention), so runAsNonRoot can be verified.
RUN_AS_USER = 65532

OPERATOR_LABELS = {
    "app.kubernetes.io/name": OPERATOR_NAME,
    "app.kubernetes.io/component": "operator",
    "app.kubernetes.io/part-of": "digital-worker",
}

# (apiGroup, resources, verbs): exactly what the operator's handlers and clients call, nothing more.
# The emulated API enforces these for the operator in every end-to-end test (emulator.py), so a
# call missing here fails there; grants no test or code path uses are left out.
# Grouped per resource so a review can match each line to one use in the operator.
OPERATOR_RBAC_RULES: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("digitalworker.io", ("digitalworkers",), ("get", "list", "watch", "patch")),
    ("digitalworker.io", ("digitalworkers/status",), ("get", "patch")),
    ("digitalworker.io", ("digitalworkers/scale",), ("patch",)),
    # Children name their worker with blockOwnerDeletion, which clusters enforcing owner-reference
    # permissions (OwnerReferencesPermissionEnforcement) allow only to who may update its finalizers.
    ("digitalworker.io", ("digitalworkers/finalizers",), ("update",)),
    ("apps", ("deployments",), ("get", "list", "watch", "create", "patch", "delete")),
    ("", ("services", "configmaps"), ("get", "list", "watch", "create", "patch", "delete")),
    ("policy", ("poddisruptionbudgets",), ("get", "list", "watch", "create", "patch", "delete")),
    ("", ("pods",), ("get", "list", "watch", "delete")),
    ("", ("nodes",), ("get", "list", "watch", "patch")),
    ("", ("events",), ("create",)),
    # The API-key Secret a DigitalWorker references: its existence, and the key itself for the
    # blue-green warm-up requests to the preview (bluegreen.py). Never list/watch.
    ("", ("secrets",), ("get",)),
    ("apiextensions.k8s.io", ("customresourcedefinitions",), ("get", "list", "watch")),
    ("", ("namespaces",), ("list", "watch")),
    ("kopf.dev", ("clusterkopfpeerings", "kopfpeerings"), ("get", "list", "watch", "patch")),
    ("gateway.networking.k8s.io", ("httproutes",), ("get", "list", "watch", "create", "patch", "delete")),
)


def _metadata(name: str, namespace: str | None = None) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "labels": dict(OPERATOR_LABELS)}
    if namespace is not None:
        metadata["namespace"] = namespace
    return metadata


def operator_args(
    *, watch_namespaces: list[str] | None = None, prometheus_url: str | None = None
) -> list[str]:
    """The `digital-worker run` argv the operator container starts with."""
    args = [
        "run",
        "--liveness", f"http://0.0.0.0:{HEALTH_PORT}{HEALTH_PATH}",
        "--peering", PEERING_NAME,
    ]
    # No --namespace at all means cluster-wide (the run command's default).
    for namespace in watch_namespaces or ():
        args += ["--namespace", namespace]
    if prometheus_url:
        args += ["--prometheus-url", prometheus_url]
    return args


def service_account(namespace: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _metadata(OPERATOR_NAME, namespace)}


def cluster_role() -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": _metadata(OPERATOR_NAME),
        "rules": [
            {"apiGroups": [group], "resources": list(resources), "verbs": list(verbs)}
            for group, resources, verbs in OPERATOR_RBAC_RULES
        ],
    }


def cluster_role_binding(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": _metadata(OPERATOR_NAME),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": OPERATOR_NAME},
        "subjects": [{"kind": "ServiceAccount", "name": OPERATOR_NAME, "namespace": namespace}],
    }


def deployment(
    namespace: str,
    image: str,
    *,
    replicas: int = 1,
    watch_namespaces: list[str] | None = None,
    prometheus_url: str | None = None,
) -> dict[str, Any]:
    selector = {"app.kubernetes.io/name": OPERATOR_NAME}
    container = {
        "name": "operator",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["digital-worker"],
        "args": operator_args(watch_namespaces=watch_namespaces, prometheus_url=prometheus_url),
        "env": [
            # kopf's peering identity and event namespace come from the pod, not from the image.
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            # The root FS is read-only: anything Python or kopf caches goes to the emptyDir.
            {"name": "HOME", "value": "/tmp"},
            {"name": "XDG_CACHE_HOME", "value": "/tmp/.cache"},
        ],
        "ports": [
            {"name": "health", "containerPort": HEALTH_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
        ],
        "livenessProbe": {
            "httpGet": {"path": HEALTH_PATH, "port": "health"},
            "initialDelaySeconds": 15,
            "periodSeconds": 20,
            "timeoutSeconds": 5,
            "failureThreshold": 3,
        },
        "resources": {
            "requests": {"cpu": "100m", "memory": "256Mi"},
            "limits": {"memory": "512Mi"},
        },
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(OPERATOR_NAME, namespace),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": dict(selector)},
            # kopf pauses every peer when two share a priority: never run old and new side by side.
            "strategy": {"type": "Recreate"},
            "template": {
                "metadata": {"labels": dict(OPERATOR_LABELS)},
                "spec": {
                    "serviceAccountName": OPERATOR_NAME,
                    "automountServiceAccountToken": True,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": RUN_AS_USER,
                        "runAsGroup": RUN_AS_USER,
                        "fsGroup": RUN_AS_USER,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [container],
                    "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}],
                    "terminationGracePeriodSeconds": 30,
                },
            },
        },
    }


def metrics_service(namespace: str) -> dict[str, Any]:
    metadata = _metadata(f"{OPERATOR_NAME}-metrics", namespace)
    # For annotation-driven Prometheus setups; the Prometheus Operator uses a ServiceMonitor instead.
    metadata["annotations"] = {
        "prometheus.io/scrape": "true", "prometheus.io/port": str(METRICS_PORT), "prometheus.io/path": "/metrics",
    }
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": {
            "type": "ClusterIP",
            "selector": {"app.kubernetes.io/name": OPERATOR_NAME},
            "ports": [{"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"}],
        },
    }


def operator_manifests(
    namespace: str,
    image: str,
    *,
    replicas: int = 1,
    watch_namespaces: list[str] | None = None,
    prometheus_url: str | None = None,
) -> list[dict]:
    """ServiceAccount, ClusterRole, ClusterRoleBinding, Deployment and metrics Service, in apply order."""
    if not namespace:
        raise ValueError("namespace must not be empty")
    if not image:
        raise ValueError("image must not be empty")
    if replicas < 1:
        raise ValueError("replicas must be at least 1")
    if replicas > MAX_REPLICAS:
        # kopf's peering elects by priority, and all replicas of one Deployment share theirs: with
        # equal priorities every peer pauses and nothing is reconciled. One replica, restarted by
        # the Deployment (liveness probe), until `digital-worker run` gives each pod its own priority.
        raise ValueError(
            f"replicas must be at most {MAX_REPLICAS}: operator replicas share one kopf peering priority, "
            "and peers with equal priorities all pause"
        )
    return [
        service_account(namespace),
        cluster_role(),
        cluster_role_binding(namespace),
        deployment(
            namespace, image, replicas=replicas,
            watch_namespaces=watch_namespaces, prometheus_url=prometheus_url,
        ),
        metrics_service(namespace),
    ]


def peering_manifests(watch_namespaces: list[str] | None = None) -> list[dict]:
    """kopf's peering CRDs and the peering object(s) the operator replicas elect through.

    kopf treats a peering named on its command line as mandatory, so it must exist before the
    operator starts. A cluster-wide operator peers through one ClusterKopfPeering; an operator
    limited to namespaces peers through a KopfPeering in each of them (that is where kopf looks).
    """
    def peering_crd(kind: str, plural: str, scope: str) -> dict[str, Any]:
        return {
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.kopf.dev"},
            "spec": {
                "group": "kopf.dev",
                "scope": scope,
                "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
                "versions": [{
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                        },
                    }},
                }],
            },
        }

    crds = [
        peering_crd("ClusterKopfPeering", "clusterkopfpeerings", "Cluster"),
        peering_crd("KopfPeering", "kopfpeerings", "Namespaced"),
    ]
    if not watch_namespaces:
        return crds + [{
            "apiVersion": "kopf.dev/v1",
            "kind": "ClusterKopfPeering",
            "metadata": {"name": PEERING_NAME, "labels": dict(OPERATOR_LABELS)},
        }]
    return crds + [
        {
            "apiVersion": "kopf.dev/v1",
            "kind": "KopfPeering",
            "metadata": {"name": PEERING_NAME, "namespace": namespace, "labels": dict(OPERATOR_LABELS)},
        }
        for namespace in watch_namespaces
    ]
