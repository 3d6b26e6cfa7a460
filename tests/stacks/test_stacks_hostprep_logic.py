"""Pure logic of host preparation: GPU naming, plan validation, label/taint reconciliation."""
from __future__ import annotations

import pytest

from digital_worker.stacks import hostprep
from digital_worker.stacks.remote import Redactor, SshTarget, parse_public_key


@pytest.mark.parametrize("product, memory_mib, expected", [
    ("NVIDIA H100 80GB HBM3", 81559, "nvidia-h100-80gb"),
    ("NVIDIA A100-SXM4-80GB", 81920, "nvidia-a100-80gb"),
    ("NVIDIA A100-SXM4-40GB", 40960, "nvidia-a100-40gb"),
    ("NVIDIA A10G", 23028, "nvidia-a10g-24gb"),
    ("NVIDIA L4", 23034, "nvidia-l4-24gb"),
    ("NVIDIA L40S", 46068, "nvidia-l40s-48gb"),
    ("Tesla T4", 15360, "nvidia-t4-16gb"),
    ("NVIDIA H200", 143771, "nvidia-h200-141gb"),
    ("NVIDIA GeForce RTX 4090", 24564, "nvidia-4090-24gb"),
    ("NVIDIA L4", 0, "nvidia-l4"),
])
def test_gpu_type_matches_the_operator_examples_spelling(product, memory_mib, expected):
    assert hostprep.gpu_type_from_product(product, memory_mib) == expected


def test_product_label_follows_gpu_feature_discovery():
    assert hostprep.product_label_value("NVIDIA H100 80GB HBM3") == "NVIDIA-H100-80GB-HBM3"
    assert hostprep.product_label_value("NVIDIA A100-SXM4-80GB") == "NVIDIA-A100-SXM4-80GB"
    assert len(hostprep.product_label_value("X" * 100)) <= 63


def plan(**changes) -> hostprep.NodePlan:
    values = dict(
        node_name="gpu-1", role="server",
        target=SshTarget("10.0.0.1", private_key="k", host_key="ssh-ed25519 AAAA"),
    )
    values.update(changes)
    return hostprep.NodePlan(**values)


def test_gpu_labels_merge_discovered_and_stack_labels():
    gpus = [hostprep.Gpu("NVIDIA L4", "550.1", 23034)] * 4
    labels = hostprep.gpu_labels(plan(labels={"pool": "batch"}), gpus)
    assert labels == {
        "nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": "NVIDIA-L4",
        "digitalworker.io/gpu-type": "nvidia-l4-24gb", "nvidia.com/gpu.count": "4", "pool": "batch",
    }
    assert hostprep.gpu_labels(plan(gpu_type="l4-inference"), gpus)["digitalworker.io/gpu-type"] == "l4-inference"


def test_validate_plan_names_each_problem():
    assert hostprep.validate_plan(plan()) == []
    problems = hostprep.validate_plan(plan(
        node_name="Bad_Name", role="agent", labels={"ok": "fine", "no spaces": "x"}, taints=("a=b:Sometimes",),
        target=SshTarget("10.0.0.1", private_key=""),
    ))
    text = " | ".join(problems)
    for fragment in ("not a valid node name", "server URL", "no SSH private key", "hostKey is missing",
                     "label no spaces", "taint 'a=b:Sometimes'"):
        assert fragment in text
    tofu = plan(target=SshTarget("10.0.0.1", private_key="k", accept_unknown_host_key=True))
    assert hostprep.validate_plan(tofu) == []


def test_install_fingerprint_ignores_labels_and_taints():
    base = hostprep.install_fingerprint(plan())
    assert hostprep.install_fingerprint(plan(labels={"a": "b"}, taints=())) == base
    assert hostprep.install_fingerprint(plan(k3s_version="v1.31.4+k3s1")) != base
    assert hostprep.install_fingerprint(plan(default_runtime=None)) != base
    assert hostprep.install_fingerprint(plan(role="agent", server_url="https://s:6443")) != base


class RecordingKubectl:
    """Stands in for the server host's `k3s kubectl` in a pure test of the reconcile arithmetic."""

    def __init__(self) -> None:
        self.commands: list[str] = []

    def run(self, command: str, *, step: str):
        self.commands.append(command)


def test_reconcile_touches_only_what_differs_and_only_keys_we_manage():
    node = {"metadata": {"name": "gpu-1", "labels": {"a": "1", "b": "2", "kubernetes.io/hostname": "gpu-1"}},
            "spec": {"taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]}}
    kubectl = RecordingKubectl()
    unchanged = hostprep.reconcile_labels_and_taints(
        kubectl, node, {"a": "1", "b": "2"}, ("nvidia.com/gpu=present:NoSchedule",), {"a": "1", "b": "2"},
        ("nvidia.com/gpu=present:NoSchedule",))
    assert unchanged is False and kubectl.commands == []

    changed = hostprep.reconcile_labels_and_taints(
        kubectl, node, {"a": "9"}, ("dedicated=llm:NoExecute",), {"a": "1", "b": "2", "gone": "x"},
        ("nvidia.com/gpu=present:NoSchedule",))
    assert changed is True
    label, taint, untaint = kubectl.commands
    assert label == "k3s kubectl label node gpu-1 a=9 b- --overwrite"  # 'gone' is not on the node: left alone
    assert taint == "k3s kubectl taint node gpu-1 dedicated=llm:NoExecute --overwrite"
    assert untaint == "k3s kubectl taint node gpu-1 nvidia.com/gpu:NoSchedule-"


def test_redactor_hides_secrets_in_all_their_forms():
    key = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ\n-----END OPENSSH PRIVATE KEY-----\n"
    redact = Redactor([key, "tok-123456"])
    import base64

    text = f"a tok-123456 b {base64.b64encode(b'tok-123456').decode()} c b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ d"
    assert redact(text) == "a *** b *** c *** d"
    assert Redactor(["ab"])("ab") == "ab"  # too short to be a secret worth masking everywhere


def test_host_key_parsing_is_strict():
    with pytest.raises(ValueError, match="ssh-ed25519 AAAA"):
        parse_public_key("justonepart")
    with pytest.raises(ValueError, match="base64"):
        parse_public_key("ssh-ed25519 not*base64")
    with pytest.raises(ValueError, match="cannot be read"):
        parse_public_key("ssh-ed25519 AAAA")
