"""`OnPremGpuNodes`: bare-metal or VM GPU hosts turned into a k3s cluster over SSH.

One `GpuHost` dynamic resource per host (pure Python, paramiko). The first host becomes the k3s
server unless the stack joins an existing cluster; the others join it as agents with the
server's token. create/update are the same idempotent preparation (`hostprep.prepare_node`), so
re-running changes nothing; delete drains the node, removes it from the cluster and uninstalls
k3s. Host keys are always checked against the stack's expected key.
"""
from __future__ import annotations

import logging
import secrets as token_source
from dataclasses import dataclass, field
from typing import Any, Optional

import pulumi
from pulumi.dynamic import (
    CheckFailure,
    CheckResult,
    CreateResult,
    DiffResult,
    ReadResult,
    ResourceProvider,
    UpdateResult,
)

from digital_worker.stacks import hostprep
from digital_worker.stacks.remote import SshTarget

log = logging.getLogger("digital_worker.stacks.onprem")

# Inputs whose change means a different machine or a different cluster: delete, then create.
REPLACE_KEYS = ("node_name", "role", "address", "port", "server_url")
# Inputs that change what is applied on the same host: an in-place update.
UPDATE_KEYS = (
    "user", "private_key", "host_key", "accept_unknown_host_key", "k3s_version", "gpu_type", "labels",
    "taints", "install_toolkit", "toolkit_install_script", "installer_url", "installer_script",
    "server", "server_private_key", "node_ready_timeout", "prepull_images", "smoke_test_image",
    "default_runtime",  # k3s is reinstalled in place with the new runtime
)
# Outputs only the provider fills in; declared so Pulumi exposes them on the resource.
OUTPUT_KEYS = (
    "server_url", "gpu_product", "gpu_count", "driver_version", "toolkit_version", "applied_labels", "applied_taints",
    "host_key_seen", "kubeconfig", "commands", "drift",
)
SECRET_KEYS = ["private_key", "server_private_key", "k3s_token", "kubeconfig"]


def _target(props: dict[str, Any]) -> SshTarget:
    return SshTarget(
        address=props["address"],
        port=int(props.get("port") or 22),
        user=props.get("user") or "root",
        private_key=props.get("private_key") or "",
        # Once we have seen and trusted a key, we hold the host to it from then on.
        host_key=props.get("host_key") or props.get("host_key_seen") or None,
        accept_unknown_host_key=bool(props.get("accept_unknown_host_key")),
    )


def plan_from_props(props: dict[str, Any]) -> hostprep.NodePlan:
    server = props.get("server") or None
    server_target = None
    if server:
        server_target = SshTarget(
            address=server["address"],
            port=int(server.get("port") or 22),
            user=server.get("user") or "root",
            private_key=props.get("server_private_key") or props.get("private_key") or "",
            host_key=server.get("host_key") or None,
            accept_unknown_host_key=bool(server.get("accept_unknown_host_key")),
        )
    return hostprep.NodePlan(
        node_name=props["node_name"],
        role=props.get("role") or "agent",
        target=_target(props),
        server_url=props.get("server_url") or None,
        k3s_version=props.get("k3s_version") or None,
        gpu_type=props.get("gpu_type") or None,
        labels=dict(props.get("labels") or {}),
        taints=tuple(props.get("taints") if props.get("taints") is not None else (hostprep.DEFAULT_GPU_TAINT,)),
        install_toolkit=bool(props.get("install_toolkit")),
        toolkit_install_script=props.get("toolkit_install_script") or None,
        installer_url=props.get("installer_url") or hostprep.DEFAULT_K3S_INSTALLER_URL,
        installer_script=props.get("installer_script") or None,
        node_ready_timeout=float(props.get("node_ready_timeout") or 300.0),
        server_target=server_target,
        prepull_images=tuple(props.get("prepull_images") or ()),
        smoke_test_image=props.get("smoke_test_image") or None,
        default_runtime=props.get("default_runtime", "nvidia") or None,
    )


# What Pulumi's wire format puts where a value is not known yet (preview).
UNKNOWN = "04da6b54-80e4-46f7-96ec-b56ff0331ba9"


def _without_unknowns(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_unknowns(v) for k, v in value.items() if v != UNKNOWN}
    if isinstance(value, list):
        return [_without_unknowns(v) for v in value if v != UNKNOWN]
    return value


def _same(old: Any, new: Any) -> bool:
    # Pulumi hands back [] / {} / None interchangeably for empty inputs.
    return (old or None) == (new or None) or old == new


class GpuHostProvider(ResourceProvider):
    """CRUD for one prepared GPU host. Module-level, so Pulumi pickles it by reference."""

    serialize_as_secret_always = False

    def check(self, _olds: dict[str, Any], news: dict[str, Any]) -> CheckResult:
        failures = []
        for key in ("node_name", "address"):
            if not news.get(key):
                failures.append(CheckFailure(key, f"{key} is required"))
        if not failures:
            # Values still unknown during preview (the server's URL, token, host key) are not checked
            # here; create/update validate them once known. The rest must already be sound.
            known = _without_unknowns(news)
            try:
                problems = hostprep.validate_plan(plan_from_props(known))
            except (KeyError, TypeError, ValueError) as exc:
                problems = [str(exc)]
            for problem in problems:
                if "server URL" in problem and news.get("server_url") == UNKNOWN:
                    continue  # comes from the server resource; unknown until it exists
                failures.append(CheckFailure("host", problem))
        return CheckResult(news, failures)

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        replaces = [
            k for k in REPLACE_KEYS
            # A server's URL is an output it computes, not an input to compare.
            if not (k == "server_url" and news.get("role") == "server")
            and not _same(olds.get(k), news.get(k))
        ]
        # A token given by the stack that differs means another cluster; a generated one is kept.
        if news.get("k3s_token") and not _same(olds.get("k3s_token"), news.get("k3s_token")):
            replaces.append("k3s_token")
        updates = [k for k in UPDATE_KEYS if not _same(olds.get(k), news.get(k))]
        if olds.get("drift"):
            updates.append("drift")  # `pulumi refresh` saw the node differ from what we applied
        return DiffResult(
            changes=bool(replaces or updates),
            replaces=replaces,
            stables=["node_name"],
            # Same physical host: the old k3s must be gone before the new one is installed.
            delete_before_replace=True,
        )

    def _prepare(self, props: dict[str, Any], token: str, previous: dict[str, Any] | None) -> dict[str, Any]:
        plan = plan_from_props(props)
        prepared, transcript = hostprep.prepare_node(
            plan, token,
            previously_managed_labels=(previous or {}).get("applied_labels") or {},
            previously_managed_taints=tuple((previous or {}).get("applied_taints") or ()),
        )
        for line in transcript:
            log.info("%s", line)
        outs = dict(props)
        outs.update({
            "k3s_token": token,
            "gpu_product": prepared.gpus[0].product,
            "gpu_count": len(prepared.gpus),
            "driver_version": prepared.gpus[0].driver_version,
            "toolkit_version": prepared.toolkit_version,
            "applied_labels": prepared.labels,
            "applied_taints": list(prepared.taints),
            "host_key_seen": prepared.host_key,
            "kubeconfig": prepared.kubeconfig,
            "server_url": props.get("server_url")
            or (f"https://{plan.target.address}:{hostprep.K3S_PORT}" if plan.role == "server" else None),
            "commands": transcript,
            "drift": [],
        })
        return outs

    def create(self, props: dict[str, Any]) -> CreateResult:
        # The server makes up the cluster token unless the stack supplies one.
        token = props.get("k3s_token") or token_source.token_urlsafe(32)
        outs = self._prepare(props, token, None)
        return CreateResult(f"{props['node_name']}@{props['address']}:{int(props.get('port') or 22)}", outs)

    def update(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        token = news.get("k3s_token") or olds.get("k3s_token") or ""
        if not token:
            raise hostprep.PreparationError(f"host {news.get('node_name')}: no k3s token recorded or given")
        props = dict(news)
        if not props.get("host_key") and olds.get("host_key_seen"):
            props["host_key_seen"] = olds["host_key_seen"]
        return UpdateResult(self._prepare(props, token, olds))

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        """`pulumi refresh`: a wiped or removed node reads as gone; changed labels/taints as drift."""
        report = hostprep.inspect_node(
            plan_from_props(props), dict(props.get("applied_labels") or {}), tuple(props.get("applied_taints") or ()),
        )
        if not report.present:
            log.info("host %s: no longer prepared (marker, k3s or node object missing)", props.get("node_name"))
            return ReadResult(None, {})
        return ReadResult(id_, {**props, "drift": list(report.drift)})

    def delete(self, _id: str, props: dict[str, Any]) -> None:
        for line in hostprep.remove_node(plan_from_props(props)):
            log.info("%s", line)


class GpuHost(pulumi.dynamic.Resource, module="digitalworker", name="GpuHost"):
    """One prepared GPU host (see `GpuHostProvider`)."""

    node_name: pulumi.Output[str]
    server_url: pulumi.Output[Optional[str]]
    k3s_token: pulumi.Output[str]
    kubeconfig: pulumi.Output[Optional[str]]
    gpu_product: pulumi.Output[str]
    gpu_count: pulumi.Output[int]
    applied_labels: pulumi.Output[dict]
    applied_taints: pulumi.Output[list]
    host_key_seen: pulumi.Output[str]

    def __init__(self, name: str, props: dict[str, Any], opts: pulumi.ResourceOptions | None = None) -> None:
        full = {key: None for key in OUTPUT_KEYS}
        full.setdefault("k3s_token", None)
        full.update(props)
        secret_opts = pulumi.ResourceOptions(additional_secret_outputs=SECRET_KEYS)
        super().__init__(GpuHostProvider(), name, full, pulumi.ResourceOptions.merge(opts, secret_opts))


# -- the component ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class HostConfig:
    name: str
    address: str
    port: int = 22
    user: str = "root"
    host_key: str | None = None
    gpu_type: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    taints: tuple[str, ...] = (hostprep.DEFAULT_GPU_TAINT,)


@dataclass(frozen=True)
class K3sConfig:
    version: str | None = None
    default_runtime: str | None = "nvidia"
    installer_url: str = hostprep.DEFAULT_K3S_INSTALLER_URL
    installer_script: str | None = None  # the script's text (the stack reads it from a local file)
    # Join a cluster we do not manage: every host becomes an agent of this server.
    server_url: str | None = None


@dataclass(frozen=True)
class OnPremArgs:
    hosts: tuple[HostConfig, ...]
    private_key: Any  # pulumi.Input[str], normally a secret from config
    k3s: K3sConfig = K3sConfig()
    join_token: Any = None  # pulumi.Input[str]: required with k3s.server_url
    accept_unknown_host_keys: bool = False
    install_toolkit: bool = False
    toolkit_install_script: str | None = None
    node_ready_timeout: float = 300.0
    prepull_images: tuple[str, ...] = ()
    smoke_test_image: str | None = None


def validate_onprem(args: OnPremArgs) -> list[str]:
    problems = []
    if not args.hosts:
        problems.append("onprem.hosts is empty: list at least one GPU host")
    names = [h.name for h in args.hosts]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"onprem.hosts: name {dup!r} appears twice")
    for host in args.hosts:
        if not host.host_key and not args.accept_unknown_host_keys:
            problems.append(
                f"onprem.hosts[{host.name}].hostKey is missing (or set onprem.acceptUnknownHostKeys: true)"
            )
    if args.k3s.server_url and args.join_token is None:
        problems.append("onprem.k3s.serverUrl needs the secret onprem.k3s.token to join that cluster")
    return problems


class OnPremGpuNodes(pulumi.ComponentResource):
    """The hosts as k3s nodes; `kubeconfig` (secret) feeds a kubernetes Provider for `Platform`."""

    kubeconfig: pulumi.Output[Optional[str]]
    server_url: pulumi.Output[str]
    node_names: pulumi.Output[list]

    def __init__(self, name: str, args: OnPremArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("digitalworker:stacks:OnPremGpuNodes", name, None, opts)
        problems = validate_onprem(args)
        if problems:
            raise ValueError("; ".join(problems))
        child = pulumi.ResourceOptions(parent=self)
        self.hosts: list[GpuHost] = []

        def props_for(host: HostConfig, role: str) -> dict[str, Any]:
            return {
                "node_name": host.name,
                "role": role,
                "address": host.address,
                "port": host.port,
                "user": host.user,
                "private_key": pulumi.Output.secret(args.private_key),
                "host_key": host.host_key,
                "accept_unknown_host_key": args.accept_unknown_host_keys,
                "k3s_version": args.k3s.version,
                "default_runtime": args.k3s.default_runtime,
                "gpu_type": host.gpu_type,
                "labels": dict(host.labels),
                "taints": list(host.taints),
                "install_toolkit": args.install_toolkit,
                "toolkit_install_script": args.toolkit_install_script,
                "installer_url": args.k3s.installer_url,
                "installer_script": args.k3s.installer_script,
                "node_ready_timeout": args.node_ready_timeout,
                "prepull_images": list(args.prepull_images),
                "smoke_test_image": args.smoke_test_image,
            }

        if args.k3s.server_url:
            for host in args.hosts:
                props = props_for(host, "agent")
                props.update(server_url=args.k3s.server_url, k3s_token=pulumi.Output.secret(args.join_token))
                self.hosts.append(GpuHost(host.name, props, child))
            self.kubeconfig = pulumi.Output.from_input(None)
            self.server_url = pulumi.Output.from_input(args.k3s.server_url)
        else:
            first, *rest = args.hosts
            server = GpuHost(first.name, props_for(first, "server"), child)
            self.hosts.append(server)
            for host in rest:
                props = props_for(host, "agent")
                props.update(
                    server_url=server.server_url,
                    k3s_token=server.k3s_token,
                    server={"address": first.address, "port": first.port, "user": first.user,
                            "host_key": server.host_key_seen},
                )
                self.hosts.append(GpuHost(host.name, props, pulumi.ResourceOptions(parent=self, depends_on=[server])))
            self.kubeconfig = pulumi.Output.secret(server.kubeconfig)
            self.server_url = server.server_url
        self.node_names = pulumi.Output.all(*[h.node_name for h in self.hosts])
        self.register_outputs({
            "kubeconfig": self.kubeconfig, "server_url": self.server_url, "node_names": self.node_names,
        })
