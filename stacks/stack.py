"""The Pulumi program: stack config -> components. `stacks/program/__main__.py` calls `run()`.

Only wiring lives here; what each target builds is in `platform.py`, `onprem.py` and `aws.py`.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pulumi

from digital_worker.stacks import config as stack_config

STRING_KEYS = ("target", "kubeconfig", "context")
OBJECT_KEYS = ("platform", "prometheus", "workers", "onprem", "aws")
SECRET_KEYS = ("sshPrivateKey", "k3sToken")


def read_config(cfg: pulumi.Config) -> tuple[dict[str, Any], set[str]]:
    values: dict[str, Any] = {key: cfg.get(key) for key in STRING_KEYS}
    for key in OBJECT_KEYS:
        values[key] = cfg.get_object(key)
    present = {key for key in SECRET_KEYS if cfg.get(key) is not None}
    return values, present


def resolve_prometheus_mode(parsed: stack_config.StackConfig, probe=None) -> str:
    """`auto`: a cluster we create has no Prometheus Operator, so Helm; an existing one is asked."""
    if parsed.prometheus_mode_requested != "auto":
        return parsed.prometheus_mode_requested
    if parsed.target != "existing":
        return "helm"
    if probe is None:
        from digital_worker.stacks.probe import has_prometheus_operator as probe
    found = probe(parsed.kubeconfig, parsed.context)
    if found is None:
        pulumi.log.warn("prometheus.mode auto: cannot reach the cluster to look for the Prometheus Operator; "
                        "installing Prometheus with Helm (set prometheus.mode to choose)")
        return "helm"
    return "podmonitor" if found else "helm"


def run(probe=None, base_dir: Path | None = None) -> dict[str, Any]:
    import pulumi_kubernetes as k8s

    from digital_worker.stacks.platform import Platform

    cfg = pulumi.Config(stack_config.PROJECT)
    values, secrets_present = read_config(cfg)
    try:
        parsed = stack_config.parse(values, base_dir=base_dir or Path.cwd(),
                                    has_secret=lambda key: key in secrets_present)
    except stack_config.ConfigError as exc:
        raise pulumi.RunError(f"stack config: {exc}") from None
    settings = dataclasses.replace(parsed.platform, prometheus_mode=resolve_prometheus_mode(parsed, probe))

    outputs: dict[str, Any] = {"target": parsed.target}
    depends_on: list[pulumi.Resource] = []
    if parsed.target == "existing":
        provider = (k8s.Provider("cluster", kubeconfig=parsed.kubeconfig, context=parsed.context)
                    if parsed.kubeconfig or parsed.context else None)
    elif parsed.target == "onprem":
        from digital_worker.stacks.onprem import OnPremGpuNodes

        args = dataclasses.replace(
            parsed.onprem,
            private_key=cfg.require_secret("sshPrivateKey"),
            join_token=cfg.get_secret("k3sToken") if parsed.onprem.k3s.server_url else None,
        )
        nodes = OnPremGpuNodes("gpu-nodes", args)
        if parsed.onprem.k3s.server_url:
            # Joining a cluster we do not manage: reach it like an existing one (kubeconfig/context keys).
            provider = k8s.Provider("cluster", kubeconfig=parsed.kubeconfig, context=parsed.context)
        else:
            provider = k8s.Provider("cluster", kubeconfig=nodes.kubeconfig)
        depends_on = list(nodes.hosts)
        outputs.update(kubeconfig=nodes.kubeconfig, nodeNames=nodes.node_names, k3sServerUrl=nodes.server_url)
    else:
        from digital_worker.stacks.aws import AwsGpuCluster

        cluster = AwsGpuCluster("gpu-cluster", parsed.aws)
        provider = k8s.Provider("cluster", kubeconfig=cluster.kubeconfig)
        depends_on = [cluster.system_nodes, *cluster.gpu_node_groups]
        outputs.update(kubeconfig=cluster.kubeconfig, clusterName=cluster.cluster_name, vpcId=cluster.vpc_id)

    platform = Platform("platform", settings, pulumi.ResourceOptions(
        providers={"kubernetes": provider} if provider else None), wait_for=depends_on)
    outputs.update(
        operatorNamespace=platform.operator_namespace,
        prometheusUrl=platform.prometheus_url,
        prometheusMode=settings.prometheus_mode,
        kubectlCommands=platform.kubectl_commands,
    )
    for key, value in outputs.items():
        pulumi.export(key, value)
    return {"platform": platform, "provider": provider, "settings": settings, **outputs}
