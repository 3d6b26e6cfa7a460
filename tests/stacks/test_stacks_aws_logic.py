"""AwsGpuCluster's pure parts: GPU identity per instance family, labels/taints, validation, kubeconfig."""
from __future__ import annotations

import json

import pytest

from digital_worker.stacks import aws, hostprep


def group(**changes) -> aws.GpuNodeGroupConfig:
    values = dict(name="g", instance_types=("g6e.12xlarge",))
    values.update(changes)
    return aws.GpuNodeGroupConfig(**values)


@pytest.mark.parametrize("instance_type, gpu_type", [
    ("g4dn.xlarge", "nvidia-t4-16gb"), ("g5.48xlarge", "nvidia-a10g-24gb"), ("g6.xlarge", "nvidia-l4-24gb"),
    ("g6e.2xlarge", "nvidia-l40s-48gb"), ("p4d.24xlarge", "nvidia-a100-40gb"), ("p4de.24xlarge", "nvidia-a100-80gb"),
    ("p5.48xlarge", "nvidia-h100-80gb"), ("p5e.48xlarge", "nvidia-h200-141gb"),
])
def test_gpu_type_per_family_matches_what_onprem_nodes_get(instance_type, gpu_type):
    assert aws.node_group_labels(group(instance_types=(instance_type,)))[hostprep.GPU_TYPE_LABEL] == gpu_type


def test_same_label_spelling_on_aws_and_onprem():
    # An on-prem H100 (81559 MiB as nvidia-smi reports it) and a p5 node group land on one gpuType.
    assert hostprep.gpu_type_from_product("NVIDIA H100 80GB HBM3", 81559) == \
        aws.node_group_labels(group(instance_types=("p5.48xlarge",)))[hostprep.GPU_TYPE_LABEL]


def test_labels_and_taints_for_eks():
    labels = aws.node_group_labels(group(capacity_type="SPOT", labels={"team": "a"}))
    assert labels == {"nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": "NVIDIA-L40S",
                      "digitalworker.io/gpu-type": "nvidia-l40s-48gb", "digitalworker.io/capacity-type": "spot",
                      "team": "a"}
    taints = aws.node_group_taints(group(taints=("nvidia.com/gpu=present:NoSchedule", "dedicated:NoExecute")))
    assert taints == [{"key": "nvidia.com/gpu", "value": "present", "effect": "NO_SCHEDULE"},
                      {"key": "dedicated", "value": "", "effect": "NO_EXECUTE"}]


def test_validation_names_every_problem():
    config = aws.AwsClusterConfig(region="us-east-1", availability_zones=("us-east-1a",), gpu_node_groups=(
        group(name="cpu", instance_types=("m6i.large",)),
        group(name="mixed", instance_types=("g5.xlarge", "g6.xlarge")),
        group(name="sizes", capacity_type="RESERVED", min_size=3, desired_size=1, max_size=2),
        group(name="taint", taints=("bad",)),
    ))
    text = " | ".join(aws.validate_aws(config))
    for fragment in ("at least two zones", "gpuNodeGroups[cpu].instanceTypes ['m6i.large']",
                     "gpuNodeGroups[mixed]: instance types must share one GPU model",
                     "gpuNodeGroups[sizes].capacityType", "gpuNodeGroups[sizes]: need 0 <= minSize",
                     "gpuNodeGroups[taint]: taint 'bad'"):
        assert fragment in text, fragment
    assert aws.validate_aws(aws.AwsClusterConfig(region="us-east-1", gpu_node_groups=(group(),))) == []
    assert "aws.gpuNodeGroups is empty" in " ".join(aws.validate_aws(aws.AwsClusterConfig(region="eu-west-1")))


def test_subnets_do_not_overlap_and_kubeconfig_uses_exec_auth():
    blocks = [aws._cidr_block("10.42.0.0/16", i) for i in range(4)]
    assert blocks == ["10.42.0.0/20", "10.42.16.0/20", "10.42.32.0/20", "10.42.48.0/20"]
    config = json.loads(aws.kubeconfig_json("dw", "https://x.eks", "Q0E=", "eu-west-1"))
    user = config["users"][0]["user"]
    assert "token" not in user and "client-key-data" not in user  # no static credential in state
    assert user["exec"]["args"] == ["eks", "get-token", "--cluster-name", "dw", "--region", "eu-west-1",
                                    "--output", "json"]
