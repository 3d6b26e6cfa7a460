"""`Platform`: the digital-worker control plane on any Kubernetes cluster, via pulumi-kubernetes.

A thin loop over `stacks.manifests.platform_objects`: each object becomes a typed
pulumi-kubernetes resource (or a CustomResource for CRD-defined kinds), groups wait for the group
before them (CRDs before the operator, the operator before DigitalWorkers, so on destroy the
workers go while the operator can still remove its finalizers). Helm releases cover Prometheus
(when there is no Prometheus Operator) and the NVIDIA device plugin.
"""
from __future__ import annotations

import re
from typing import Any

import pulumi
import pulumi_kubernetes as k8s

from digital_worker.stacks import manifests
from digital_worker.stacks.manifests import PlatformSettings

# Built-in API groups map onto pulumi_kubernetes modules by their first label ("" is core).
_BUILTIN_GROUP = re.compile(r"^([a-z]+)(\.[a-z.]*k8s\.io)?$")


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def resource_class(api_version: str, kind: str):
    """The typed pulumi-kubernetes class for a built-in kind, or None for CRD-defined kinds."""
    group, _, version = api_version.rpartition("/")
    module_name = "core" if not group else None
    if group:
        match = _BUILTIN_GROUP.match(group)
        if not match:
            return None
        module_name = match.group(1)
    module = getattr(k8s, module_name, None)
    version_module = getattr(module, version, None) if module is not None else None
    return getattr(version_module, kind, None) if version_module is not None else None


def logical_name(obj: dict) -> str:
    meta = obj["metadata"]
    parts = [obj["kind"].lower(), meta.get("namespace"), meta["name"]]
    return "-".join(p for p in parts if p)


def k8s_resource(obj: dict, opts: pulumi.ResourceOptions) -> pulumi.CustomResource:
    """One Kubernetes object as a Pulumi resource, its fields passed through unchanged."""
    cls = resource_class(obj["apiVersion"], obj["kind"])
    name = logical_name(obj)
    if cls is None:
        return k8s.apiextensions.CustomResource(
            name, api_version=obj["apiVersion"], kind=obj["kind"], metadata=obj["metadata"],
            spec=obj.get("spec"), opts=opts,
        )
    fields = {_snake(k): v for k, v in obj.items() if k not in ("apiVersion", "kind")}
    return cls(name, opts=opts, **fields)


class Platform(pulumi.ComponentResource):
    """Namespace, CRDs, operator (RBAC, Deployment, metrics Service), node agent, scraping, workers."""

    operator_namespace: pulumi.Output[str]
    prometheus_url: pulumi.Output[Any]
    kubectl_commands: pulumi.Output[list]

    def __init__(self, name: str, settings: PlatformSettings, opts: pulumi.ResourceOptions | None = None,
                 *, wait_for: list[pulumi.Resource] | None = None) -> None:
        """`wait_for`: what must exist before anything is applied (e.g. every GPU host joined)."""
        super().__init__("digitalworker:stacks:Platform", name, None, opts)
        problems = manifests.validate_settings(settings)
        if problems:
            raise ValueError("; ".join(problems))
        objects = manifests.platform_objects(settings)
        self.resources: dict[str, pulumi.CustomResource] = {}

        def deploy_group(group: list[dict], after: list[pulumi.Resource]) -> list[pulumi.Resource]:
            created = []
            for obj in group:
                resource = k8s_resource(obj, pulumi.ResourceOptions(parent=self, depends_on=after))
                self.resources[logical_name(obj)] = resource
                created.append(resource)
            return created or after

        namespaces = deploy_group(objects.namespaces, list(wait_for or []))
        crds = deploy_group(objects.crds, namespaces)
        base = crds
        if settings.prometheus_mode == "helm":
            self.prometheus = k8s.helm.v3.Release(
                "prometheus",
                name="digital-worker-prometheus",
                chart=manifests.PROMETHEUS_CHART["chart"],
                version=settings.prometheus_chart_version,
                repository_opts={"repo": manifests.PROMETHEUS_CHART["repo"]},
                namespace=settings.namespace,
                values=manifests.prometheus_helm_values(settings),
                opts=pulumi.ResourceOptions(parent=self, depends_on=namespaces),
            )
        if settings.device_plugin:
            self.device_plugin = k8s.helm.v3.Release(
                "nvidia-device-plugin",
                name="nvidia-device-plugin",
                chart=manifests.DEVICE_PLUGIN_CHART["chart"],
                version=settings.device_plugin_version,
                repository_opts={"repo": manifests.DEVICE_PLUGIN_CHART["repo"]},
                namespace=settings.namespace,
                values=manifests.device_plugin_helm_values(settings),
                opts=pulumi.ResourceOptions(parent=self, depends_on=crds),
            )
        # kopf treats a named peering as mandatory: the peering objects exist before any replica starts.
        peering = deploy_group([o for o in objects.operator if o["apiVersion"].startswith("kopf.dev/")], base)
        operator = deploy_group([o for o in objects.operator if not o["apiVersion"].startswith("kopf.dev/")], peering)
        deploy_group(objects.agents, namespaces)
        deploy_group(objects.monitoring, namespaces)
        deploy_group(objects.workers, operator)

        self.operator_namespace = pulumi.Output.from_input(settings.namespace)
        self.prometheus_url = pulumi.Output.from_input(settings.resolved_prometheus_url)
        self.kubectl_commands = pulumi.Output.from_input(manifests.kubectl_commands(settings))
        self.register_outputs({
            "operator_namespace": self.operator_namespace,
            "prometheus_url": self.prometheus_url,
            "kubectl_commands": self.kubectl_commands,
        })
