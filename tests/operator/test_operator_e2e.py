"""End to end: the real kopf operator reconciling DigitalWorkers on the emulated API over HTTP."""
from __future__ import annotations

import copy
import json
import weakref
from pathlib import Path

import yaml

from operator_support import wait_until
from digital_worker.operator import schema as api

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = yaml.safe_load((REPO / "examples" / "digitalworker.yaml").read_text())
SECRET_VALUE = "s3cr3t-api-key-that-must-never-leak"


def make_worker(kube, namespace, name="bot", mutate=None):
    body = copy.deepcopy(EXAMPLE)
    body["metadata"] = {"name": name, "namespace": namespace}
    body["spec"]["replicas"] = 2
    if mutate:
        mutate(body)
    kube.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "support-bot-key", "namespace": namespace},
                 "stringData": {"api-key": SECRET_VALUE}}) if not kube.get("v1", "secrets", namespace, "support-bot-key") else None
    return kube.create(body)


def get_worker(kube, namespace, name="bot"):
    return kube.get(api.API_VERSION, api.PLURAL, namespace, name)


def status(kube, namespace, name="bot"):
    return (get_worker(kube, namespace, name) or {}).get("status") or {}


def deployments(kube, namespace, name="bot"):
    return kube.list("apps/v1", "deployments", namespace, f"{api.LABEL_INSTANCE}={name}")


def events(kube, namespace):
    return kube.list("v1", "events", namespace)


def test_create_reconciles_children_and_status(operator, kube, namespace):
    created = make_worker(kube, namespace)
    final = wait_until(lambda: status(kube, namespace).get("phase") == "Ready" and status(kube, namespace),
                       message="worker Ready")
    assert final["readyReplicas"] == 2 and final["desiredReplicas"] == 2 and final["replicas"] == 2
    assert final["observedGeneration"] == 1
    assert final["currentRevision"] == final["stableRevision"]
    assert final["endpoint"] == f"http://bot.{namespace}.svc.cluster.local"
    conditions = {c["type"]: c for c in final["conditions"]}
    assert conditions["Available"]["status"] == "True" and conditions["Degraded"]["status"] == "False"
    assert conditions["Progressing"]["reason"] == "RolloutComplete"
    uid = created["metadata"]["uid"]
    children = {
        "deployments": deployments(kube, namespace),
        "services": kube.list("v1", "services", namespace, f"{api.LABEL_INSTANCE}=bot"),
        "configmaps": kube.list("v1", "configmaps", namespace, f"{api.LABEL_INSTANCE}=bot"),
        "poddisruptionbudgets": kube.list("policy/v1", "poddisruptionbudgets", namespace, f"{api.LABEL_INSTANCE}=bot"),
    }
    for kind, items in children.items():
        assert len(items) == 1, kind
        assert items[0]["metadata"]["ownerReferences"][0]["uid"] == uid, kind
    assert children["deployments"][0]["metadata"]["name"] == f"bot-{final['currentRevision']}"
    reasons = {e["reason"] for e in events(kube, namespace)}
    assert {"RevisionCreated", "Ready"} <= reasons
    # Secrets never reach status, events or config.
    everything = json.dumps([final, events(kube, namespace), children])
    assert SECRET_VALUE not in everything


def test_second_pass_changes_nothing(operator, kube, namespace):
    make_worker(kube, namespace)
    wait_until(lambda: status(kube, namespace).get("phase") == "Ready", message="Ready")
    from digital_worker.operator import reconcile

    result = reconcile.reconcile(get_worker(kube, namespace), kube)
    assert result.changes == 0 and result.events == []


def test_spec_change_rolls_a_new_revision_and_retires_the_old(operator, kube, namespace):
    """Without spec.rollout: the interim strategy (new beside old, old deleted once the new is ready)."""
    make_worker(kube, namespace, mutate=lambda body: body["spec"].pop("rollout"))
    first = wait_until(lambda: status(kube, namespace).get("phase") == "Ready" and status(kube, namespace))
    kube.patch(api.API_VERSION, api.PLURAL, namespace, "bot", {"spec": {"model": {"revision": "v2"}}})
    final = wait_until(lambda: (s := status(kube, namespace)).get("currentRevision") != first["currentRevision"]
                       and s.get("phase") == "Ready" and s, timeout=30, message="new revision Ready")
    assert final["observedGeneration"] == 2
    names = [d["metadata"]["name"] for d in deployments(kube, namespace)]
    wait_until(lambda: [d["metadata"]["name"] for d in deployments(kube, namespace)] == [f"bot-{final['currentRevision']}"],
               message=f"old revision removed (have {names})")
    assert final["stableRevision"] == final["currentRevision"]
    assert "RevisionReplaced" in {e["reason"] for e in events(kube, namespace)}


def test_scale_subresource_drives_the_deployment(operator, kube, namespace):
    make_worker(kube, namespace)
    wait_until(lambda: status(kube, namespace).get("phase") == "Ready")
    scale = kube.get(api.API_VERSION, api.PLURAL, namespace, "bot", subresource="scale")
    assert scale["spec"]["replicas"] == 2 and scale["status"]["selector"].endswith("app.kubernetes.io/instance=bot")
    kube.patch(api.API_VERSION, api.PLURAL, namespace, "bot", {"spec": {"replicas": 3}}, subresource="scale")
    wait_until(lambda: (s := status(kube, namespace)).get("readyReplicas") == 3 and s.get("phase") == "Ready",
               message=lambda: f"scaled to 3: {get_worker(kube, namespace)}")
    assert deployments(kube, namespace)[0]["spec"]["replicas"] == 3
    assert "DriftRepaired" not in {e["reason"] for e in events(kube, namespace)}, "scaling is not drift"


def test_delete_cascades(operator, kube, namespace):
    make_worker(kube, namespace)
    wait_until(lambda: status(kube, namespace).get("phase") == "Ready")
    kube.delete(api.API_VERSION, api.PLURAL, namespace, "bot")
    wait_until(lambda: get_worker(kube, namespace) is None, message="worker gone")
    for api_version, plural in (("apps/v1", "deployments"), ("v1", "services"), ("v1", "configmaps"),
                                ("policy/v1", "poddisruptionbudgets"), ("v1", "pods")):
        wait_until(lambda: kube.list(api_version, plural, namespace, f"{api.LABEL_INSTANCE}=bot") == [],
                   message=f"{plural} collected")


def test_drift_is_repaired(operator, kube, namespace):
    make_worker(kube, namespace)
    wait_until(lambda: status(kube, namespace).get("phase") == "Ready")
    kube.delete("v1", "services", namespace, "bot")
    wait_until(lambda: kube.get("v1", "services", namespace, "bot") is not None, message="service back")
    deployment = deployments(kube, namespace)[0]
    kube.patch("apps/v1", "deployments", namespace, deployment["metadata"]["name"], {"spec": {"replicas": 7}})
    wait_until(lambda: deployments(kube, namespace)[0]["spec"]["replicas"] == 2, message="replicas restored")
    cm_name = deployment["metadata"]["name"]
    kube.patch("v1", "configmaps", namespace, cm_name, {"data": {"runtime.json": "{}"}})
    wait_until(lambda: kube.get("v1", "configmaps", namespace, cm_name)["data"]["runtime.json"] != "{}",
               message="config restored")
    assert "DriftRepaired" in {e["reason"] for e in events(kube, namespace)}


def test_invalid_spec_degrades_without_touching_children(operator, kube, namespace):
    def bad(body):
        body["spec"]["runtime"]["gpusPerReplica"] = 3  # not a multiple of tensorParallelSize 2

    make_worker(kube, namespace, mutate=bad)
    final = wait_until(lambda: status(kube, namespace).get("phase") == "Degraded" and status(kube, namespace))
    assert "gpusPerReplica" in final["message"]
    assert {c["type"]: c["status"] for c in final["conditions"]}["Degraded"] == "True"
    assert deployments(kube, namespace) == []
    assert any(e["reason"] == "InvalidSpec" and e["type"] == "Warning" for e in events(kube, namespace))
    # Fixing the spec recovers.
    kube.patch(api.API_VERSION, api.PLURAL, namespace, "bot", {"spec": {"runtime": {"gpusPerReplica": 2}}})
    wait_until(lambda: status(kube, namespace).get("phase") == "Ready", timeout=30, message="recovered")


def test_invalid_update_keeps_the_running_revision(operator, kube, namespace):
    make_worker(kube, namespace)
    ready = wait_until(lambda: status(kube, namespace).get("phase") == "Ready" and status(kube, namespace))
    kube.patch(api.API_VERSION, api.PLURAL, namespace, "bot", {"spec": {"runtime": {"extraArgs": ["--port", "1"]}}})
    wait_until(lambda: status(kube, namespace).get("phase") == "Degraded", message="Degraded")
    names = [d["metadata"]["name"] for d in deployments(kube, namespace)]
    assert names == [f"bot-{ready['currentRevision']}"]
    assert status(kube, namespace)["readyReplicas"] == 2


def test_api_errors_are_retried(operator, kube, namespace, cluster):
    """The API answers 500 to the Deployment creation and to a status patch: the worker still gets Ready."""
    failures = {"post": 1, "status": 1}
    decided = weakref.WeakKeyDictionary()  # kmock may ask about one request more than once

    def flaky(request):
        if request not in decided:
            decided[request] = should_fail(request)
        return decided[request]

    def should_fail(request):
        path = str(request.url.path)
        if namespace not in path:
            return False
        if request.method == "POST" and path.endswith("/deployments") and failures["post"] > 0:
            failures["post"] -= 1
            return True
        if request.method == "PATCH" and "/digitalworkers/" in path and path.endswith("/status") and failures["status"] > 0:
            failures["status"] -= 1
            return True
        return False

    emulator = cluster.emulator
    cluster.loop.call_soon_threadsafe(lambda: emulator[flaky] << 500)
    make_worker(kube, namespace)
    wait_until(lambda: status(kube, namespace).get("phase") == "Ready", timeout=40, message=lambda: f"Ready despite errors: {status(kube, namespace)} {failures} {deployments(kube, namespace)}")
    assert failures == {"post": 0, "status": 0}
    assert len(deployments(kube, namespace)) == 1


def test_paused_worker_is_left_alone(operator, kube, namespace):
    make_worker(kube, namespace, mutate=lambda body: body["spec"].update(paused=True))
    wait_until(lambda: status(kube, namespace).get("message", "").startswith("reconcile paused"))
    assert deployments(kube, namespace) == []
