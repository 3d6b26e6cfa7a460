"""Render what the operator applies for a DigitalWorker: pure functions, jinja2 templates in the package.

`digital-worker render -f dw.yaml` prints exactly these objects, so GitOps reviews see what the
operator would apply.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from typing import Any

from digital_worker.operator import schema as api
from digital_worker.runtime.contract import API_KEY_ENV, CONFIG_PATH, MODEL_CACHE_DIR, LaunchConfig

REVISION_LENGTH = 10
PVC_MOUNT = "/mnt/model-pvc"


@functools.lru_cache(maxsize=1)
def _environment():
    import jinja2

    return jinja2.Environment(
        loader=jinja2.PackageLoader("digital_worker.operator", "templates"),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        auto_reload=False,  # templates ship in the package: no stat() per render
    )


def _render(template: str, **values: Any) -> dict[str, Any]:
    # Reconciles render the same objects pass after pass: render and parse each distinct input once.
    key = json.dumps([template, values], sort_keys=True, separators=(",", ":"))
    return json.loads(_render_cached(key))


@functools.lru_cache(maxsize=8192)
def _render_cached(key: str) -> str:
    template, values = json.loads(key)
    text = _environment().get_template(template).render(**values)
    json.loads(text)  # a template that renders invalid JSON fails here, loudly, not in the API server
    return text


def revision_hash(spec: dict[str, Any]) -> str:
    """Hash of everything that changes the pod: the model and how it runs (not replicas, rollout, scaling)."""
    pod_affecting = {"model": spec.get("model"), "runtime": spec.get("runtime")}
    canonical = json.dumps(pod_affecting, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:REVISION_LENGTH]


def revision_name(dw_name: str, revision: str) -> str:
    return f"{dw_name}-{revision}"


def instance_labels(dw_name: str) -> dict[str, str]:
    return {api.LABEL_NAME: api.APP_NAME, api.LABEL_INSTANCE: dw_name, api.LABEL_MANAGED_BY: "digital-worker-operator"}


def selector_string(dw_name: str) -> str:
    return f"{api.LABEL_NAME}={api.APP_NAME},{api.LABEL_INSTANCE}={dw_name}"


def model_path(model: dict[str, Any]) -> str:
    """Where the weights are inside the pod: the fetch step downloads to this path, SGLang loads from it."""
    source = model["source"]
    scheme, rest = source.split("://", 1)
    if scheme == "pvc":
        _, _, sub_path = rest.partition("/")
        return f"{PVC_MOUNT}/{sub_path}".rstrip("/")
    revision = model.get("revision", "main") if scheme == "hf" else ""
    return "/".join(part for part in (MODEL_CACHE_DIR, scheme, rest.strip("/"), revision) if part)


def launch_config(spec: dict[str, Any]) -> LaunchConfig:
    model, runtime = spec["model"], spec.get("runtime", {})
    return LaunchConfig(
        model_path=model_path(model),
        served_model_name=model["name"],
        port=runtime.get("port", 30000),
        tensor_parallel_size=runtime.get("tensorParallelSize", 1),
        data_parallel_size=runtime.get("dataParallelSize", 1),
        mem_fraction_static=runtime.get("memFractionStatic"),
        max_running_requests=runtime.get("maxRunningRequests"),
        context_length=model.get("contextLength"),
        quantization=model.get("quantization"),
        dtype=runtime.get("dtype", "auto"),
        kv_cache_dtype=runtime.get("kvCacheDtype", "auto"),
        chunked_prefill_size=runtime.get("chunkedPrefillSize"),
        log_level=runtime.get("logLevel", "info"),
        revision=model.get("revision") if model["source"].startswith("hf://") else None,
        api_key_env=API_KEY_ENV if runtime.get("apiKeySecretRef") else None,
        model_source=model["source"],
        extra_args=tuple(runtime.get("extraArgs", [])),
    )


def owner_reference(body: dict[str, Any]) -> dict[str, Any]:
    meta = body["metadata"]
    return {"apiVersion": api.API_VERSION, "kind": api.KIND, "name": meta["name"], "uid": meta.get("uid", ""),
            "controller": True, "blockOwnerDeletion": True}


def _owned(obj: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    obj["metadata"]["ownerReferences"] = [owner_reference(body)]
    return obj


def _child_labels(dw_name: str, revision: str, instance: str | None,
                  extra_labels: dict[str, str] | None) -> dict[str, str]:
    """Labels of a revision's objects; `instance` (default: the worker) and `extra_labels` let objects that
    are not revisions of the worker (the fallback model) stay out of its child selector."""
    labels = {**instance_labels(dw_name), api.LABEL_REVISION: revision}
    if instance:
        labels[api.LABEL_INSTANCE] = instance
    return {**labels, **(extra_labels or {})}


def render_configmap(body: dict[str, Any], spec: dict[str, Any], revision: str, *, instance: str | None = None,
                     extra_labels: dict[str, str] | None = None,
                     served_model_name: str | None = None) -> dict[str, Any]:
    name = body["metadata"]["name"]
    launch = launch_config(spec)
    if served_model_name:
        launch = dataclasses.replace(launch, served_model_name=served_model_name)
    return _owned(_render(
        "configmap.json.j2", name=revision_name(name, revision), namespace=body["metadata"]["namespace"],
        labels=_child_labels(name, revision, instance, extra_labels),
        launch_config_json=launch.to_json(),
    ), body)


def _secret_env(env_name: str, ref: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not ref:
        return []
    return [{"name": env_name, "valueFrom": {"secretKeyRef": {"name": ref["name"], "key": ref["key"]}}}]


def render_deployment(body: dict[str, Any], spec: dict[str, Any], revision: str, replicas: int, *,
                      instance: str | None = None, extra_labels: dict[str, str] | None = None) -> dict[str, Any]:
    name = body["metadata"]["name"]
    namespace = body["metadata"]["namespace"]
    runtime = spec.get("runtime", {})
    model = spec["model"]
    labels = _child_labels(name, revision, instance, extra_labels)
    # The worker's name again under our own group: scrape configs turn pod labels into series labels
    # (`digitalworker_io_instance`), which autoscaling and analysis select on.
    pod_labels = {**labels, api.LABEL_WORKER: name}
    selector = {api.LABEL_INSTANCE: instance or name, api.LABEL_REVISION: revision}
    hf_token = _secret_env("HF_TOKEN", model.get("hfTokenSecretRef"))
    base_env = [{"name": "HOME", "value": "/tmp"}, {"name": "XDG_CACHE_HOME", "value": "/tmp/.cache"}]
    user_env = [{"name": item["name"], "value": item.get("value", "")} for item in runtime.get("env", [])]
    env = base_env + _secret_env(API_KEY_ENV, runtime.get("apiKeySecretRef")) + hf_token + user_env
    fetch_env = base_env + hf_token
    resources_spec = runtime.get("resources", {})
    requests = {key: resources_spec[key] for key in ("cpu", "memory") if key in resources_spec}
    # Quantities are strings, as the API server returns them (typed clients reject numbers).
    limits: dict[str, Any] = {"nvidia.com/gpu": str(runtime.get("gpusPerReplica", 1))}
    if "memory" in resources_spec:
        limits["memory"] = resources_spec["memory"]
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": revision_name(name, revision)}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": runtime.get("shmSize", "16Gi")}},
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_PATH.rsplit("/", 1)[0], "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    if model["source"].startswith("pvc://"):
        claim = model["source"][len("pvc://"):].split("/", 1)[0]
        volumes.append({"name": "model-pvc", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": "model-pvc", "mountPath": PVC_MOUNT, "readOnly": True})
    else:
        volumes.append({"name": "model-cache", "emptyDir": {"sizeLimit": runtime.get("modelCacheSize", "200Gi")}})
        mounts.append({"name": "model-cache", "mountPath": MODEL_CACHE_DIR})
    node_selector = dict(runtime.get("nodeSelector", {}))
    if runtime.get("gpuType"):
        node_selector[api.LABEL_GPU_TYPE] = runtime["gpuType"]
    tolerations = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}] + \
        list(runtime.get("tolerations", []))
    port = runtime.get("port", 30000)
    deployment = _render(
        "deployment.json.j2",
        name=revision_name(name, revision), namespace=namespace, labels=labels,
        annotations={f"{api.GROUP}/model": model["name"]},
        replicas=replicas, selector=selector, pod_labels=pod_labels,
        pod_annotations={"prometheus.io/scrape": "true", "prometheus.io/port": str(port),
                         "prometheus.io/path": "/metrics"},
        runtime={**runtime, "port": port,
                 "terminationGracePeriodSeconds": runtime.get("terminationGracePeriodSeconds", 180),
                 "image": runtime.get("image"), "imagePullPolicy": runtime.get("imagePullPolicy", "IfNotPresent")},
        node_selector=node_selector, tolerations=tolerations, config_path=CONFIG_PATH,
        env=env, fetch_env=fetch_env, resources={"requests": requests, "limits": limits},
        container_security={"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        startup_failure_threshold=max(6, runtime.get("startupTimeoutSeconds", 1800) // 10),
        volume_mounts=mounts, volumes=volumes,
    )
    return _owned(deployment, body)


def render_service(body: dict[str, Any], selector: dict[str, str] | None = None) -> dict[str, Any]:
    name = body["metadata"]["name"]
    return _owned(_render(
        "service.json.j2", name=name, namespace=body["metadata"]["namespace"], labels=instance_labels(name),
        selector=selector or {api.LABEL_INSTANCE: name, api.LABEL_NAME: api.APP_NAME},
    ), body)


def render_revision_service(body: dict[str, Any], role: str, revision: str) -> dict[str, Any]:
    """`<dw>-<role>` selecting one revision's pods: blue-green's preview, Gateway API's stable/canary backends."""
    name = body["metadata"]["name"]
    return _owned(_render(
        "service.json.j2", name=f"{name}-{role}", namespace=body["metadata"]["namespace"],
        labels={**instance_labels(name), api.LABEL_ROLE: role},
        selector={api.LABEL_INSTANCE: name, api.LABEL_REVISION: revision},
    ), body)


def render_pdb(body: dict[str, Any]) -> dict[str, Any]:
    name = body["metadata"]["name"]
    return _owned(_render(
        "pdb.json.j2", name=name, namespace=body["metadata"]["namespace"], labels=instance_labels(name),
        selector={api.LABEL_INSTANCE: name, api.LABEL_NAME: api.APP_NAME},
    ), body)


def endpoint_url(body: dict[str, Any]) -> str:
    meta = body["metadata"]
    return f"http://{meta['name']}.{meta['namespace']}.svc.cluster.local"


def render_all(body: dict[str, Any], spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Everything a fresh DigitalWorker gets, for `digital-worker render`."""
    revision = revision_hash(spec)
    return [
        render_configmap(body, spec, revision),
        render_deployment(body, spec, revision, spec.get("replicas", 1)),
        render_service(body),
        render_pdb(body),
    ]
