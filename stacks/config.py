"""Stack config (`Pulumi.<stack>.yaml`, namespace `digital-worker:`) into the components' settings.

Pure: works on plain mappings, so `digital-worker stacks check` can validate a stack file without
Pulumi, and the program (`stacks/program/__main__.py`) feeds it what `pulumi.Config` returns.
Every problem names its config key.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from digital_worker.stacks import hostprep
from digital_worker.stacks.remote import parse_public_key
from digital_worker.stacks.manifests import PROMETHEUS_MODES, PlatformSettings

PROJECT = "digital-worker"
TARGETS = ("existing", "onprem", "aws")


class ConfigError(ValueError):
    """The stack config is wrong; the message lists every problem with its key."""


@dataclass(frozen=True)
class StackConfig:
    target: str
    platform: PlatformSettings
    prometheus_mode_requested: str  # may be "auto"
    kubeconfig: str | None = None  # existing: a path or the kubeconfig text
    context: str | None = None
    onprem: "Any | None" = None  # onprem.OnPremArgs without the secrets (filled in by the program)
    aws: "Any | None" = None  # aws.AwsClusterConfig
    missing_secrets: tuple[str, ...] = ()


def _get(mapping: dict, key: str, default: Any = None) -> Any:
    value = mapping.get(key, default)
    return default if value is None else value


def _read_local(path: str | None, base: Path, key: str, problems: list[str]) -> str | None:
    if not path:
        return None
    full = (base / path) if not Path(path).is_absolute() else Path(path)
    try:
        return full.read_text()
    except OSError as exc:
        problems.append(f"{key}: cannot read {path}: {exc.strerror}")
        return None


def parse(values: dict[str, Any], *, base_dir: Path = Path("."), has_secret: Callable[[str], bool] = lambda k: False,
          require_secrets: bool = True) -> StackConfig:
    """`values`: the project's config keys without the `digital-worker:` prefix, objects already parsed.

    `require_secrets=False` checks a stack file whose secrets are not set yet (examples, reviews);
    `missing_secrets` then says which ones `pulumi up` will ask for.
    """
    problems: list[str] = []
    missing: list[str] = []
    target = values.get("target")
    if target not in TARGETS:
        problems.append(f"target must be one of {', '.join(TARGETS)} (got {target!r})")
    platform = _get(values, "platform", {})
    prometheus = _get(values, "prometheus", {})
    mode = _get(prometheus, "mode", "auto")
    if mode not in (*PROMETHEUS_MODES, "auto"):
        problems.append(f"prometheus.mode must be auto, {', '.join(PROMETHEUS_MODES)} (got {mode!r})")
    workers = _get(values, "workers", [])
    if not isinstance(workers, list):
        problems.append("workers must be a list of DigitalWorker mappings")
        workers = []
    device_plugin_default = target in ("onprem", "aws")
    try:
        settings = PlatformSettings(
            namespace=_get(platform, "namespace", PlatformSettings.namespace),
            operator_image=_get(platform, "operatorImage", PlatformSettings.operator_image),
            agent_image=_get(platform, "agentImage", PlatformSettings.agent_image),
            operator_replicas=int(_get(platform, "operatorReplicas", PlatformSettings.operator_replicas)),
            watch_namespaces=tuple(_get(platform, "watchNamespaces", [])),
            agent_port=int(_get(platform, "agentPort", PlatformSettings.agent_port)),
            agent_node_selector=platform.get("agentNodeSelector"),
            agent_tolerations=tuple(_get(platform, "agentTolerations", [])),
            prometheus_mode=mode if mode != "auto" else "helm",
            prometheus_url=prometheus.get("url"),
            prometheus_chart_version=_get(prometheus, "chartVersion", PlatformSettings.prometheus_chart_version),
            device_plugin=bool(_get(platform, "devicePlugin", device_plugin_default)),
            device_plugin_version=_get(platform, "devicePluginVersion", PlatformSettings.device_plugin_version),
            # k3s runs GPU containers through the "nvidia" runtime handler it registers itself.
            gpu_runtime_class=_get(platform, "gpuRuntimeClass", "nvidia" if target == "onprem" else None),
            workers=tuple(workers),
            create_worker_namespaces=bool(_get(platform, "createWorkerNamespaces", True)),
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"platform: {exc}") from None
    from digital_worker.stacks.manifests import validate_settings

    problems += validate_settings(settings)

    onprem_args = aws_config = None
    if target == "onprem":
        onprem_args = _parse_onprem(_get(values, "onprem", {}), base_dir, has_secret, problems, missing)
    elif target == "aws":
        aws_config = _parse_aws(_get(values, "aws", {}), problems)
    if require_secrets:
        problems += missing
    if problems:
        raise ConfigError("; ".join(problems))
    return StackConfig(
        target=target, platform=settings, prometheus_mode_requested=mode,
        kubeconfig=_kubeconfig(values.get("kubeconfig")), context=values.get("context"),
        onprem=onprem_args, aws=aws_config, missing_secrets=tuple(missing),
    )


def _parse_onprem(section: dict, base_dir: Path, has_secret: Callable[[str], bool], problems: list[str],
                  missing: list[str]):
    from digital_worker.stacks.onprem import HostConfig, K3sConfig, OnPremArgs, validate_onprem

    hosts = []
    for index, raw in enumerate(_get(section, "hosts", [])):
        where = f"onprem.hosts[{index}]"
        if not isinstance(raw, dict) or not raw.get("name") or not raw.get("address"):
            problems.append(f"{where} needs name and address")
            continue
        hosts.append(HostConfig(
            name=raw["name"], address=raw["address"], port=int(_get(raw, "port", 22)),
            user=_get(raw, "user", "root"), host_key=raw.get("hostKey"), gpu_type=raw.get("gpuType"),
            labels=dict(_get(raw, "labels", {})),
            taints=tuple(_get(raw, "taints", [hostprep.DEFAULT_GPU_TAINT])),
        ))
    k3s = _get(section, "k3s", {})
    k3s_config = K3sConfig(
        version=k3s.get("version"),
        default_runtime=k3s.get("defaultRuntime", "nvidia") or None,
        installer_url=_get(k3s, "installerUrl", hostprep.DEFAULT_K3S_INSTALLER_URL),
        installer_script=_read_local(k3s.get("installerScript"), base_dir, "onprem.k3s.installerScript", problems),
        server_url=k3s.get("serverUrl"),
    )
    args = OnPremArgs(
        hosts=tuple(hosts),
        private_key="<secret: sshPrivateKey>",
        k3s=k3s_config,
        join_token="<secret: k3sToken>",
        accept_unknown_host_keys=bool(_get(section, "acceptUnknownHostKeys", False)),
        install_toolkit=bool(_get(section, "installToolkit", False)),
        toolkit_install_script=_read_local(section.get("toolkitInstallScript"), base_dir,
                                           "onprem.toolkitInstallScript", problems),
        node_ready_timeout=float(_get(section, "nodeReadyTimeout", 300)),
        prepull_images=tuple(_get(section, "prepullImages", [])),
        smoke_test_image=section.get("smokeTestImage"),
    )
    problems += validate_onprem(args)
    if not has_secret("sshPrivateKey"):
        missing.append("sshPrivateKey is missing: pulumi config set --secret sshPrivateKey < ~/.ssh/id_ed25519")
    if k3s_config.server_url and not has_secret("k3sToken"):
        missing.append("k3sToken is missing (joining onprem.k3s.serverUrl): pulumi config set --secret k3sToken")
    for host in hosts:
        plan = hostprep.NodePlan(
            node_name=host.name, role="agent", server_url="https://placeholder:6443",
            target=hostprep.SshTarget(host.address, host.user, host.port, "placeholder", host.host_key,
                                      args.accept_unknown_host_keys),
            labels=dict(host.labels), taints=host.taints,
        )
        problems += [f"onprem.hosts[{host.name}]: {p}" for p in hostprep.validate_plan(plan)
                     if "hostKey" not in p]  # already reported by validate_onprem
        if host.host_key:
            try:
                parse_public_key(host.host_key)
            except ValueError as exc:
                problems.append(f"onprem.hosts[{host.name}].hostKey: {exc}")
    return args


def _parse_aws(section: dict, problems: list[str]):
    from digital_worker.stacks.aws import AwsClusterConfig, GpuNodeGroupConfig, validate_aws

    groups = []
    for index, raw in enumerate(_get(section, "gpuNodeGroups", [])):
        if not isinstance(raw, dict) or not raw.get("name"):
            problems.append(f"aws.gpuNodeGroups[{index}] needs a name")
            continue
        groups.append(GpuNodeGroupConfig(
            name=raw["name"], instance_types=tuple(_get(raw, "instanceTypes", [])),
            capacity_type=str(_get(raw, "capacityType", "ON_DEMAND")).upper().replace("-", "_"),
            min_size=int(_get(raw, "minSize", 0)), max_size=int(_get(raw, "maxSize", 2)),
            desired_size=int(_get(raw, "desiredSize", 1)), disk_size_gib=int(_get(raw, "diskSizeGiB", 200)),
            labels=dict(_get(raw, "labels", {})),
            taints=tuple(_get(raw, "taints", [hostprep.DEFAULT_GPU_TAINT])),
        ))
    config = AwsClusterConfig(
        region=_get(section, "region", ""),
        cluster_name=_get(section, "clusterName", "digital-worker"),
        kubernetes_version=str(_get(section, "kubernetesVersion", "1.31")),
        vpc_cidr=_get(section, "vpcCidr", "10.42.0.0/16"),
        availability_zones=tuple(_get(section, "availabilityZones", [])),
        gpu_node_groups=tuple(groups),
        system_instance_types=tuple(_get(section, "systemInstanceTypes", ["m6i.large"])),
        system_nodes=int(_get(section, "systemNodes", 2)),
        public_endpoint=bool(_get(section, "publicEndpoint", True)),
    )
    problems += validate_aws(config)
    return config


def _kubeconfig(value: str | None) -> str | None:
    """A path gets `~` expanded (the provider and the probe read it as given); kubeconfig text is kept."""
    if value and "\n" not in value:
        return str(Path(value).expanduser())
    return value


def load_stack_file(path: Path) -> tuple[dict[str, Any], set[str]]:
    """A `Pulumi.<stack>.yaml`'s project values (prefix stripped) and the names of its secure values."""
    import yaml

    document = yaml.safe_load(path.read_text()) or {}
    values: dict[str, Any] = {}
    secrets: set[str] = set()
    for key, value in (document.get("config") or {}).items():
        if not key.startswith(f"{PROJECT}:"):
            continue
        short = key.split(":", 1)[1]
        if isinstance(value, dict) and set(value) == {"secure"}:
            secrets.add(short)
            continue
        values[short] = value
    return values, secrets
