"""Node agent manifests: the dicts the stacks deploy, and the agent-manifests command."""
from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
import yaml

from digital_worker.agents import cli as agent_cli
from digital_worker.agents.manifests import agent_manifests, agent_podmonitor


def test_signature_the_stacks_rely_on():
    signature = inspect.signature(agent_manifests)
    assert list(signature.parameters) == ["namespace", "image", "port", "node_selector", "tolerations"]
    assert signature.parameters["port"].default == 9400
    assert list(inspect.signature(agent_podmonitor).parameters)[0] == "namespace"


def test_daemonset_and_service():
    daemonset, service = agent_manifests("gpu-system", "registry.local/dw-agent:1.0")
    assert (daemonset["kind"], daemonset["apiVersion"]) == ("DaemonSet", "apps/v1")
    assert daemonset["metadata"]["namespace"] == "gpu-system"
    pod = daemonset["spec"]["template"]["spec"]
    assert daemonset["spec"]["selector"]["matchLabels"].items() <= daemonset["spec"]["template"]["metadata"]["labels"].items()
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    tolerated = {(t["key"], t["effect"]) for t in pod["tolerations"]}
    assert ("nvidia.com/gpu", "NoSchedule") in tolerated
    assert ("digitalworker.io/gpu-unhealthy", "NoSchedule") in tolerated  # keeps reporting on tainted nodes
    assert not pod.get("hostPID") and not pod.get("hostNetwork")
    container = pod["containers"][0]
    assert container["image"] == "registry.local/dw-agent:1.0"
    assert container["command"] == ["digital-worker", "agent"]
    assert "--port" in container["args"] and "9400" in container["args"]
    assert container["ports"] == [{"name": "metrics", "containerPort": 9400, "protocol": "TCP"}]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert "nvidia.com/gpu" not in str(container["resources"])  # must not take a GPU from the workers
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["pod-resources"] == {"name": "pod-resources", "mountPath": "/var/lib/kubelet/pod-resources",
                                       "readOnly": True}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["pod-resources"]["hostPath"]["path"] == "/var/lib/kubelet/pod-resources"
    assert {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}} in container["env"]
    assert (service["kind"], service["metadata"]["annotations"]["prometheus.io/scrape"]) == ("Service", "true")
    assert service["metadata"]["annotations"]["prometheus.io/port"] == "9400"
    assert service["spec"]["selector"] == daemonset["spec"]["selector"]["matchLabels"]


def test_port_node_selector_and_extra_tolerations():
    extra = {"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"}
    daemonset, service = agent_manifests("ops", "img:2", port=9500, node_selector={"pool": "h100"},
                                         tolerations=[extra])
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "h100"}
    assert extra in pod["tolerations"] and len(pod["tolerations"]) == 3
    assert pod["containers"][0]["ports"][0]["containerPort"] == 9500
    assert service["spec"]["ports"][0]["port"] == 9500
    # Each call returns fresh dicts: the stacks may mutate theirs.
    pod["tolerations"].clear()
    assert len(agent_manifests("ops", "img:2")[0]["spec"]["template"]["spec"]["tolerations"]) == 2


@pytest.mark.parametrize("namespace,image,port", [("Bad_NS", "img", 9400), ("ok", "", 9400), ("ok", "img", 0),
                                                  ("ok", "img with space", 9400)])
def test_invalid_inputs_are_refused(namespace, image, port):
    with pytest.raises(ValueError):
        agent_manifests(namespace, image, port=port)


def test_podmonitor_keeps_the_gpu_owner_labels():
    monitor = agent_podmonitor("gpu-system")
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    assert endpoint["port"] == "metrics" and endpoint["honorLabels"] is True
    assert monitor["spec"]["selector"]["matchLabels"] == agent_manifests("gpu-system", "i")[0]["spec"]["selector"]["matchLabels"]


def test_agent_manifests_command_prints_yaml():
    result = subprocess.run([sys.executable, "-m", "digital_worker.agents", "agent-manifests", "--namespace", "gpu",
                             "--image", "img:1", "--node-selector", "pool=h100"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    documents = list(yaml.safe_load_all(result.stdout))
    assert [d["kind"] for d in documents] == ["DaemonSet", "Service", "PodMonitor"]
    assert documents[0]["spec"]["template"]["spec"]["nodeSelector"] == {"pool": "h100"}


def test_user_mistakes_are_one_line_exit_2():
    for argv in (["--namespace", "Bad_NS", "--image", "i"], ["--namespace", "ok", "--image", "i", "--node-selector", "x"]):
        result = subprocess.run([sys.executable, "-m", "digital_worker.agents", "agent-manifests", *argv],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_help_on_every_level():
    import argparse

    parser = argparse.ArgumentParser(prog="digital-worker")
    agent_cli.register(parser.add_subparsers())
    for argv in (["--help"], ["agent", "--help"], ["agent-manifests", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(argv)
        assert exit_info.value.code == 0


def test_through_the_digital_worker_command():
    from digital_worker.cli import main

    assert main(["agent-manifests", "--namespace", "BAD", "--image", "i"]) == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["agent", "--help"])
    assert exit_info.value.code == 0


def test_manifests_round_trip_through_the_kubernetes_models():
    # The kubernetes client's typed models drop any field they do not know: a typo would vanish here.
    kubernetes = pytest.importorskip("kubernetes")
    client = kubernetes.client.ApiClient()
    daemonset, service = agent_manifests("gpu-system", "img:1", tolerations=[{"operator": "Exists"}])
    for manifest, model in ((daemonset, "V1DaemonSet"), (service, "V1Service")):
        typed = client._ApiClient__deserialize(manifest, model)
        assert client.sanitize_for_serialization(typed) == manifest, model
