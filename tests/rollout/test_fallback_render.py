"""The fallback model's objects: rendered by the revisions' own render code, yet never taken for a revision."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import yaml

from digital_worker.operator import fallback, render, schema as api
from digital_worker.operator.spec import normalize_spec
from digital_worker.runtime.contract import API_KEY_ENV, LaunchConfig

EXAMPLE = yaml.safe_load((Path(__file__).resolve().parents[2] / "examples" / "digitalworker.yaml").read_text())


def example(**fallback_fields):
    body = copy.deepcopy(EXAMPLE)
    body["metadata"]["uid"] = "uid-1"
    body["spec"]["fallback"].update(fallback_fields)
    spec, problems = normalize_spec(body["spec"])
    assert problems == []
    return body, spec


def matches(selector: str, labels: dict[str, str]) -> bool:
    """Equality-based label selector semantics (what the API server does with `a=b,c=d`)."""
    return all(labels.get(key) == value for key, value in (term.split("=", 1) for term in selector.split(",")))


def test_fallback_objects_are_not_revisions_of_the_worker():
    body, spec = example()
    configmap, deployment = fallback.render_fallback(body, spec)
    assert configmap["metadata"]["name"] == deployment["metadata"]["name"] == "support-bot-fallback"
    # A worker named `support-bot-fallback` names its own children `support-bot-fallback-<revision>`.
    assert render.revision_name("support-bot-fallback", "abc") != "support-bot-fallback"
    for obj in (configmap, deployment):
        labels = obj["metadata"]["labels"]
        assert labels[api.LABEL_INSTANCE] == "support-bot.fallback"  # never a worker's name (DNS label)
        assert labels[api.LABEL_ROLE] == "fallback" and labels[api.LABEL_REVISION] == "fallback"
        assert labels[api.LABEL_NAME] == api.APP_NAME  # the platform's PodMonitor still scrapes it
        # The reconcile lists (and would delete) everything its selector matches: not these.
        assert not matches(render.selector_string("support-bot"), labels)
        assert not matches(render.selector_string("support-bot-fallback"), labels)  # nor a worker named so
        assert obj["metadata"]["ownerReferences"] == [render.owner_reference(body)]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert matches(",".join(f"{k}={v}" for k, v in deployment["spec"]["selector"]["matchLabels"].items()), pod_labels)
    # Its series carry the worker (digitalworker_io_instance) and revision "fallback".
    assert pod_labels[api.LABEL_WORKER] == "support-bot" and pod_labels[api.LABEL_REVISION] == "fallback"
    # Neither the stable Service's default selector nor the PDB's select the fallback pods ...
    for selector in (render.render_service(body)["spec"]["selector"], render.render_pdb(body)["spec"]["selector"]):
        assert not matches(",".join(f"{k}={v}" for k, v in selector.items()), pod_labels)
    # ... but the breaker's routes do: Fallback only them, Both them and the worker's own pods.
    primary_pod_labels = render.render_deployment(body, spec, "abc", 2)["spec"]["template"]["metadata"]["labels"]
    only_fallback = fallback.service_selector(fallback.Route.FALLBACK, "support-bot")
    both = fallback.service_selector(fallback.Route.BOTH, "support-bot")
    as_text = lambda selector: ",".join(f"{k}={v}" for k, v in selector.items())  # noqa: E731
    assert matches(as_text(only_fallback), pod_labels) and not matches(as_text(only_fallback), primary_pod_labels)
    assert matches(as_text(both), pod_labels) and matches(as_text(both), primary_pod_labels)
    assert fallback.service_selector(fallback.Route.PRIMARY, "support-bot") is None


def test_fallback_runs_its_own_model_under_the_workers_name():
    body, spec = example(replicas=3, gpusPerReplica=1, gpuType="nvidia-l4")
    configmap, deployment = fallback.render_fallback(body, spec)
    launch = LaunchConfig.from_dict(json.loads(configmap["data"]["runtime.json"]))
    assert launch.model_source == "hf://Qwen/Qwen2.5-1.5B-Instruct"
    assert launch.served_model_name == "qwen2.5-7b"  # clients keep asking for spec.model.name
    assert launch.tensor_parallel_size == 1 and launch.extra_args == ()  # the primary's tuning is not inherited
    assert deployment["metadata"]["annotations"][f"{api.GROUP}/model"] == "qwen2.5-1.5b"
    assert deployment["spec"]["replicas"] == 3
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"][api.LABEL_GPU_TYPE] == "nvidia-l4"
    assert {"name": "config", "configMap": {"name": "support-bot-fallback"}} in pod["volumes"]
    # The same API key as the primary: clients authenticate the same way.
    assert any(e["name"] == API_KEY_ENV and e["valueFrom"]["secretKeyRef"]["name"] == "support-bot-key"
               for e in container["env"])
    assert container["image"] == spec["runtime"]["image"]


def test_fallback_inherits_gpu_type_and_defaults_to_one_gpu():
    body, spec = example()
    spec_for_fallback = fallback.fallback_worker_spec(spec)
    assert spec_for_fallback["runtime"]["gpusPerReplica"] == 1
    assert spec_for_fallback["runtime"]["gpuType"] == spec["runtime"]["gpuType"]
    assert spec_for_fallback["replicas"] == 1  # the schema's default
    assert "memFractionStatic" not in spec_for_fallback["runtime"]


def test_revision_rendering_is_unchanged_without_overrides():
    body, spec = example()
    revision = render.revision_hash(spec)
    deployment = render.render_deployment(body, spec, revision, 2)
    configmap = render.render_configmap(body, spec, revision)
    assert deployment["metadata"]["labels"] == {**render.instance_labels("support-bot"), api.LABEL_REVISION: revision}
    assert deployment["spec"]["selector"]["matchLabels"] == {api.LABEL_INSTANCE: "support-bot",
                                                             api.LABEL_REVISION: revision}
    assert configmap["metadata"]["labels"] == deployment["metadata"]["labels"]
    assert json.loads(configmap["data"]["runtime.json"])["served_model_name"] == "qwen2.5-7b"
    assert [obj["kind"] for obj in render.render_all(body, spec)] == [
        "ConfigMap", "Deployment", "Service", "PodDisruptionBudget"]
