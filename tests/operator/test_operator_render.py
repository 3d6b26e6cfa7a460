"""Rendering and revision hashing: pure functions, no cluster."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import yaml

from digital_worker.operator import render, spec
from digital_worker.runtime.contract import LaunchConfig, build_argv

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = yaml.safe_load((REPO / "examples" / "digitalworker.yaml").read_text())
EXAMPLE["metadata"]["uid"] = "uid-1"


def normalized(body):
    result, problems = spec.normalize_spec(body["spec"])
    assert problems == []
    return result


def test_revision_hash_covers_the_pod_and_nothing_else():
    base = normalized(EXAMPLE)
    assert render.revision_hash(base) == render.revision_hash(copy.deepcopy(base))
    for change in ({"replicas": 5}, {"autoscaling": {"mode": "Auto", "minReplicas": 1, "maxReplicas": 9}},
                   {"rollout": {"strategy": "BlueGreen"}}):
        assert render.revision_hash({**base, **change}) == render.revision_hash(base)
    for path, value in (("runtime.image", "other:1"), ("model.revision", "v2"), ("runtime.maxRunningRequests", 8)):
        changed = copy.deepcopy(base)
        section, key = path.split(".")
        changed[section][key] = value
        assert render.revision_hash(changed) != render.revision_hash(base), path
    assert len(render.revision_hash(base)) == render.REVISION_LENGTH


def test_deployment_has_gpus_probes_security_and_owner():
    s = normalized(EXAMPLE)
    deployment = render.render_deployment(EXAMPLE, s, "abc1234567", 2)
    assert deployment["metadata"]["name"] == "support-bot-abc1234567"
    assert deployment["metadata"]["ownerReferences"][0] == {
        "apiVersion": "digitalworker.io/v1alpha1", "kind": "DigitalWorker", "name": "support-bot", "uid": "uid-1",
        "controller": True, "blockOwnerDeletion": True}
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels == {"app.kubernetes.io/name": "digital-worker", "app.kubernetes.io/instance": "support-bot",
                      "app.kubernetes.io/managed-by": "digital-worker-operator",
                      "digitalworker.io/revision": "abc1234567", "digitalworker.io/instance": "support-bot"}
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert container["resources"]["requests"] == {"cpu": "8", "memory": "64Gi"}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    assert container["startupProbe"]["failureThreshold"] * container["startupProbe"]["periodSeconds"] >= 1800
    assert pod["terminationGracePeriodSeconds"] >= 120
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    assert pod["nodeSelector"] == {"digitalworker.io/gpu-type": "nvidia-h100-80gb"}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert pod["initContainers"][0]["command"][:3] == ["digital-worker", "runtime", "fetch"]
    # The pod runs our launcher, so the documented example must run an image that has it (SGLang's
    # own image does not: it used to be the example's, and its pods could never have started).
    from digital_worker.runtime.contract import DEFAULT_IMAGE

    assert container["command"][:3] == ["digital-worker", "runtime", "launch"]
    assert container["image"] == pod["initContainers"][0]["image"] == DEFAULT_IMAGE


def test_api_key_only_ever_travels_as_a_secret_reference():
    s = normalized(EXAMPLE)
    deployment = render.render_deployment(EXAMPLE, s, "r", 1)
    env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["DIGITAL_WORKER_API_KEY"] == {"name": "DIGITAL_WORKER_API_KEY", "valueFrom": {
        "secretKeyRef": {"name": "support-bot-key", "key": "api-key"}}}
    config = json.loads(render.render_configmap(EXAMPLE, s, "r")["data"]["runtime.json"])
    assert config["api_key_env"] == "DIGITAL_WORKER_API_KEY"
    assert "api_key" not in config


def test_configmap_holds_the_launch_contract():
    s = normalized(EXAMPLE)
    config = LaunchConfig.from_dict(json.loads(render.render_configmap(EXAMPLE, s, "r")["data"]["runtime.json"]))
    argv = build_argv(config)
    assert argv[argv.index("--tp-size") + 1] == "2"
    assert argv[argv.index("--served-model-name") + 1] == "qwen2.5-7b"
    assert argv[argv.index("--model-path") + 1] == "/models/hf/Qwen/Qwen2.5-7B-Instruct/main"
    assert "--enable-metrics" in argv and "--chunked-prefill-size" in argv


def test_pvc_models_are_mounted_not_downloaded():
    body = copy.deepcopy(EXAMPLE)
    body["spec"]["model"]["source"] = "pvc://models/qwen"
    s = normalized(body)
    pod = render.render_deployment(body, s, "r", 1)["spec"]["template"]["spec"]
    assert {"name": "model-pvc", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}} in pod["volumes"]
    assert render.launch_config(s).model_path == "/mnt/model-pvc/qwen"


def test_render_cli_prints_what_the_operator_applies(tmp_path):
    path = tmp_path / "dw.yaml"
    path.write_text(yaml.safe_dump(EXAMPLE))
    out = subprocess.run([sys.executable, "-m", "digital_worker", "render", "-f", str(path)],
                         capture_output=True, text=True, check=True)
    kinds = [doc["kind"] for doc in yaml.safe_load_all(out.stdout)]
    assert kinds == ["ConfigMap", "Deployment", "Service", "PodDisruptionBudget"]


def test_render_cli_rejects_bad_input_in_one_line(tmp_path):
    bad = copy.deepcopy(EXAMPLE)
    bad["spec"]["runtime"]["gpusPerReplica"] = 3
    path = tmp_path / "dw.yaml"
    path.write_text(yaml.safe_dump(bad))
    out = subprocess.run([sys.executable, "-m", "digital_worker", "render", "-f", str(path)],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "gpusPerReplica" in out.stderr and "Traceback" not in out.stderr
    missing = subprocess.run([sys.executable, "-m", "digital_worker", "render", "-f", str(tmp_path / "nope.yaml")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "cannot read" in missing.stderr
