"""The Pulumi program (stack config -> components) for each target, under pulumi.runtime.Mocks."""
from __future__ import annotations

import json

import pytest

from digital_worker.stacks import stack
from stacks_pulumi_harness import is_secret, run_program

SSH_KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nfake-key-material-for-mocks-0123456789\n-----END OPENSSH PRIVATE KEY-----\n"
HOST_KEY_A = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGq3yP3x7bUuJw3cI6KqQ1n3yQnDq6m8i0WmSgdfk7nE"
HOST_KEY_B = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG9n5q0j8Gv8r2bZt3o8Qb2yL1tX2m2v0qkq3T9aJ1cV"
GPU_HOST = "pulumi-python:dynamic/digitalworker:GpuHost"


def program(probe=None):
    def body():
        out = stack.run(probe=probe)
        return {k: v for k, v in out.items() if k not in ("platform", "provider", "settings")}
    return body


def test_existing_cluster_with_prometheus_operator_gets_podmonitors():
    asked = []

    def probe(kubeconfig, context):
        asked.append((kubeconfig, context))
        return True

    run = run_program(program(probe), config={
        "target": "existing", "kubeconfig": "/home/ops/.kube/config", "context": "gpu-prod",
        "platform": {"namespace": "ops", "operatorReplicas": 1},
    })
    assert asked == [("/home/ops/.kube/config", "gpu-prod")]
    provider = run.one("pulumi:providers:kubernetes")
    assert provider.inputs["kubeconfig"] == "/home/ops/.kube/config" and provider.inputs["context"] == "gpu-prod"
    assert run.of_type("kubernetes:monitoring.coreos.com/v1:PodMonitor")
    assert not run.of_type("kubernetes:helm.sh/v3:Release")  # no device plugin by default on existing clusters
    assert run.values["prometheusMode"] == "podmonitor"
    assert run.values["operatorNamespace"] == "ops"
    assert run.values["target"] == "existing"
    assert any("kubectl get digitalworkers" in c for c in run.values["kubectlCommands"])


def test_existing_cluster_without_operator_or_unreachable_falls_back_to_helm():
    for answer in (False, None):
        run = run_program(program(lambda *_: answer), config={"target": "existing"})
        assert run.values["prometheusMode"] == "helm"
        assert run.one("kubernetes:helm.sh/v3:Release", "prometheus")
        assert not run.of_type("pulumi:providers:kubernetes")  # ambient kubeconfig: the default provider


def test_onprem_hosts_become_gpu_host_resources_feeding_the_platform():
    run = run_program(program(), config={
        "target": "onprem",
        "sshPrivateKey": SSH_KEY,
        "onprem": {
            "k3s": {"version": "v1.31.4+k3s1"},
            "prepullImages": ["lmsysorg/sglang:v0.5.23"],
            "smokeTestImage": "nvidia/cuda:12.4.1-base-ubuntu22.04",
            "hosts": [
                {"name": "gpu-01", "address": "10.0.0.11", "user": "ubuntu", "hostKey": HOST_KEY_A,
                 "labels": {"digitalworker.io/pool": "prod"}},
                {"name": "gpu-02", "address": "10.0.0.12", "hostKey": HOST_KEY_B,
                 "taints": ["nvidia.com/gpu=present:NoExecute"]},
            ],
        },
    }, secret_keys=("sshPrivateKey",))
    server, agent = run.of_type(GPU_HOST)
    assert (server.inputs["node_name"], server.inputs["role"]) == ("gpu-01", "server")
    assert (agent.inputs["node_name"], agent.inputs["role"]) == ("gpu-02", "agent")
    assert server.inputs["host_key"] == HOST_KEY_A and server.inputs["user"] == "ubuntu"
    assert server.inputs["labels"] == {"digitalworker.io/pool": "prod"}
    assert server.inputs["taints"] == ["nvidia.com/gpu=present:NoSchedule"]
    assert agent.inputs["taints"] == ["nvidia.com/gpu=present:NoExecute"]
    assert server.inputs["k3s_version"] == "v1.31.4+k3s1"
    assert agent.inputs["prepull_images"] == ["lmsysorg/sglang:v0.5.23"]
    assert agent.inputs["smoke_test_image"] == "nvidia/cuda:12.4.1-base-ubuntu22.04"
    # The agent joins the server: its URL, token and pinned host key come from the server resource.
    assert server.urn in agent.dependencies
    assert agent.inputs["server_url"] == "https://10.0.0.11:6443"
    assert agent.inputs["k3s_token"] == "generated-token-0123456789"
    assert agent.inputs["server"] == {"address": "10.0.0.11", "port": 22, "user": "ubuntu", "host_key": HOST_KEY_A}
    assert agent.inputs["accept_unknown_host_key"] is False
    # Secrets stay secrets in state.
    for host in (server, agent):
        assert {"private_key", "k3s_token", "kubeconfig"} <= set(host.secret_outputs)
        assert host.inputs["private_key"] == SSH_KEY
    # The cluster the hosts form is where the platform goes, once every host is ready.
    provider = run.one("pulumi:providers:kubernetes")
    assert "https://10.0.0.11:6443" in provider.inputs["kubeconfig"]
    operator = run.one("kubernetes:apps/v1:Deployment", "digital-worker-operator")
    assert run.waits_for(operator, agent) and run.waits_for(operator, server)
    # On k3s GPU pods run through the nvidia runtime class; the device plugin is installed.
    assert run.one("kubernetes:node.k8s.io/v1:RuntimeClass").inputs["handler"] == "nvidia"
    assert run.one("kubernetes:helm.sh/v3:Release", "nvidia-device-plugin")
    assert run.values["nodeNames"] == ["gpu-01", "gpu-02"]
    # The provider is pickled by reference (66 bytes, not our code's bytecode): state stays small
    # and a `pulumi up` after upgrading digital-worker runs the new code.
    import base64

    raw = base64.b64decode(server.inputs["__provider"])
    assert b"digital_worker.stacks.onprem" in raw and b"GpuHostProvider" in raw and len(raw) < 200
    assert "https://10.0.0.11:6443" in run.values["kubeconfig"]


def test_onprem_joining_an_existing_cluster_makes_every_host_an_agent():
    run = run_program(program(), config={
        "target": "onprem", "sshPrivateKey": SSH_KEY, "k3sToken": "K10join-token-abcdef",
        "onprem": {"k3s": {"serverUrl": "https://k3s.internal:6443"},
                   "hosts": [{"name": "gpu-07", "address": "10.0.0.17", "hostKey": HOST_KEY_A}]},
        "platform": {"devicePlugin": False}, "kubeconfig": "/etc/dw/existing.kubeconfig",
    }, secret_keys=("sshPrivateKey", "k3sToken"))
    assert run.one("pulumi:providers:kubernetes").inputs["kubeconfig"] == "/etc/dw/existing.kubeconfig"
    (host,) = run.of_type(GPU_HOST)
    assert host.inputs["role"] == "agent" and host.inputs["server_url"] == "https://k3s.internal:6443"
    assert host.inputs["k3s_token"] == "K10join-token-abcdef"
    assert "server" not in host.inputs or not host.inputs["server"]


def test_aws_builds_vpc_eks_and_labelled_tainted_gpu_node_groups():
    run = run_program(program(), config={
        "target": "aws",
        "aws": {"region": "eu-west-1", "clusterName": "dw-eu",
                "gpuNodeGroups": [
                    {"name": "l4-spot", "instanceTypes": ["g6.2xlarge", "g6.4xlarge"], "capacityType": "SPOT",
                     "minSize": 0, "desiredSize": 1, "maxSize": 4},
                    {"name": "h100", "instanceTypes": ["p5.48xlarge"], "minSize": 0, "desiredSize": 0, "maxSize": 2},
                ]},
    })
    assert run.one("pulumi:providers:aws").inputs["region"] == "eu-west-1"
    assert run.one("aws:ec2/vpc:Vpc").inputs["cidrBlock"] == "10.42.0.0/16"
    subnets = run.of_type("aws:ec2/subnet:Subnet")
    assert sorted(s.inputs["availabilityZone"] for s in subnets) == ["eu-west-1a", "eu-west-1a", "eu-west-1b", "eu-west-1b"]
    assert len({s.inputs["cidrBlock"] for s in subnets}) == 4
    cluster = run.one("aws:eks/cluster:Cluster")
    assert cluster.inputs["name"] == "dw-eu"
    groups = {r.name: r.inputs for r in run.of_type("aws:eks/nodeGroup:NodeGroup")}
    spot, h100, system = groups["gpu-cluster-gpu-l4-spot"], groups["gpu-cluster-gpu-h100"], groups["gpu-cluster-system"]
    assert spot["capacityType"] == "SPOT" and h100["capacityType"] == "ON_DEMAND"
    assert spot["amiType"] == "AL2023_x86_64_NVIDIA" and system["amiType"] == "AL2023_x86_64_STANDARD"
    assert spot["instanceTypes"] == ["g6.2xlarge", "g6.4xlarge"]
    assert spot["scalingConfig"] == {"minSize": 0, "desiredSize": 1, "maxSize": 4}
    assert spot["labels"]["digitalworker.io/gpu-type"] == "nvidia-l4-24gb"
    assert spot["labels"]["nvidia.com/gpu.present"] == "true"
    assert h100["labels"]["digitalworker.io/gpu-type"] == "nvidia-h100-80gb"
    assert h100["labels"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    assert spot["taints"] == [{"key": "nvidia.com/gpu", "value": "present", "effect": "NO_SCHEDULE"}]
    assert "taints" not in system  # the operator and Prometheus need untainted nodes
    # kubeconfig: secret, exec-based, pointing at the cluster; it feeds the platform's provider.
    kubeconfig = json.loads(run.values["kubeconfig"])
    assert kubeconfig["clusters"][0]["cluster"]["server"] == "https://gpu-cluster-eks.eks.example"
    assert kubeconfig["users"][0]["user"]["exec"]["args"][:4] == ["eks", "get-token", "--cluster-name", "dw-eu"]
    provider = run.one("pulumi:providers:kubernetes")
    assert json.loads(provider.inputs["kubeconfig"])["current-context"] == "dw-eu"
    assert run.one("kubernetes:helm.sh/v3:Release", "nvidia-device-plugin")
    operator = run.one("kubernetes:apps/v1:Deployment", "digital-worker-operator")
    assert run.waits_for(operator, cluster)


def test_component_outputs_that_carry_credentials_are_secret():
    from digital_worker.stacks.aws import AwsClusterConfig, AwsGpuCluster, GpuNodeGroupConfig
    from digital_worker.stacks.onprem import HostConfig, OnPremArgs, OnPremGpuNodes

    secrecy = {}

    def body():
        cluster = AwsGpuCluster("c", AwsClusterConfig(
            region="us-east-1", gpu_node_groups=(GpuNodeGroupConfig("g", ("g5.xlarge",)),)))
        nodes = OnPremGpuNodes("n", OnPremArgs(hosts=(HostConfig("gpu-1", "10.0.0.1", host_key=HOST_KEY_A),),
                                               private_key="key-text"))
        secrecy["aws"] = cluster.kubeconfig
        secrecy["onprem"] = nodes.kubeconfig
        return {}

    run = run_program(body)
    assert all(is_secret(output) for output in secrecy.values())
    # Dynamic resource outputs are made secret by the engine from additional_secret_outputs.
    (host,) = run.of_type(GPU_HOST)
    assert {"private_key", "k3s_token", "kubeconfig"} <= set(host.secret_outputs)
    assert "private_key" in host.secret_inputs


@pytest.mark.parametrize("config, message", [
    ({"target": "mars"}, "target must be one of"),
    ({"target": "onprem", "onprem": {"hosts": [{"name": "gpu-1", "address": "10.0.0.1"}]}},
     r"onprem.hosts\[gpu-1\].hostKey is missing"),
    ({"target": "aws", "aws": {"region": "us-east-1", "gpuNodeGroups": [
        {"name": "mixed", "instanceTypes": ["g5.xlarge", "p5.48xlarge"]}]}}, "share one GPU model"),
    ({"target": "existing", "prometheus": {"mode": "sometimes"}}, "prometheus.mode"),
])
def test_bad_stack_config_fails_before_any_resource(config, message):
    with pytest.raises(Exception, match=message):
        run_program(program(lambda *_: False), config=config)


def test_the_program_folder_pulumi_runs_is_this_program():
    """Pulumi.yaml's `main: stacks/program/` is executed the way the Python language host does (run_path)."""
    import runpy
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "stacks" / "program"

    def body():
        runpy.run_path(str(folder), run_name="__main__")
        return {}

    run = run_program(body, config={"target": "existing", "prometheus": {"mode": "none"}})
    assert run.one("kubernetes:apps/v1:Deployment", "digital-worker-operator")
    assert not run.of_type("kubernetes:helm.sh/v3:Release")
