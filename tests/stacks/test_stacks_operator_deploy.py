"""operator/deploy.py: the operator's own manifests, checked for least privilege and hardening."""
from __future__ import annotations

import pytest

from digital_worker.operator import deploy

# What the operator calls, written out independently of deploy.py: (group, resource) -> verbs.
EXPECTED_VERBS = {
    ("digitalworker.io", "digitalworkers"): {"get", "list", "watch", "patch"},
    ("digitalworker.io", "digitalworkers/status"): {"get", "patch"},
    ("digitalworker.io", "digitalworkers/scale"): {"patch"},  # the autoscaler's writes
    ("digitalworker.io", "digitalworkers/finalizers"): {"update"},  # children's blockOwnerDeletion
    ("apps", "deployments"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "services"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "configmaps"): {"get", "list", "watch", "create", "patch", "delete"},
    ("policy", "poddisruptionbudgets"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "pods"): {"get", "list", "watch", "delete"},
    ("", "nodes"): {"get", "list", "watch", "patch"},
    ("", "events"): {"create"},  # kopf and the operator post core events, never patch them
    ("", "secrets"): {"get"},
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"get", "list", "watch"},
    ("", "namespaces"): {"list", "watch"},
    ("kopf.dev", "clusterkopfpeerings"): {"get", "list", "watch", "patch"},
    ("kopf.dev", "kopfpeerings"): {"get", "list", "watch", "patch"},
    ("gateway.networking.k8s.io", "httproutes"): {"get", "list", "watch", "create", "patch", "delete"},
}


def granted_verbs(role: dict) -> dict[tuple[str, str], set[str]]:
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    return granted


def by_kind(objects: list[dict]) -> dict[str, dict]:
    return {obj["kind"]: obj for obj in objects}


def test_cluster_role_grants_exactly_the_verbs_the_operator_uses():
    role = by_kind(deploy.operator_manifests("dw-system", "op:1"))["ClusterRole"]
    granted = granted_verbs(role)
    assert granted == EXPECTED_VERBS
    for verbs in granted.values():
        assert "*" not in verbs
    assert all("*" not in rule["apiGroups"] and "*" not in rule["resources"] for rule in role["rules"])


def test_binding_ties_the_service_account_in_its_namespace_to_the_role():
    objects = by_kind(deploy.operator_manifests("dw-system", "op:1"))
    binding = objects["ClusterRoleBinding"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
        "name": objects["ClusterRole"]["metadata"]["name"],
    }
    assert binding["subjects"] == [{
        "kind": "ServiceAccount", "name": objects["ServiceAccount"]["metadata"]["name"], "namespace": "dw-system",
    }]
    assert objects["ServiceAccount"]["metadata"]["namespace"] == "dw-system"


def test_deployment_is_hardened_and_probed():
    dep = by_kind(deploy.operator_manifests("dw-system", "registry.local/op:2", replicas=1))["Deployment"]
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "Recreate"}  # never two peers with one priority
    assert pod["serviceAccountName"] == deploy.OPERATOR_NAME
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert container["image"] == "registry.local/op:2"
    assert container["resources"]["requests"] == {"cpu": "100m", "memory": "256Mi"}
    probe = container["livenessProbe"]["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert probe["path"] == "/healthz" and ports[probe["port"]] == 8080
    assert ports["metrics"] == 9090
    # The liveness endpoint the probe hits is the one `digital-worker run` is told to serve.
    args = container["args"]
    assert args[0] == "run"
    assert args[args.index("--liveness") + 1] == "http://0.0.0.0:8080/healthz"
    assert args[args.index("--peering") + 1] == deploy.PEERING_NAME
    # A read-only root needs somewhere writable for temp files.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts["/tmp"] in {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()


def test_watch_namespaces_and_prometheus_url_reach_the_operator_args():
    dep = by_kind(deploy.operator_manifests(
        "ops", "op:1", watch_namespaces=["team-a", "team-b"], prometheus_url="http://prom.ops.svc:9090",
    ))["Deployment"]
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert [args[i + 1] for i, a in enumerate(args) if a == "--namespace"] == ["team-a", "team-b"]
    assert args[args.index("--prometheus-url") + 1] == "http://prom.ops.svc:9090"
    cluster_wide = by_kind(deploy.operator_manifests("ops", "op:1"))["Deployment"]
    assert "--namespace" not in cluster_wide["spec"]["template"]["spec"]["containers"][0]["args"]


def test_operator_args_parse_with_the_real_run_command():
    import argparse

    from digital_worker.operator import commands

    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(deploy.operator_args(watch_namespaces=["a", "b"], prometheus_url="http://p:9090"))
    assert args.command == "run" and args.namespaces == ["a", "b"]
    assert args.liveness == "http://0.0.0.0:8080/healthz" and args.peering == deploy.PEERING_NAME
    assert args.prometheus_url == "http://p:9090"
    assert parser.parse_args(deploy.operator_args()).namespaces is None


def test_metrics_service_selects_the_operator_pods_on_9090():
    objects = by_kind(deploy.operator_manifests("dw-system", "op:1"))
    service, dep = objects["Service"], objects["Deployment"]
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}]
    assert service["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()


def test_peering_follows_the_watch_scope():
    cluster_wide = deploy.peering_manifests()
    assert [o["kind"] for o in cluster_wide][-1] == "ClusterKopfPeering"
    scoped = [o for o in deploy.peering_manifests(["a", "b"]) if o["kind"] == "KopfPeering"]
    assert [(o["metadata"]["namespace"], o["metadata"]["name"]) for o in scoped] == [
        ("a", deploy.PEERING_NAME), ("b", deploy.PEERING_NAME)]


@pytest.mark.parametrize("kwargs, field", [
    ({"namespace": "", "image": "x"}, "namespace"),
    ({"namespace": "n", "image": ""}, "image"),
    ({"namespace": "n", "image": "x", "replicas": 0}, "replicas"),
    ({"namespace": "n", "image": "x", "replicas": 2}, "replicas must be at most 1.*equal priorities"),
])
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        deploy.operator_manifests(**kwargs)


def test_each_call_returns_fresh_objects():
    first = deploy.operator_manifests("n", "x")
    first[1]["rules"].clear()
    assert deploy.operator_manifests("n", "x")[1]["rules"]
