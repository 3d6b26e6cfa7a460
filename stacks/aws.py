"""`AwsGpuCluster` (extra `aws`): VPC, EKS, a CPU system node group and managed GPU node groups.

GPU node groups are labelled and tainted exactly like on-prem nodes (`hostprep`), so the same
DigitalWorker `gpuType` and the operator's tolerations work on both. The kubeconfig output (a
secret, using `aws eks get-token`) feeds the kubernetes Provider that `Platform` deploys through.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

import pulumi

from digital_worker.stacks import hostprep

# Instance family -> (digitalworker.io/gpu-type, nvidia.com/gpu.product as GPU feature discovery spells it).
GPU_FAMILIES: dict[str, tuple[str, str]] = {
    "g4dn": ("nvidia-t4-16gb", "Tesla-T4"),
    "g5": ("nvidia-a10g-24gb", "NVIDIA-A10G"),
    "g6": ("nvidia-l4-24gb", "NVIDIA-L4"),
    "g6e": ("nvidia-l40s-48gb", "NVIDIA-L40S"),
    "p4d": ("nvidia-a100-40gb", "NVIDIA-A100-SXM4-40GB"),
    "p4de": ("nvidia-a100-80gb", "NVIDIA-A100-SXM4-80GB"),
    "p5": ("nvidia-h100-80gb", "NVIDIA-H100-80GB-HBM3"),
    "p5e": ("nvidia-h200-141gb", "NVIDIA-H200"),
    "p5en": ("nvidia-h200-141gb", "NVIDIA-H200"),
}
# EKS-optimised Amazon Linux 2023 with the NVIDIA driver and container toolkit preinstalled.
GPU_AMI_TYPE = "AL2023_x86_64_NVIDIA"
SYSTEM_AMI_TYPE = "AL2023_x86_64_STANDARD"
CAPACITY_TYPES = ("ON_DEMAND", "SPOT")
_EKS_TAINT_EFFECT = {"NoSchedule": "NO_SCHEDULE", "NoExecute": "NO_EXECUTE", "PreferNoSchedule": "PREFER_NO_SCHEDULE"}


@dataclass(frozen=True)
class GpuNodeGroupConfig:
    name: str
    instance_types: tuple[str, ...]
    capacity_type: str = "ON_DEMAND"
    min_size: int = 0
    max_size: int = 2
    desired_size: int = 1
    disk_size_gib: int = 200
    labels: dict[str, str] = field(default_factory=dict)
    taints: tuple[str, ...] = (hostprep.DEFAULT_GPU_TAINT,)


@dataclass(frozen=True)
class AwsClusterConfig:
    region: str
    cluster_name: str = "digital-worker"
    kubernetes_version: str = "1.31"
    vpc_cidr: str = "10.42.0.0/16"
    availability_zones: tuple[str, ...] = ()  # default: <region>a and <region>b
    gpu_node_groups: tuple[GpuNodeGroupConfig, ...] = ()
    system_instance_types: tuple[str, ...] = ("m6i.large",)
    system_nodes: int = 2
    public_endpoint: bool = True

    @property
    def zones(self) -> tuple[str, ...]:
        return self.availability_zones or (f"{self.region}a", f"{self.region}b")


def instance_family(instance_type: str) -> str:
    return instance_type.split(".", 1)[0]


def gpu_identity(group: GpuNodeGroupConfig) -> tuple[str, str]:
    """(gpu-type, product) shared by every instance type of the group."""
    identities = {GPU_FAMILIES[instance_family(t)] for t in group.instance_types if instance_family(t) in GPU_FAMILIES}
    if len(identities) != 1:
        raise ValueError(f"aws.gpuNodeGroups[{group.name}]: instance types must share one GPU model")
    return identities.pop()


def node_group_labels(group: GpuNodeGroupConfig) -> dict[str, str]:
    gpu_type, product = gpu_identity(group)
    labels = {
        hostprep.GPU_PRESENT_LABEL: "true",
        hostprep.GPU_PRODUCT_LABEL: product,
        hostprep.GPU_TYPE_LABEL: gpu_type,
        "digitalworker.io/capacity-type": group.capacity_type.lower().replace("_", "-"),
    }
    labels.update(group.labels)
    return labels


def node_group_taints(group: GpuNodeGroupConfig) -> list[dict[str, str]]:
    taints = []
    for taint in group.taints:
        key, value, effect = hostprep.split_taint(taint)
        taints.append({"key": key, "value": value, "effect": _EKS_TAINT_EFFECT[effect]})
    return taints


def validate_aws(config: AwsClusterConfig) -> list[str]:
    problems = []
    if not config.region:
        problems.append("aws.region is required")
    if not config.gpu_node_groups:
        problems.append("aws.gpuNodeGroups is empty: add at least one GPU node group")
    if len(config.zones) < 2:
        problems.append("aws.availabilityZones needs at least two zones (EKS requires it)")
    for group in config.gpu_node_groups:
        where = f"aws.gpuNodeGroups[{group.name}]"
        unknown = [t for t in group.instance_types if instance_family(t) not in GPU_FAMILIES]
        if not group.instance_types:
            problems.append(f"{where}.instanceTypes is empty")
        if unknown:
            problems.append(f"{where}.instanceTypes {unknown} are not GPU types this stack knows "
                            f"({', '.join(sorted(GPU_FAMILIES))})")
        elif group.instance_types:
            try:
                gpu_identity(group)
            except ValueError as exc:
                problems.append(str(exc))
        if group.capacity_type not in CAPACITY_TYPES:
            problems.append(f"{where}.capacityType must be ON_DEMAND or SPOT, not {group.capacity_type!r}")
        if not 0 <= group.min_size <= group.desired_size <= group.max_size or group.max_size < 1:
            problems.append(f"{where}: need 0 <= minSize <= desiredSize <= maxSize and maxSize >= 1")
        for taint in group.taints:
            try:
                hostprep.split_taint(taint)
            except ValueError as exc:
                problems.append(f"{where}: {exc}")
    return problems


def kubeconfig_json(cluster_name: str, endpoint: str, ca_data: str, region: str) -> str:
    """A kubeconfig that authenticates with `aws eks get-token` (no static credentials in state)."""
    return json.dumps({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": cluster_name, "cluster": {"server": endpoint, "certificate-authority-data": ca_data}}],
        "contexts": [{"name": cluster_name, "context": {"cluster": cluster_name, "user": cluster_name}}],
        "current-context": cluster_name,
        "users": [{"name": cluster_name, "user": {"exec": {
            "apiVersion": "client.authentication.k8s.io/v1beta1",
            "command": "aws",
            "args": ["eks", "get-token", "--cluster-name", cluster_name, "--region", region, "--output", "json"],
        }}}],
    })


def _cidr_block(vpc_cidr: str, index: int) -> str:
    """The index-th /20 of the VPC's /16 (public subnets first, then private)."""
    import ipaddress

    network = ipaddress.ip_network(vpc_cidr)
    return str(list(network.subnets(new_prefix=20))[index])


class AwsGpuCluster(pulumi.ComponentResource):
    """VPC (public + private subnets, one NAT), EKS cluster, system and GPU managed node groups."""

    kubeconfig: pulumi.Output[str]
    cluster_name: pulumi.Output[str]
    vpc_id: pulumi.Output[str]

    def __init__(self, name: str, config: AwsClusterConfig, opts: Optional[pulumi.ResourceOptions] = None) -> None:
        super().__init__("digitalworker:stacks:AwsGpuCluster", name, None, opts)
        problems = validate_aws(config)
        if problems:
            raise ValueError("; ".join(problems))
        import pulumi_aws as aws  # the `aws` extra; only needed when this target is chosen

        provider = aws.Provider(f"{name}-aws", region=config.region, opts=pulumi.ResourceOptions(parent=self))
        child = pulumi.ResourceOptions(parent=self, provider=provider)
        tags = {"app.kubernetes.io/part-of": "digital-worker", "digitalworker.io/cluster": config.cluster_name}
        cluster_tag = {f"kubernetes.io/cluster/{config.cluster_name}": "shared"}

        self.vpc = aws.ec2.Vpc(f"{name}-vpc", cidr_block=config.vpc_cidr, enable_dns_hostnames=True,
                               enable_dns_support=True, tags={**tags, "Name": config.cluster_name}, opts=child)
        igw = aws.ec2.InternetGateway(f"{name}-igw", vpc_id=self.vpc.id, tags=tags, opts=child)
        public_rt = aws.ec2.RouteTable(f"{name}-public", vpc_id=self.vpc.id,
                                       routes=[{"cidr_block": "0.0.0.0/0", "gateway_id": igw.id}],
                                       tags=tags, opts=child)
        public_subnets, private_subnets = [], []
        for index, zone in enumerate(config.zones):
            subnet = aws.ec2.Subnet(
                f"{name}-public-{zone}", vpc_id=self.vpc.id, availability_zone=zone,
                cidr_block=_cidr_block(config.vpc_cidr, index), map_public_ip_on_launch=True,
                tags={**tags, **cluster_tag, "kubernetes.io/role/elb": "1"}, opts=child)
            aws.ec2.RouteTableAssociation(f"{name}-public-{zone}", subnet_id=subnet.id,
                                          route_table_id=public_rt.id, opts=child)
            public_subnets.append(subnet)
        # One NAT gateway: GPU nodes pull multi-GB images and models; cost stays one NAT, not one per zone.
        eip = aws.ec2.Eip(f"{name}-nat", domain="vpc", tags=tags, opts=child)
        nat = aws.ec2.NatGateway(f"{name}-nat", allocation_id=eip.id, subnet_id=public_subnets[0].id,
                                 tags=tags, opts=pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(
                                     depends_on=[igw])))
        private_rt = aws.ec2.RouteTable(f"{name}-private", vpc_id=self.vpc.id,
                                        routes=[{"cidr_block": "0.0.0.0/0", "nat_gateway_id": nat.id}],
                                        tags=tags, opts=child)
        for index, zone in enumerate(config.zones):
            subnet = aws.ec2.Subnet(
                f"{name}-private-{zone}", vpc_id=self.vpc.id, availability_zone=zone,
                cidr_block=_cidr_block(config.vpc_cidr, len(config.zones) + index),
                tags={**tags, **cluster_tag, "kubernetes.io/role/internal-elb": "1"}, opts=child)
            aws.ec2.RouteTableAssociation(f"{name}-private-{zone}", subnet_id=subnet.id,
                                          route_table_id=private_rt.id, opts=child)
            private_subnets.append(subnet)

        def role(role_name: str, service: str, policies: list[str]) -> "aws.iam.Role":
            created = aws.iam.Role(role_name, assume_role_policy=json.dumps({
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Principal": {"Service": service}, "Action": "sts:AssumeRole"}],
            }), tags=tags, opts=child)
            for policy in policies:
                aws.iam.RolePolicyAttachment(f"{role_name}-{policy.rsplit('/', 1)[-1]}", role=created.name,
                                             policy_arn=policy, opts=child)
            return created

        cluster_role = role(f"{name}-cluster", "eks.amazonaws.com",
                            ["arn:aws:iam::aws:policy/AmazonEKSClusterPolicy"])
        node_role = role(f"{name}-node", "ec2.amazonaws.com", [
            "arn:aws:iam::aws:policy/AmazonEKSWorkerNodePolicy",
            "arn:aws:iam::aws:policy/AmazonEKS_CNI_Policy",
            "arn:aws:iam::aws:policy/AmazonEC2ContainerRegistryReadOnly",
        ])
        self.cluster = aws.eks.Cluster(
            f"{name}-eks", name=config.cluster_name, role_arn=cluster_role.arn, version=config.kubernetes_version,
            vpc_config={
                "subnet_ids": [s.id for s in private_subnets + public_subnets],
                "endpoint_public_access": config.public_endpoint,
                "endpoint_private_access": True,
            },
            access_config={"authentication_mode": "API_AND_CONFIG_MAP",
                           "bootstrap_cluster_creator_admin_permissions": True},
            tags=tags, opts=child)
        private_ids = [s.id for s in private_subnets]
        # Operator, Prometheus and other CPU pods need somewhere untainted to run.
        self.system_nodes = aws.eks.NodeGroup(
            f"{name}-system", cluster_name=self.cluster.name, node_role_arn=node_role.arn, subnet_ids=private_ids,
            instance_types=list(config.system_instance_types), ami_type=SYSTEM_AMI_TYPE, capacity_type="ON_DEMAND",
            scaling_config={"min_size": 1, "max_size": max(config.system_nodes, 1), "desired_size": config.system_nodes},
            labels={"digitalworker.io/pool": "system"}, tags=tags, opts=child)
        self.gpu_node_groups = []
        for group in config.gpu_node_groups:
            self.gpu_node_groups.append(aws.eks.NodeGroup(
                f"{name}-gpu-{group.name}", cluster_name=self.cluster.name, node_role_arn=node_role.arn,
                subnet_ids=private_ids, instance_types=list(group.instance_types), ami_type=GPU_AMI_TYPE,
                capacity_type=group.capacity_type, disk_size=group.disk_size_gib,
                scaling_config={"min_size": group.min_size, "max_size": group.max_size,
                                "desired_size": group.desired_size},
                labels=node_group_labels(group), taints=node_group_taints(group),
                tags=tags, opts=pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(
                    # The cluster autoscaler owns the size once created; Pulumi must not fight it.
                    ignore_changes=["scalingConfig.desiredSize"]))))
        self.kubeconfig = pulumi.Output.secret(pulumi.Output.all(
            self.cluster.name, self.cluster.endpoint, self.cluster.certificate_authority,
        ).apply(lambda v: kubeconfig_json(v[0], v[1], (v[2] or {}).get("data", ""), config.region)))
        self.cluster_name = self.cluster.name
        self.vpc_id = self.vpc.id
        self.register_outputs({"kubeconfig": self.kubeconfig, "cluster_name": self.cluster_name,
                               "vpc_id": self.vpc_id})
