"""Preparing one GPU host for the cluster, step by step, over a `RemoteHost`.

Order: NVIDIA driver check (`nvidia-smi`) -> container toolkit (verify, or install when asked)
-> k3s (server on the first host, agents joining it, or agents joining an existing cluster) ->
GPU labels and taints -> a marker file recording what was applied. The marker is written last,
so a host that drops mid-way has no record and the next run simply redoes the steps, which are
all safe to repeat. Nothing here imports Pulumi: the dynamic provider in `onprem.py` calls it.
"""
from __future__ import annotations

import hashlib
import json
import re
import shlex
import time
from dataclasses import dataclass, field
from typing import Any

from digital_worker.stacks.remote import CommandFailed, RemoteError, RemoteHost, SshTarget

STATE_DIR = "/var/lib/digital-worker"
MARKER_PATH = f"{STATE_DIR}/node.json"
TOKEN_PATH = f"{STATE_DIR}/k3s-token"
INSTALLER_PATH = f"{STATE_DIR}/k3s-install.sh"
TOOLKIT_INSTALLER_PATH = f"{STATE_DIR}/toolkit-install.sh"
K3S_PORT = 6443
DEFAULT_K3S_INSTALLER_URL = "https://get.k3s.io"

GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_TYPE_LABEL = "digitalworker.io/gpu-type"
GPU_COUNT_LABEL = "nvidia.com/gpu.count"
# What GPU feature discovery sets and the node agent DaemonSet selects on.
GPU_PRESENT_LABEL = "nvidia.com/gpu.present"
DEFAULT_GPU_TAINT = "nvidia.com/gpu=present:NoSchedule"

# NVIDIA's documented repository setup for the container toolkit on apt and dnf hosts; used only
# when the stack asks us to install the toolkit and gives no script of its own.
DEFAULT_TOOLKIT_INSTALL_SCRIPT = """#!/bin/sh
set -eu
if command -v apt-get >/dev/null 2>&1; then
  curl -fsSL https://nvidia.github.io/libnvidia-container/gpgkey \\
    | gpg --dearmor --yes -o /usr/share/keyrings/nvidia-container-toolkit-keyring.gpg
  curl -fsSL https://nvidia.github.io/libnvidia-container/stable/deb/nvidia-container-toolkit.list \\
    | sed 's#deb https://#deb [signed-by=/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg] https://#g' \\
    > /etc/apt/sources.list.d/nvidia-container-toolkit.list
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nvidia-container-toolkit
elif command -v dnf >/dev/null 2>&1; then
  curl -fsSL https://nvidia.github.io/libnvidia-container/stable/rpm/nvidia-container-toolkit.repo \\
    > /etc/yum.repos.d/nvidia-container-toolkit.repo
  dnf install -y nvidia-container-toolkit
else
  echo "no apt-get or dnf: install nvidia-container-toolkit by hand" >&2; exit 1
fi
"""

_TAINT = re.compile(r"^(?P<key>[A-Za-z0-9./_-]+)(=(?P<value>[A-Za-z0-9._-]*))?:(?P<effect>NoSchedule|PreferNoSchedule|NoExecute)$")
_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
_NODE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?$")


class PreparationError(RemoteError):
    """A host is not fit to be a GPU node (no driver, bad GPU, wrong cluster)."""


@dataclass(frozen=True)
class Gpu:
    product: str
    driver_version: str
    memory_mib: int


@dataclass(frozen=True)
class NodePlan:
    """What one host should become. Built from stack config by the component; plain data only."""

    node_name: str
    role: str  # "server" (runs the k3s control plane) or "agent"
    target: SshTarget
    server_url: str | None = None  # agents: https://server:6443
    k3s_version: str | None = None
    gpu_type: str | None = None  # default: derived from the product nvidia-smi reports
    labels: dict[str, str] = field(default_factory=dict)
    taints: tuple[str, ...] = (DEFAULT_GPU_TAINT,)
    install_toolkit: bool = False
    toolkit_install_script: str | None = None
    # The k3s installer: run from this URL on the host, or, when `installer_script` is given,
    # uploaded from the machine running Pulumi (air-gapped hosts, pinned installer).
    installer_url: str = DEFAULT_K3S_INSTALLER_URL
    installer_script: str | None = None
    node_ready_timeout: float = 300.0
    # Agents only: where to run kubectl for labels, taints and drains (the k3s server host).
    server_target: SshTarget | None = None
    # Pulled into k3s's own containerd (what the kubelet uses) before the node counts as prepared.
    prepull_images: tuple[str, ...] = ()
    # A container run with the node's GPUs (`k3s ctr run --gpus`) that must list them, once per image.
    smoke_test_image: str | None = None
    # containerd's default runtime on these GPU hosts: every pod (runtime pods, the node agent, the
    # device plugin) gets the NVIDIA runtime without each needing runtimeClassName. None: k3s's default.
    default_runtime: str | None = "nvidia"


def validate_plan(plan: NodePlan) -> list[str]:
    problems: list[str] = []
    if not _NODE_NAME.match(plan.node_name):
        problems.append(f"name {plan.node_name!r} is not a valid node name (lowercase, digits, '-', '.')")
    if plan.role not in ("server", "agent"):
        problems.append(f"role must be 'server' or 'agent', not {plan.role!r}")
    if plan.role == "agent" and not plan.server_url:
        problems.append("agents need a server URL (the first host's, or k3s.serverUrl)")
    if not plan.target.address:
        problems.append("address is empty")
    if not plan.target.private_key:
        problems.append("no SSH private key")
    if not plan.target.host_key and not plan.target.accept_unknown_host_key:
        problems.append("hostKey is missing (or set acceptUnknownHostKey: true to trust on first use)")
    for key, value in plan.labels.items():
        if not _LABEL_KEY.match(key) or not _LABEL_VALUE.match(str(value)) or len(str(value)) > 63:
            problems.append(f"label {key}={value!r} is not a valid Kubernetes label")
    for taint in plan.taints:
        if not _TAINT.match(taint):
            problems.append(f"taint {taint!r} must look like key=value:NoSchedule")
    return problems


# Marketed memory sizes (GB) nvidia-smi's MiB are snapped to: 81559 MiB is an "80GB" H100.
_MARKETED_GB = (8, 10, 12, 16, 20, 24, 32, 40, 48, 64, 80, 94, 96, 141, 180, 192)


def gpu_type_from_product(product: str, memory_mib: int = 0) -> str:
    """The `digitalworker.io/gpu-type` value: `NVIDIA H100 80GB HBM3`, 81559 MiB -> `nvidia-h100-80gb`.

    Same spelling as the AWS node groups use (`stacks/aws.py`), so one DigitalWorker `gpuType`
    schedules the same way on either target.
    """
    words = [w for w in re.split(r"[\s_]+", product.strip()) if w]
    while words and words[0].lower() in ("nvidia", "tesla", "geforce", "quadro", "rtx"):
        words.pop(0)
    model = re.sub(r"[^a-z0-9]", "", (words[0] if words else product).split("-")[0].lower()) or "unknown"
    if memory_mib <= 0:
        return f"nvidia-{model}"
    gib = memory_mib / 1024
    marketed = min(_MARKETED_GB, key=lambda size: abs(size - gib))
    return f"nvidia-{model}-{marketed}gb"


def product_label_value(product: str) -> str:
    """GPU feature discovery's spelling: spaces become dashes (`NVIDIA-A100-SXM4-80GB`)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "", re.sub(r"\s+", "-", product.strip()))[:63].strip("-_.")


def gpu_labels(plan: NodePlan, gpus: list[Gpu]) -> dict[str, str]:
    """The labels the operator schedules on, plus whatever the stack adds."""
    product = gpus[0].product
    labels = {
        GPU_PRESENT_LABEL: "true",
        GPU_PRODUCT_LABEL: product_label_value(product),
        GPU_TYPE_LABEL: plan.gpu_type or gpu_type_from_product(product, gpus[0].memory_mib),
        GPU_COUNT_LABEL: str(len(gpus)),
    }
    labels.update(plan.labels)
    return labels


def install_fingerprint(plan: NodePlan) -> str:
    """What requires re-running the k3s installer when it changes (labels and taints do not)."""
    relevant = {
        "role": plan.role,
        "server_url": plan.server_url,
        "k3s_version": plan.k3s_version,
        "default_runtime": plan.default_runtime,
        "node_name": plan.node_name,
        "address": plan.target.address,
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def token_fingerprint(token: str) -> str:
    # Records which token a node joined with without storing the token in the marker.
    return hashlib.sha256(token.encode()).hexdigest()[:16]


# -- steps ---------------------------------------------------------------------------------------
def probe_gpus(host: RemoteHost) -> list[Gpu]:
    result = host.run(
        "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader,nounits",
        step="check NVIDIA driver", check=False,
    )
    if result.status == 127 or "not found" in result.stderr:
        raise PreparationError(f"host {host.name}: NVIDIA driver missing (nvidia-smi not found); install the driver first")
    if result.status != 0:
        raise PreparationError(
            f"host {host.name}: nvidia-smi failed (exit {result.status}): {result.stderr.strip() or result.stdout.strip()}"
        )
    gpus = []
    for line in result.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 3:
            continue
        try:
            memory = int(float(parts[2]))
        except ValueError:
            memory = 0
        gpus.append(Gpu(parts[0], parts[1], memory))
    if not gpus:
        raise PreparationError(f"host {host.name}: nvidia-smi lists no GPU")
    return gpus


def ensure_container_toolkit(host: RemoteHost, plan: NodePlan) -> str:
    """The toolkit's version; installs it first when missing and the stack allows it."""
    found = host.run("nvidia-ctk --version", step="check container toolkit", check=False)
    if found.status != 0:
        if not plan.install_toolkit:
            raise PreparationError(
                f"host {host.name}: NVIDIA container toolkit missing (nvidia-ctk not found); "
                "install it or set installToolkit: true"
            )
        host.put(TOOLKIT_INSTALLER_PATH, plan.toolkit_install_script or DEFAULT_TOOLKIT_INSTALL_SCRIPT,
                 step="install container toolkit", mode=0o700)
        host.run(f"sh {TOOLKIT_INSTALLER_PATH}", step="install container toolkit")
        found = host.run("nvidia-ctk --version", step="check container toolkit")
    first = found.stdout.strip().splitlines()[0] if found.stdout.strip() else ""
    match = re.search(r"(\d+\.\d+(\.\d+)?)", first)
    return match.group(1) if match else first


def read_marker(host: RemoteHost) -> dict[str, Any] | None:
    result = host.run(f"cat {MARKER_PATH}", step="read node marker", check=False)
    if result.status != 0:
        return None
    try:
        return json.loads(result.stdout)
    except json.JSONDecodeError:
        return None  # a torn marker counts as none: the steps are redone


def install_k3s(host: RemoteHost, plan: NodePlan, token: str, labels: dict[str, str]) -> None:
    host.put(TOKEN_PATH, token + "\n", step="write k3s token", mode=0o600)
    args = [plan.role, "--node-name", plan.node_name, "--token-file", TOKEN_PATH]
    for key, value in sorted(labels.items()):
        args += ["--node-label", f"{key}={value}"]
    for taint in plan.taints:
        args += ["--node-taint", taint]
    if plan.default_runtime:
        args += ["--default-runtime", plan.default_runtime]
    env = {}
    if plan.k3s_version:
        env["INSTALL_K3S_VERSION"] = plan.k3s_version
    if plan.role == "server":
        # The kubeconfig we hand back must be valid for the address we reach the server on.
        args += ["--tls-san", plan.target.address, "--write-kubeconfig-mode", "0600"]
    else:
        env["K3S_URL"] = plan.server_url or ""
    env_prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()))
    quoted = " ".join(shlex.quote(a) for a in args)
    if plan.installer_script is not None:
        host.put(INSTALLER_PATH, plan.installer_script, step="upload k3s installer", mode=0o700)
        command = f"env {env_prefix} sh {INSTALLER_PATH} {quoted}"
    else:
        command = f"curl -sfL {shlex.quote(plan.installer_url)} | env {env_prefix} sh -s - {quoted}"
    host.run(command, step=f"install k3s {plan.role}")


def wait_for_node(kubectl_host: RemoteHost, node_name: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        result = kubectl_host.run(
            f"k3s kubectl get node {shlex.quote(node_name)} -o json", step=f"wait for node {node_name}", check=False,
        )
        if result.status == 0:
            return json.loads(result.stdout)
        if time.monotonic() > deadline:
            raise PreparationError(
                f"node {node_name} did not register with the cluster within {timeout:.0f}s: {result.stderr.strip()}"
            )
        time.sleep(min(5.0, max(0.2, timeout / 20)))


def reconcile_labels_and_taints(
    kubectl_host: RemoteHost,
    node: dict[str, Any],
    desired_labels: dict[str, str],
    desired_taints: tuple[str, ...],
    previously_managed_labels: dict[str, str],
    previously_managed_taints: tuple[str, ...],
) -> bool:
    """Make the node's labels and taints match; only keys we manage are removed. Returns whether it changed."""
    name = node["metadata"]["name"]
    current_labels = node["metadata"].get("labels", {}) or {}
    current_taints = {
        (t["key"], t.get("value", "") or "", t["effect"]) for t in (node.get("spec", {}).get("taints") or [])
    }
    changed = False
    to_set = {k: v for k, v in desired_labels.items() if current_labels.get(k) != v}
    to_remove = [k for k in previously_managed_labels if k not in desired_labels and k in current_labels]
    if to_set or to_remove:
        args = [f"{k}={v}" for k, v in sorted(to_set.items())] + [f"{k}-" for k in sorted(to_remove)]
        kubectl_host.run(
            f"k3s kubectl label node {shlex.quote(name)} {' '.join(shlex.quote(a) for a in args)} --overwrite",
            step=f"label node {name}",
        )
        changed = True
    wanted = {split_taint(t) for t in desired_taints}
    stale = {split_taint(t) for t in previously_managed_taints} - wanted
    add = [t for t in wanted if t not in current_taints]
    remove = [t for t in stale if t in current_taints]
    if add:
        spec = " ".join(shlex.quote(f"{k}={v}:{e}" if v else f"{k}:{e}") for k, v, e in sorted(add))
        kubectl_host.run(f"k3s kubectl taint node {shlex.quote(name)} {spec} --overwrite", step=f"taint node {name}")
        changed = True
    if remove:
        spec = " ".join(shlex.quote(f"{k}:{e}-") for k, _, e in sorted(remove))
        kubectl_host.run(f"k3s kubectl taint node {shlex.quote(name)} {spec}", step=f"untaint node {name}")
        changed = True
    return changed


def split_taint(taint: str) -> tuple[str, str, str]:
    match = _TAINT.match(taint)
    if not match:
        raise ValueError(f"taint {taint!r} must look like key=value:NoSchedule")
    return match["key"], match["value"] or "", match["effect"]


_IMAGE_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@-]*$")


def prepull_images(host: RemoteHost, images: tuple[str, ...]) -> list[str]:
    """Pull what is not there yet into k3s's containerd; returns the images actually pulled."""
    pulled = []
    for image in images:
        if not _IMAGE_REF.match(image):
            raise PreparationError(f"host {host.name}: {image!r} is not an image reference")
        quoted = shlex.quote(image)
        present = host.run(f"k3s crictl inspecti {quoted} >/dev/null 2>&1", step=f"check image {image}", check=False)
        if present.status != 0:
            host.run(f"k3s crictl pull {quoted}", step=f"pull image {image}")
            pulled.append(image)
    return pulled


def gpu_smoke_test(host: RemoteHost, node_name: str, image: str, expected_gpus: int) -> None:
    """Run a container with the node's GPUs through k3s's containerd; it must see every GPU."""
    if not _IMAGE_REF.match(image):
        raise PreparationError(f"host {host.name}: {image!r} is not an image reference")
    quoted = shlex.quote(image)
    host.run(f"k3s crictl inspecti {quoted} >/dev/null 2>&1 || k3s crictl pull {quoted}",
             step=f"pull smoke test image {image}")
    result = host.run(
        f"k3s ctr run --rm --gpus 0 {quoted} dw-gpu-smoke-{shlex.quote(node_name)} nvidia-smi -L",
        step="GPU smoke test", check=False,
    )
    seen = [line for line in result.stdout.splitlines() if line.startswith("GPU ")]
    if result.status != 0 or len(seen) < expected_gpus:
        detail = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1]
        raise PreparationError(
            f"host {host.name}: GPU smoke test in {image} failed (exit {result.status}, "
            f"{len(seen)}/{expected_gpus} GPUs visible): {detail}"
        )


def fetch_kubeconfig(host: RemoteHost, address: str) -> str:
    raw = host.run("k3s kubectl config view --raw", step="read kubeconfig").stdout
    # k3s writes its loopback address; clients outside the host need the one we reached it on.
    return re.sub(r"https://(127\.0\.0\.1|localhost|\[::1\]):", f"https://{address}:", raw)


@dataclass(frozen=True)
class PreparedNode:
    node_name: str
    gpus: list[Gpu]
    toolkit_version: str
    labels: dict[str, str]
    taints: tuple[str, ...]
    host_key: str
    installed: bool  # whether the k3s installer ran this time
    relabelled: bool
    kubeconfig: str | None = None
    pulled_images: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return self.installed or self.relabelled


def prepare_node(
    plan: NodePlan,
    token: str,
    *,
    previously_managed_labels: dict[str, str] | None = None,
    previously_managed_taints: tuple[str, ...] = (),
    command_timeout: float = 900.0,
) -> tuple[PreparedNode, list[str]]:
    """Bring one host to `plan`; safe to repeat. Returns the result and the (redacted) command log."""
    problems = validate_plan(plan)
    if problems:
        raise PreparationError(f"host {plan.node_name}: " + "; ".join(problems))
    secrets = [token]
    transcript: list[str] = []
    with RemoteHost(plan.target, name=plan.node_name, secrets=secrets, command_timeout=command_timeout) as host:
        try:
            gpus = probe_gpus(host)
            toolkit = ensure_container_toolkit(host, plan)
            labels = gpu_labels(plan, gpus)
            marker = read_marker(host)
            fingerprint = install_fingerprint(plan)
            needs_install = not (
                marker
                and marker.get("install") == fingerprint
                and marker.get("token") == token_fingerprint(token)
            )
            if not needs_install and not _node_registered(host, plan, token, command_timeout, transcript):
                # Prepared once, but its Node object is gone (deleted by hand): join again.
                needs_install = True
            if needs_install:
                install_k3s(host, plan, token, labels)
            if plan.role == "server":
                node = wait_for_node(host, plan.node_name, plan.node_ready_timeout)
                relabelled = reconcile_labels_and_taints(
                    host, node, labels, plan.taints,
                    previously_managed_labels or {}, tuple(previously_managed_taints),
                )
                kubeconfig = fetch_kubeconfig(host, plan.target.address)
                host.redact.add(kubeconfig)
            else:
                relabelled = _relabel_from_server(plan, token, labels, previously_managed_labels,
                                                  previously_managed_taints, command_timeout, transcript)
                kubeconfig = None
            pulled = prepull_images(host, plan.prepull_images)
            # A fresh install, or an image not yet proven on this node, earns a smoke test; a re-run does not.
            smoke_passed = (marker or {}).get("smoke_test_image") if not needs_install else None
            if plan.smoke_test_image and plan.smoke_test_image != smoke_passed:
                gpu_smoke_test(host, plan.node_name, plan.smoke_test_image, len(gpus))
            new_marker = {
                "install": fingerprint,
                "token": token_fingerprint(token),
                "node_name": plan.node_name,
                "role": plan.role,
                "labels": labels,
                "taints": list(plan.taints),
            }
            if plan.smoke_test_image:
                new_marker["smoke_test_image"] = plan.smoke_test_image
            if needs_install or relabelled or marker != new_marker:
                host.put(MARKER_PATH, json.dumps(new_marker, sort_keys=True) + "\n", step="record node marker",
                         mode=0o644)
        finally:
            transcript[:0] = [f"{plan.node_name}: $ {r.command} -> {r.status}" for r in host.transcript]
        prepared = PreparedNode(
            node_name=plan.node_name, gpus=gpus, toolkit_version=toolkit, labels=labels,
            taints=tuple(plan.taints), host_key=host.host_key_seen or "", installed=needs_install,
            relabelled=relabelled, kubeconfig=kubeconfig, pulled_images=tuple(pulled),
        )
    return prepared, transcript


def _node_registered(host: RemoteHost, plan: NodePlan, token: str, command_timeout: float,
                     transcript: list[str]) -> bool:
    command = f"k3s kubectl get node {shlex.quote(plan.node_name)} -o name"
    if plan.role == "server":
        return host.run(command, step=f"find node {plan.node_name}", check=False).status == 0
    if plan.server_target is None:
        return True  # a cluster we do not manage: the marker is all we can go by
    with RemoteHost(plan.server_target, name=f"{plan.node_name}@server", secrets=[token],
                    command_timeout=command_timeout) as server:
        try:
            return server.run(command, step=f"find node {plan.node_name}", check=False).status == 0
        finally:
            transcript.extend(f"{plan.node_name}@server: $ {r.command} -> {r.status}" for r in server.transcript)


def _relabel_from_server(
    plan: NodePlan, token: str, labels: dict[str, str],
    previously_managed_labels: dict[str, str] | None, previously_managed_taints: tuple[str, ...],
    command_timeout: float, transcript: list[str],
) -> bool:
    """Agents get their labels and taints from the server host's kubectl (when we manage the server)."""
    if plan.server_target is None:
        # Joining a cluster we do not manage: labels and taints were passed at registration.
        return False
    with RemoteHost(plan.server_target, name=f"{plan.node_name}@server", secrets=[token],
                    command_timeout=command_timeout) as server:
        try:
            node = wait_for_node(server, plan.node_name, plan.node_ready_timeout)
            return reconcile_labels_and_taints(
                server, node, labels, plan.taints, previously_managed_labels or {}, tuple(previously_managed_taints),
            )
        finally:
            transcript.extend(f"{plan.node_name}@server: $ {r.command} -> {r.status}" for r in server.transcript)


@dataclass(frozen=True)
class NodeReport:
    """What `pulumi refresh` learns about a prepared host."""

    present: bool  # False: wiped, reinstalled, or deleted from the cluster; the next `up` recreates it
    drift: tuple[str, ...] = ()  # managed labels/taints that no longer match what was applied


def inspect_node(
    plan: NodePlan, applied_labels: dict[str, str], applied_taints: tuple[str, ...], *, command_timeout: float = 120.0,
) -> NodeReport:
    """Read-only: is the host still our node, and do its labels and taints still match? Changes nothing."""
    with RemoteHost(plan.target, name=plan.node_name, command_timeout=command_timeout) as host:
        marker = read_marker(host)
        has_k3s = host.run("command -v k3s", step="check k3s", check=False).status == 0
        if not marker or marker.get("node_name") != plan.node_name or not has_k3s:
            return NodeReport(present=False)
        if plan.role == "server":
            return _compare_node(host, plan.node_name, applied_labels, applied_taints)
    if plan.server_target is None:
        return NodeReport(present=True)  # a cluster we do not manage: nothing to ask
    with RemoteHost(plan.server_target, name=f"{plan.node_name}@server", command_timeout=command_timeout) as server:
        return _compare_node(server, plan.node_name, applied_labels, applied_taints)


def _compare_node(kubectl_host: RemoteHost, node_name: str, applied_labels: dict[str, str],
                  applied_taints: tuple[str, ...]) -> NodeReport:
    result = kubectl_host.run(f"k3s kubectl get node {shlex.quote(node_name)} -o json",
                              step=f"read node {node_name}", check=False)
    if result.status != 0:
        return NodeReport(present=False)
    node = json.loads(result.stdout)
    labels = node["metadata"].get("labels") or {}
    taints = {(t["key"], t.get("value", "") or "", t["effect"]) for t in (node.get("spec", {}).get("taints") or [])}
    drift = [f"label {k}: {labels.get(k)!r} instead of {v!r}" for k, v in sorted(applied_labels.items())
             if labels.get(k) != v]
    drift += [f"taint {t} missing" for t in applied_taints if split_taint(t) not in taints]
    return NodeReport(present=True, drift=tuple(drift))


def remove_node(plan: NodePlan, *, command_timeout: float = 900.0, drain_timeout: str = "300s") -> list[str]:
    """Drain and delete the node from the cluster, then uninstall k3s from the host. Safe to repeat."""
    transcript: list[str] = []
    if plan.role == "agent" and plan.server_target is not None:
        with RemoteHost(plan.server_target, name=f"{plan.node_name}@server", command_timeout=command_timeout) as server:
            try:
                name = shlex.quote(plan.node_name)
                present = server.run(f"k3s kubectl get node {name} -o name", step=f"find node {plan.node_name}",
                                     check=False)
                if present.status == 0:
                    server.run(
                        f"k3s kubectl drain {name} --ignore-daemonsets --delete-emptydir-data --force "
                        f"--timeout={drain_timeout}",
                        step=f"drain node {plan.node_name}",
                    )
                    server.run(f"k3s kubectl delete node {name}", step=f"delete node {plan.node_name}")
            finally:
                transcript.extend(f"{plan.node_name}@server: $ {r.command} -> {r.status}" for r in server.transcript)
    with RemoteHost(plan.target, name=plan.node_name, command_timeout=command_timeout) as host:
        try:
            script = "k3s-uninstall.sh" if plan.role == "server" else "k3s-agent-uninstall.sh"
            host.run(
                f"if command -v {script} >/dev/null 2>&1; then {script}; fi",
                step=f"uninstall k3s {plan.role}",
            )
            host.run(f"rm -f {MARKER_PATH} {TOKEN_PATH} {INSTALLER_PATH}", step="remove node marker")
        finally:
            transcript[:0] = [f"{plan.node_name}: $ {r.command} -> {r.status}" for r in host.transcript]
    return transcript


__all__ = [
    "CommandFailed", "Gpu", "NodePlan", "PreparationError", "PreparedNode", "gpu_labels",
    "gpu_type_from_product", "install_fingerprint", "prepare_node", "remove_node", "validate_plan",
]
