"""Pulumi stacks for digital workers (`pip install digital-worker[stacks]`, plus `[aws]` for EKS).

Components: `platform.Platform` (any cluster), `onprem.OnPremGpuNodes` (GPU hosts over SSH into
k3s, through the `GpuHost` dynamic provider), `aws.AwsGpuCluster` (VPC, EKS, GPU node groups).
`stack.run()` wires stack config to them; Pulumi.yaml points at `stacks/program/`.
Importing this package imports nothing heavy: each module pulls in Pulumi only when used.
"""
