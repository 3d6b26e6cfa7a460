"""The Platform component under pulumi.runtime.Mocks: resources, key properties, ordering."""
from __future__ import annotations

import contextlib
import io

import pytest
import yaml

import pulumi_kubernetes as k8s

from digital_worker.operator import deploy
from digital_worker.stacks.manifests import PlatformSettings
from digital_worker.stacks.platform import Platform
from stacks_pulumi_harness import run_program

NS = "dw-system"
WORKER = {"metadata": {"name": "support-bot", "namespace": "ai"},
          "spec": {"model": {"name": "qwen2.5-7b", "source": "hf://Qwen/Qwen2.5-7B-Instruct"},
                   "runtime": {"gpuType": "nvidia-l4-24gb", "gpusPerReplica": 1}, "replicas": 1}}


def deploy_platform(**settings):
    values = {"namespace": NS, "operator_image": "registry.local/op:1", "agent_image": "registry.local/agent:1"}
    values.update(settings)

    def program():
        provider = k8s.Provider("cluster", kubeconfig="kubeconfig-text")
        platform = Platform("platform", PlatformSettings(**values),
                            __import__("pulumi").ResourceOptions(providers={"kubernetes": provider}))
        return {"namespace": platform.operator_namespace, "prometheus_url": platform.prometheus_url,
                "kubectl": platform.kubectl_commands}

    return run_program(program)


def numbers_as_floats(value):
    """Pulumi's wire format carries every number as a float."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return float(value)
    if isinstance(value, dict):
        return {k: numbers_as_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [numbers_as_floats(v) for v in value]
    return value


def test_crd_deployed_equals_digital_worker_crd_output():
    from digital_worker.cli import main

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["crd"]) == 0
    expected = yaml.safe_load(printed.getvalue())

    run = deploy_platform()
    crd = run.one("kubernetes:apiextensions.k8s.io/v1:CustomResourceDefinition", "digitalworkers.digitalworker.io")
    deployed = {k: v for k, v in crd.inputs.items() if k not in ("apiVersion", "kind")}
    assert numbers_as_floats(deployed) == numbers_as_floats(
        {k: v for k, v in expected.items() if k not in ("apiVersion", "kind")})
    assert crd.inputs["apiVersion"] == expected["apiVersion"] and crd.inputs["kind"] == expected["kind"]


def test_operator_rbac_and_hardening_reach_the_cluster():
    run = deploy_platform(operator_replicas=1)
    role = run.one("kubernetes:rbac.authorization.k8s.io/v1:ClusterRole")
    assert role.inputs["rules"] == deploy.cluster_role()["rules"]
    secrets_rule = next(r for r in role.inputs["rules"] if r["resources"] == ["secrets"])
    assert secrets_rule["verbs"] == ["get"]
    assert not any("*" in r["verbs"] or "*" in r["resources"] for r in role.inputs["rules"])
    binding = run.one("kubernetes:rbac.authorization.k8s.io/v1:ClusterRoleBinding")
    assert binding.inputs["subjects"] == [{"kind": "ServiceAccount", "name": deploy.OPERATOR_NAME, "namespace": NS}]

    operator = run.one("kubernetes:apps/v1:Deployment", deploy.OPERATOR_NAME)
    pod = operator.inputs["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert operator.inputs["spec"]["replicas"] == 1
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["resources"]["requests"] == {"cpu": "100m", "memory": "256Mi"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["image"] == "registry.local/op:1"
    args = container["args"]
    assert args[args.index("--peering") + 1] == deploy.PEERING_NAME
    # Leader election needs the peering object, which is created with (and before) the operator.
    peering = run.one("kubernetes:kopf.dev/v1:ClusterKopfPeering")
    assert peering.urn in operator.dependencies
    assert run.one("kubernetes:core/v1:Service", f"{deploy.OPERATOR_NAME}-metrics").inputs["spec"]["ports"][0]["port"] == 9090


def test_everything_goes_through_the_given_provider_and_the_namespace_first():
    run = deploy_platform()
    provider = run.one("pulumi:providers:kubernetes")
    k8s_resources = [r for r in run.registrations if r.typ.startswith("kubernetes:")]
    assert len(k8s_resources) > 10
    for resource in k8s_resources:
        assert resource.provider == f"{provider.urn}::cluster-id", resource.name
    namespace = run.one("kubernetes:core/v1:Namespace", NS)
    for resource in k8s_resources:
        if resource.typ != "kubernetes:core/v1:Namespace":
            assert run.waits_for(resource, namespace), resource.name


def test_helm_prometheus_when_there_is_no_prometheus_operator():
    run = deploy_platform(prometheus_mode="helm")
    release = run.one("kubernetes:helm.sh/v3:Release", "prometheus")
    assert release.inputs["chart"] == "prometheus"
    assert release.inputs["repositoryOpts"]["repo"] == "https://prometheus-community.github.io/helm-charts"
    assert release.inputs["namespace"] == NS
    assert release.inputs["values"]["server"]["fullnameOverride"] == "digital-worker-prometheus"
    assert not run.of_type("kubernetes:monitoring.coreos.com/v1:PodMonitor")
    url = f"http://digital-worker-prometheus.{NS}.svc:80"
    assert run.values["prometheus_url"] == url
    args = run.one("kubernetes:apps/v1:Deployment", deploy.OPERATOR_NAME).inputs["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--prometheus-url") + 1] == url
    assert any("port-forward svc/digital-worker-prometheus" in c for c in run.values["kubectl"])


def test_podmonitors_when_the_prometheus_operator_is_there():
    run = deploy_platform(prometheus_mode="podmonitor", prometheus_url="http://prom.monitoring.svc:9090")
    assert not run.of_type("kubernetes:helm.sh/v3:Release")
    monitors = {r.inputs["metadata"]["name"]: r.inputs["spec"]
                for r in run.of_type("kubernetes:monitoring.coreos.com/v1:PodMonitor")}
    agent, runtime = monitors["digital-worker-gpu-agent"], monitors["digital-worker-runtime"]
    assert agent["podMetricsEndpoints"][0]["port"] == "metrics"
    assert runtime["selector"]["matchLabels"] == {"app.kubernetes.io/name": "digital-worker",
                                                   "app.kubernetes.io/managed-by": "digital-worker-operator"}
    assert runtime["namespaceSelector"] == {"any": True}
    assert runtime["podMetricsEndpoints"][0]["port"] == "http"
    assert run.one("kubernetes:monitoring.coreos.com/v1:ServiceMonitor").inputs["spec"]["endpoints"][0]["port"] == "metrics"
    assert run.values["prometheus_url"] == "http://prom.monitoring.svc:9090"


def test_agents_run_on_tainted_gpu_nodes_and_device_plugin_on_k3s():
    run = deploy_platform(device_plugin=True, gpu_runtime_class="nvidia")
    daemonset = run.one("kubernetes:apps/v1:DaemonSet")
    pod = daemonset.inputs["spec"]["template"]["spec"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["runtimeClassName"] == "nvidia"
    assert run.one("kubernetes:node.k8s.io/v1:RuntimeClass").inputs["handler"] == "nvidia"
    plugin = run.one("kubernetes:helm.sh/v3:Release", "nvidia-device-plugin")
    assert plugin.inputs["chart"] == "nvidia-device-plugin"
    assert plugin.inputs["values"]["runtimeClassName"] == "nvidia"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in plugin.inputs["values"]["tolerations"]
    without = deploy_platform()
    assert not [r for r in without.of_type("kubernetes:helm.sh/v3:Release") if r.name == "nvidia-device-plugin"]


def test_digital_workers_from_config_wait_for_the_operator():
    run = deploy_platform(workers=(WORKER,))
    worker = run.one("kubernetes:digitalworker.io/v1alpha1:DigitalWorker")
    assert worker.inputs["metadata"] == {"name": "support-bot", "namespace": "ai"}
    assert worker.inputs["spec"]["runtime"]["gpuType"] == "nvidia-l4-24gb"
    operator = run.one("kubernetes:apps/v1:Deployment", deploy.OPERATOR_NAME)
    assert operator.urn in worker.dependencies  # so destroy removes workers while the operator still runs
    crd = run.one("kubernetes:apiextensions.k8s.io/v1:CustomResourceDefinition", "digitalworkers.digitalworker.io")
    assert run.waits_for(operator, crd) and not run.waits_for(crd, operator)
    assert run.one("kubernetes:core/v1:Namespace", "ai")  # the worker's namespace is created


def test_invalid_worker_is_refused_with_its_name():
    bad = {"metadata": {"name": "broken"}, "spec": {"model": {"name": "m", "source": "ftp://x"}}}
    with pytest.raises(Exception, match=r"workers\[0\] \(broken\)"):
        deploy_platform(workers=(bad,))


def test_watch_namespaces_use_namespaced_peering():
    run = deploy_platform(watch_namespaces=("team-a",))
    peering = run.one("kubernetes:kopf.dev/v1:KopfPeering")
    assert peering.inputs["metadata"]["namespace"] == "team-a"
    args = run.one("kubernetes:apps/v1:Deployment", deploy.OPERATOR_NAME).inputs["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--namespace") + 1] == "team-a"
