"""The GpuHost dynamic provider's check/create/diff/update/delete against real sshd hosts on loopback."""
from __future__ import annotations

import logging
import stat

import pytest

from digital_worker.stacks import hostprep
from digital_worker.stacks.onprem import GpuHostProvider
from digital_worker.stacks.remote import ConnectionLost, HostKeyError, RemoteError, RemoteHost, SshTarget
from stacks_fakehosts import FakeFleet, FAKE_TOOLKIT_INSTALLER, has_tools, other_host_key

pytestmark = pytest.mark.skipif(not has_tools(), reason="needs root, unshare and Debian's openssh-server")

TOKEN = "K10-cluster-token-5f9d0c7e2b"


@pytest.fixture
def fleet(tmp_path):
    fleet = FakeFleet(tmp_path)
    try:
        yield fleet
    finally:
        fleet.stop()


@pytest.fixture
def provider():
    return GpuHostProvider()


def host_props(fleet: FakeFleet, host, role: str, **extra) -> dict:
    props = {
        "node_name": host.name,
        "role": role,
        "address": "127.0.0.1",
        "port": host.port,
        "user": "root",
        "private_key": fleet.private_key,
        "host_key": host.host_key,
        "installer_script": fleet.installer,
        "node_ready_timeout": 5,
        "labels": {},
        "taints": ["nvidia.com/gpu=present:NoSchedule"],
    }
    props.update(extra)
    return props


def agent_props(fleet, host, server_host, server_outs, **extra) -> dict:
    return host_props(
        fleet, host, "agent",
        server_url=server_outs["server_url"],
        k3s_token=server_outs["k3s_token"],
        server={"address": "127.0.0.1", "port": server_host.port, "user": "root",
                "host_key": server_outs["host_key_seen"]},
        **extra,
    )


def test_server_and_agent_become_labelled_tainted_gpu_nodes(fleet, provider):
    server_host = fleet.add_host("gpu-a", gpu="NVIDIA A100-SXM4-80GB", gpus=2)
    agent_host = fleet.add_host("gpu-b", gpu="NVIDIA H100 80GB HBM3", gpus=8)

    server = provider.create(host_props(fleet, server_host, "server", labels={"pool": "prod"}))
    assert server.id == f"gpu-a@127.0.0.1:{server_host.port}"
    outs = server.outs
    assert outs["server_url"] == "https://127.0.0.1:6443"
    assert outs["gpu_product"] == "NVIDIA A100-SXM4-80GB" and outs["gpu_count"] == 2
    assert outs["host_key_seen"] == server_host.host_key
    assert len(outs["k3s_token"]) >= 32  # generated, since the stack gave none
    assert "FAKE-CLIENT-KEY" in outs["kubeconfig"] and "https://127.0.0.1:6443" in outs["kubeconfig"]

    agent = provider.create(agent_props(fleet, agent_host, server_host, outs))
    assert agent.outs["gpu_product"] == "NVIDIA H100 80GB HBM3"

    node_a, node_b = fleet.node("gpu-a"), fleet.node("gpu-b")
    assert node_a["metadata"]["labels"] == {
        "nvidia.com/gpu.present": "true",
        "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB", "digitalworker.io/gpu-type": "nvidia-a100-80gb",
        "nvidia.com/gpu.count": "2", "pool": "prod",
    }
    assert node_b["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    assert node_b["metadata"]["labels"]["digitalworker.io/gpu-type"] == "nvidia-h100-80gb"
    for node in (node_a, node_b):
        assert node["spec"]["taints"] == [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]
    # GPU hosts run every pod through the NVIDIA runtime (no runtimeClassName needed in pod specs).
    installs = [c for c in server.outs["commands"] + agent.outs["commands"] if "sh /var/lib/digital-worker/k3s-install.sh" in c]
    assert len(installs) == 2 and all("--default-runtime nvidia" in c for c in installs)
    # The agent joined with the server's token (the fake installer rejects any other).
    assert fleet.installs() == ["gpu-a server", "gpu-b agent"]
    # The token travelled as a root-only file, and the marker records the applied state.
    token_file = agent_host.varlib / "digital-worker" / "k3s-token"
    assert token_file.read_text().strip() == outs["k3s_token"]
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert agent_host.marker.exists() and outs["k3s_token"] not in agent_host.marker.read_text()


def test_rerunning_changes_nothing(fleet, provider):
    host = fleet.add_host("gpu-a")
    props = host_props(fleet, host, "server", k3s_token=TOKEN)
    first = provider.create(props)
    marker_before = host.marker.read_text()
    kubectl_calls = (fleet.cluster / "kubectl.log").read_text().splitlines()

    # Same inputs as recorded: Pulumi sees no diff, so nothing runs at all.
    assert provider.diff(first.id, first.outs, props).changes is False
    # Even a forced re-create (e.g. state lost) only reads: no installer, no label or marker write.
    again = provider.create(props)
    assert fleet.installs() == ["gpu-a server"]
    assert host.marker.read_text() == marker_before
    new_kubectl = (fleet.cluster / "kubectl.log").read_text().splitlines()[len(kubectl_calls):]
    assert all(call.startswith(("kubectl get node", "kubectl config view")) for call in new_kubectl), new_kubectl
    mutating = [c for c in again.outs["commands"] if "install" in c or "label" in c or "taint" in c]
    assert mutating == [], mutating
    assert again.outs["applied_labels"] == first.outs["applied_labels"]


def test_label_and_taint_changes_are_in_place_updates(fleet, provider):
    host = fleet.add_host("gpu-a")
    props = host_props(fleet, host, "server", k3s_token=TOKEN, labels={"pool": "prod", "team": "a"})
    created = provider.create(props)
    news = dict(props, labels={"pool": "batch"}, taints=["nvidia.com/gpu=present:NoExecute"], gpu_type="nvidia-a100-80gb-sxm")

    diff = provider.diff(created.id, created.outs, news)
    assert diff.changes is True and diff.replaces == []
    updated = provider.update(created.id, created.outs, news)

    labels = fleet.node("gpu-a")["metadata"]["labels"]
    assert labels["pool"] == "batch" and "team" not in labels  # a label we managed and dropped is removed
    assert labels["digitalworker.io/gpu-type"] == "nvidia-a100-80gb-sxm"
    assert fleet.node("gpu-a")["spec"]["taints"] == [
        {"key": "nvidia.com/gpu", "value": "present", "effect": "NoExecute"}]
    assert fleet.installs() == ["gpu-a server"]  # labels and taints never reinstall k3s
    assert updated.outs["applied_taints"] == ["nvidia.com/gpu=present:NoExecute"]


def test_moving_a_node_is_a_replacement_deleting_first(fleet, provider):
    host = fleet.add_host("gpu-a")
    props = host_props(fleet, host, "server", k3s_token=TOKEN)
    created = provider.create(props)
    diff = provider.diff(created.id, created.outs, dict(props, address="10.0.0.7"))
    assert diff.replaces == ["address"] and diff.delete_before_replace is True
    diff = provider.diff(created.id, created.outs, dict(props, k3s_token="another-cluster-token"))
    assert "k3s_token" in diff.replaces
    # A generated token the stack never gave is not a change.
    generated = provider.create(dict(props, k3s_token=None))
    assert provider.diff(generated.id, generated.outs, dict(props, k3s_token=None)).changes is False


def test_wrong_or_unknown_host_key_is_refused_before_any_command(fleet, provider):
    host = fleet.add_host("gpu-a")
    with pytest.raises(HostKeyError, match="not the expected host key"):
        provider.create(host_props(fleet, host, "server", host_key=other_host_key()))
    # Without a key (and without opting in to trust on first use) the provider will not even try...
    with pytest.raises(hostprep.PreparationError, match="hostKey is missing"):
        provider.create(host_props(fleet, host, "server", host_key=None))
    # ...and the SSH layer itself refuses an unknown key.
    target = SshTarget("127.0.0.1", port=host.port, private_key=fleet.private_key)
    with pytest.raises(HostKeyError, match="unknown host key"):
        RemoteHost(target, name="gpu-a").connect()
    assert fleet.installs() == [] and not host.marker.exists()
    # check() reports the missing key as a config problem before anything connects.
    failures = provider.check({}, host_props(fleet, host, "server", host_key=None)).failures
    assert any("hostKey" in f.reason for f in failures)


def test_trust_on_first_use_only_when_asked_and_then_pinned(fleet, provider):
    host = fleet.add_host("gpu-a")
    props = host_props(fleet, host, "server", host_key=None, accept_unknown_host_key=True, k3s_token=TOKEN)
    created = provider.create(props)
    assert created.outs["host_key_seen"] == host.host_key
    # The host is re-keyed (or impersonated): the recorded key now refuses it, even with TOFU on.
    host.stop()
    (host.root / "host_key").unlink()
    (host.root / "host_key.pub").unlink()
    import subprocess
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host.root / "host_key")], check=True)
    host.start()
    with pytest.raises(HostKeyError):
        provider.update(created.id, created.outs, dict(props, labels={"x": "y"}))


def test_host_dropping_mid_install_fails_clearly_and_records_nothing(fleet, provider):
    server_host = fleet.add_host("gpu-a")
    agent_host = fleet.add_host("gpu-b")
    server = provider.create(host_props(fleet, server_host, "server", k3s_token=TOKEN))
    agent_host.drop_during_next_install()

    props = agent_props(fleet, agent_host, server_host, server.outs)
    with pytest.raises(ConnectionLost) as failure:
        provider.create(props)
    message = str(failure.value)
    assert "gpu-b" in message and "install k3s agent" in message and "did not finish" in message
    assert TOKEN not in message
    # No half-recorded state: no marker, no node object; Pulumi records nothing for a failed create.
    assert not agent_host.marker.exists()
    assert fleet.node("gpu-b") is None
    # The host is back (its sshd listener survived): the same create now completes.
    created = provider.create(props)
    assert fleet.node("gpu-b") is not None and agent_host.marker.exists()
    assert created.outs["applied_labels"]["digitalworker.io/gpu-type"] == "nvidia-a100-80gb"


def test_unreachable_host_is_a_clear_error(fleet, provider):
    host = fleet.add_host("gpu-a")
    host.stop()
    with pytest.raises(ConnectionLost, match="gpu-a .* unreachable"):
        provider.create(host_props(fleet, host, "server", k3s_token=TOKEN))


def test_removing_an_agent_drains_deletes_and_uninstalls(fleet, provider):
    server_host = fleet.add_host("gpu-a")
    agent_host = fleet.add_host("gpu-b")
    server = provider.create(host_props(fleet, server_host, "server", k3s_token=TOKEN))
    agent = provider.create(agent_props(fleet, agent_host, server_host, server.outs))
    assert agent_host.k3s_installed()

    provider.delete(agent.id, agent.outs)
    calls = (fleet.cluster / "kubectl.log").read_text()
    assert "drain gpu-b --ignore-daemonsets" in calls and "delete node gpu-b" in calls
    assert fleet.node("gpu-b") is None
    assert not agent_host.k3s_installed() and not agent_host.marker.exists()
    assert not (agent_host.varlib / "digital-worker" / "k3s-token").exists()
    assert fleet.node("gpu-a") is not None  # the server is untouched
    provider.delete(agent.id, agent.outs)  # deleting again is harmless


def test_hosts_without_driver_or_toolkit(fleet, provider):
    no_driver = fleet.add_host("gpu-a", gpu=None)
    with pytest.raises(hostprep.PreparationError, match="NVIDIA driver missing"):
        provider.create(host_props(fleet, no_driver, "server", k3s_token=TOKEN))
    no_toolkit = fleet.add_host("gpu-b", toolkit=False)
    with pytest.raises(hostprep.PreparationError, match="container toolkit missing"):
        provider.create(host_props(fleet, no_toolkit, "server", k3s_token=TOKEN))
    assert fleet.installs() == []
    created = provider.create(host_props(
        fleet, no_toolkit, "server", k3s_token=TOKEN,
        install_toolkit=True, toolkit_install_script=FAKE_TOOLKIT_INSTALLER,
    ))
    assert created.outs["toolkit_version"] == "1.17.3"
    assert (no_toolkit.bin / "nvidia-ctk").exists()


def test_agent_with_the_wrong_token_is_rejected(fleet, provider):
    server_host = fleet.add_host("gpu-a")
    agent_host = fleet.add_host("gpu-b")
    server = provider.create(host_props(fleet, server_host, "server", k3s_token=TOKEN))
    wrong = dict(server.outs, k3s_token="not-the-token-1234")
    with pytest.raises(RemoteError, match="install k3s agent failed.*token does not match") as failure:
        provider.create(agent_props(fleet, agent_host, server_host, wrong))
    assert "not-the-token-1234" not in str(failure.value)
    assert not agent_host.marker.exists()


def test_no_secret_reaches_logs_or_outputs(fleet, provider, caplog):
    server_host = fleet.add_host("gpu-a")
    agent_host = fleet.add_host("gpu-b")
    caplog.set_level(logging.DEBUG)
    server = provider.create(host_props(fleet, server_host, "server", k3s_token=TOKEN))
    agent = provider.create(agent_props(fleet, agent_host, server_host, server.outs, labels={"pool": "a"}))
    provider.update(agent.id, agent.outs, agent_props(fleet, agent_host, server_host, server.outs))
    provider.delete(agent.id, agent.outs)

    logged = caplog.text
    assert "install k3s agent" in logged and "drain gpu-b" in logged  # commands are logged...
    # On the hosts: the token reached the installer as a file, never in its argv or environment.
    seen_on_hosts = (fleet.cluster / "argv.log").read_text()
    assert "--token-file /var/lib/digital-worker/k3s-token" in seen_on_hosts and TOKEN not in seen_on_hosts
    for host in (server_host, agent_host):
        assert TOKEN not in (host.root / "sshd.log").read_text()
    key_lines = [line for line in fleet.private_key.splitlines() if len(line) > 20]
    for secret in [TOKEN, *key_lines, "FAKE-CLIENT-KEY-0123456789abcdef"]:
        assert secret not in logged  # ...without secrets
        assert secret not in "\n".join(server.outs["commands"] + agent.outs["commands"])


def test_check_reports_bad_config(provider):
    failures = provider.check({}, {
        "node_name": "GPU_1", "address": "10.0.0.1", "role": "worker", "private_key": "x",
        "host_key": "ssh-ed25519 AAAA", "labels": {"bad key!": "v"}, "taints": ["nodot"],
    }).failures
    reasons = " | ".join(f.reason for f in failures)
    assert "not a valid node name" in reasons
    assert "role must be" in reasons
    assert "not a valid Kubernetes label" in reasons
    assert "taint 'nodot'" in reasons
    assert provider.check({}, {"address": "x"}).failures[0].property == "node_name"


def test_non_root_login_uses_sudo_for_every_change(fleet, provider):
    import shutil

    if shutil.which("sudo") is None:
        pytest.skip("Debian's sudo is not installed")
    host = fleet.add_host("gpu-a", login_user="dwadmin")
    created = provider.create(host_props(fleet, host, "server", user="dwadmin", k3s_token=TOKEN))
    assert created.outs["applied_labels"]["nvidia.com/gpu.present"] == "true"
    token_file = host.varlib / "digital-worker" / "k3s-token"
    assert token_file.stat().st_uid == 0 and stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert host.marker.stat().st_uid == 0
    assert list((host.root / "home-dwadmin").glob(".dw-upload-*")) == []  # staging copies are gone
    # The log shows each command as written; sudo is how it ran, not what it was.
    assert not any("sudo" in c for c in created.outs["commands"])
    # Without sudo rights the first privileged step fails, clearly, and nothing is recorded.
    no_sudo = fleet.add_host("gpu-b", login_user="dwadmin", sudo=False)
    with pytest.raises(RemoteError, match="gpu-b: user dwadmin needs passwordless sudo for 'check NVIDIA driver'"):
        provider.create(host_props(fleet, no_sudo, "server", user="dwadmin", k3s_token=TOKEN))
    assert not no_sudo.marker.exists()


def test_refresh_reports_drift_and_the_next_up_repairs_it(fleet, provider):
    import json

    server_host = fleet.add_host("gpu-a")
    agent_host = fleet.add_host("gpu-b")
    server = provider.create(host_props(fleet, server_host, "server", k3s_token=TOKEN))
    props = agent_props(fleet, agent_host, server_host, server.outs, labels={"pool": "prod"})
    agent = provider.create(props)
    assert provider.read(agent.id, agent.outs).outs["drift"] == []

    # Someone edits the node behind Pulumi's back.
    node_file = fleet.cluster / "nodes" / "gpu-b.json"
    node = json.loads(node_file.read_text())
    node["metadata"]["labels"]["pool"] = "adhoc"
    node["spec"]["taints"] = []
    node_file.write_text(json.dumps(node))

    refreshed = provider.read(agent.id, agent.outs)
    assert refreshed.id == agent.id
    assert refreshed.outs["drift"] == ["label pool: 'adhoc' instead of 'prod'",
                                       "taint nvidia.com/gpu=present:NoSchedule missing"]
    diff = provider.diff(agent.id, refreshed.outs, props)
    assert diff.changes is True and diff.replaces == []
    repaired = provider.update(agent.id, refreshed.outs, props)
    assert repaired.outs["drift"] == []
    node = fleet.node("gpu-b")
    assert node["metadata"]["labels"]["pool"] == "prod" and node["spec"]["taints"]
    assert fleet.installs() == ["gpu-a server", "gpu-b agent"]  # repaired without reinstalling


def test_refresh_sees_a_wiped_host_or_deleted_node_as_gone(fleet, provider):
    import subprocess

    server_host = fleet.add_host("gpu-a")
    agent_host = fleet.add_host("gpu-b")
    server = provider.create(host_props(fleet, server_host, "server", k3s_token=TOKEN))
    agent = provider.create(agent_props(fleet, agent_host, server_host, server.outs))
    (fleet.cluster / "nodes" / "gpu-b.json").unlink()  # `kubectl delete node gpu-b` by hand
    assert provider.read(agent.id, agent.outs).id is None

    # The next `up` creates it again: the marker alone does not stop the host from rejoining.
    agent = provider.create(agent_props(fleet, agent_host, server_host, server.outs))
    assert fleet.installs() == ["gpu-a server", "gpu-b agent", "gpu-b agent"]
    assert provider.read(agent.id, agent.outs).id == agent.id
    # The host is reinstalled: k3s and our marker are gone.
    subprocess.run([str(agent_host.bin / "k3s-agent-uninstall.sh")], check=True)
    agent_host.marker.unlink()
    assert provider.read(agent.id, agent.outs).id is None


def test_prepull_and_gpu_smoke_test_before_the_node_counts_as_prepared(fleet, provider):
    host = fleet.add_host("gpu-a", gpus=4)
    images = ["lmsysorg/sglang:v0.5.23", "ghcr.io/digital-worker/agent:0.1.0"]
    props = host_props(fleet, host, "server", k3s_token=TOKEN, prepull_images=images,
                       smoke_test_image="nvidia/cuda:12.4.1-base-ubuntu22.04")
    (host.varlib / "smoke-fails").write_text("1")
    with pytest.raises(hostprep.PreparationError,
                       match=r"gpu-a: GPU smoke test in nvidia/cuda:12.4.1-base-ubuntu22.04 failed.*0/4 GPUs.*nvml"):
        provider.create(props)
    assert not host.marker.exists()  # not prepared: the next `up` tries again

    (host.varlib / "smoke-fails").unlink()
    created = provider.create(props)
    smoke_runs = (fleet.cluster / "smoke.log").read_text().splitlines()
    assert smoke_runs[-1] == "dw-gpu-smoke-gpu-a nvidia/cuda:12.4.1-base-ubuntu22.04"
    pulls = (fleet.cluster / "pulls.log").read_text().splitlines()
    assert sorted(set(pulls)) == sorted(images + ["nvidia/cuda:12.4.1-base-ubuntu22.04"])
    assert len(pulls) == len(set(pulls))  # the failed attempt's pulls were kept, not repeated

    # A re-run neither pulls again nor re-runs the smoke test.
    provider.update(created.id, created.outs, props)
    assert (fleet.cluster / "pulls.log").read_text().splitlines() == pulls
    assert (fleet.cluster / "smoke.log").read_text().splitlines() == smoke_runs
    # A new smoke image is proven once.
    newer = dict(props, smoke_test_image="nvidia/cuda:12.6.0-base-ubuntu24.04")
    provider.update(created.id, created.outs, newer)
    assert len((fleet.cluster / "smoke.log").read_text().splitlines()) == len(smoke_runs) + 1


def test_unreachable_registry_fails_the_prepull_clearly(fleet, provider):
    host = fleet.add_host("gpu-a")
    (host.varlib / "registry-down").write_text("1")
    with pytest.raises(RemoteError, match="gpu-a: pull image lmsysorg/sglang:v0.5.23 failed.*registry unreachable"):
        provider.create(host_props(fleet, host, "server", k3s_token=TOKEN, prepull_images=["lmsysorg/sglang:v0.5.23"]))
    assert not host.marker.exists()
