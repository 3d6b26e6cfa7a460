"""The emulated API behaves like an API server where the operator relies on it (a thin kmock subclass)."""
from __future__ import annotations

import asyncio
import shutil
import subprocess

import pytest

from operator_support import wait_until
from digital_worker.operator.emulator import OPERATOR_USER, EmulatedCluster
from digital_worker.operator.kube import Conflict, KubeClient


def _deployment(namespace, name="web", replicas=2, owner=None):
    meta = {"name": name, "namespace": namespace, "labels": {"app": name, "tier": "a"}}
    if owner:
        meta["ownerReferences"] = [owner]
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}}}


def test_metadata_is_filled_in_and_generation_tracks_spec(kube, namespace):
    created = kube.create(_deployment(namespace))
    meta = created["metadata"]
    assert meta["uid"] and meta["creationTimestamp"] and meta["generation"] == 1
    rv = int(meta["resourceVersion"])
    patched = kube.patch("apps/v1", "deployments", namespace, "web", {"metadata": {"labels": {"x": "y"}}})
    assert patched["metadata"]["generation"] == 1 and int(patched["metadata"]["resourceVersion"]) > rv
    patched = kube.patch("apps/v1", "deployments", namespace, "web", {"spec": {"replicas": 3}})
    assert patched["metadata"]["generation"] == 2
    with pytest.raises(Conflict):
        kube.create(_deployment(namespace))


def test_status_and_scale_subresources(kube, namespace):
    # A bare pod (no owner): nothing but this test touches it.
    kube.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": namespace},
                 "spec": {"containers": [{"name": "c", "image": "i"}]}, "status": {"phase": "Pending"}})
    kube.patch("v1", "pods", namespace, "p", {"status": {"phase": "Running"}})  # main resource: ignored
    assert kube.get("v1", "pods", namespace, "p")["status"]["phase"] == "Pending"
    kube.patch("v1", "pods", namespace, "p", {"spec": {"nodeName": "x"}, "status": {"phase": "Running"}},
               subresource="status")  # status subresource: only status
    pod = kube.get("v1", "pods", namespace, "p")
    assert pod["status"]["phase"] == "Running" and "nodeName" not in pod["spec"]
    kube.create(_deployment(namespace, replicas=1))
    scale = kube.patch("apps/v1", "deployments", namespace, "web", {"spec": {"replicas": 3}}, subresource="scale")
    assert scale["kind"] == "Scale" and scale["spec"]["replicas"] == 3
    assert kube.get("apps/v1", "deployments", namespace, "web")["spec"]["replicas"] == 3
    assert kube.get("apps/v1", "deployments", namespace, "web", subresource="scale")["spec"]["replicas"] == 3


def test_label_selectors_and_list_kinds(kube, namespace):
    kube.create(_deployment(namespace, "a"))
    kube.create(_deployment(namespace, "b"))
    assert [d["metadata"]["name"] for d in kube.list("apps/v1", "deployments", namespace, "app=a")] == ["a"]
    assert len(kube.list("apps/v1", "deployments", namespace, "tier=a")) == 2
    assert kube.list("apps/v1", "deployments", namespace, "app!=a")[0]["metadata"]["name"] == "b"
    raw = kube._call("GET", f"/apis/apps/v1/namespaces/{namespace}/deployments")
    assert raw["kind"] == "DeploymentList" and raw["apiVersion"] == "apps/v1"


def test_pod_simulator_and_garbage_collection(kube, namespace):
    created = kube.create(_deployment(namespace, replicas=2))
    owner = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web", "uid": created["metadata"]["uid"]}
    kube.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owned", "namespace": namespace,
                                                                      "ownerReferences": [owner]}})
    wait_until(lambda: (kube.get("apps/v1", "deployments", namespace, "web").get("status") or {})
               .get("readyReplicas") == 2, message="pods ready")
    assert len(kube.list("v1", "pods", namespace, "app=web")) == 2
    kube.delete("apps/v1", "deployments", namespace, "web")
    wait_until(lambda: kube.get("v1", "configmaps", namespace, "owned") is None, message="dependent collected")
    wait_until(lambda: kube.list("v1", "pods", namespace, "app=web") == [], message="pods collected")


class _ReplicaThatWillNotStop:
    """A pod runtime whose first replica to be stopped hangs until released (as a stuck container would)."""

    def __init__(self) -> None:
        self.release: asyncio.Event | None = None
        self.stopped: list[str] = []
        self.grace: list[float] = []

    async def start(self, pod):
        return f"http://sim/{pod['metadata']['name']}"

    async def ready(self, pod):
        return True

    async def stop(self, pod, grace_seconds=0.0):
        self.stopped.append(pod["metadata"]["name"])
        self.grace.append(grace_seconds)
        if len(self.stopped) == 1:
            self.release = asyncio.Event()
            await self.release.wait()


def test_a_replica_that_will_not_stop_holds_up_no_other_pod():
    # A kubelet stops each container on its own: the pod simulator used to await every replica's
    # stop in its single loop, so one stuck replica froze every Deployment's status (a CI failure).
    runtime = _ReplicaThatWillNotStop()
    with EmulatedCluster(runtime=runtime, pod_startup_seconds=0.1, nodes=[]) as cluster:
        kube = KubeClient.from_kubeconfig(str(cluster.kubeconfig_path))
        kube.create(_deployment("default", "stuck", replicas=2))

        def ready(count):
            status = kube.get("apps/v1", "deployments", "default", "stuck").get("status") or {}
            return status.get("readyReplicas") == count and status.get("replicas") == count

        wait_until(lambda: ready(2), message="2 pods ready")
        kube.patch("apps/v1", "deployments", "default", "stuck", {"spec": {"replicas": 1}})
        wait_until(lambda: runtime.release is not None, message="a replica stopping")
        kube.patch("apps/v1", "deployments", "default", "stuck", {"spec": {"replicas": 3}})
        wait_until(lambda: ready(3), timeout=10, message="scaled back up while a replica hangs in its stop")
        assert len(kube.list("v1", "pods", "default", "app=stuck")) == 3
        cluster.loop.call_soon_threadsafe(runtime.release.set)
    assert len(runtime.stopped) == 4  # the stuck one, then the three left at shutdown
    # A deleted pod gets its termination grace period (Kubernetes' default here); shutdown none.
    assert runtime.grace == [30.0, 0.0, 0.0, 0.0]


def test_namespaces_are_served(kube, namespace):
    assert kube.get("v1", "namespaces", None, namespace)["metadata"]["name"] == namespace
    assert namespace in [n["metadata"]["name"] for n in kube.list("v1", "namespaces")]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_works_against_it(cluster, kube, namespace):
    kube.create(_deployment(namespace))
    out = subprocess.run(["kubectl", "--kubeconfig", str(cluster.kubeconfig_path), "get", "deployments", "-n",
                          namespace, "-o", "name"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "deployment.apps/web"


@pytest.mark.parametrize("method,path,query,expected", [
    ("GET", "/api/v1/namespaces/a/pods", {}, ("list", "", "pods", "a")),
    ("GET", "/api/v1/pods", {"watch": "true"}, ("watch", "", "pods", None)),
    ("GET", "/api/v1/namespaces/a/secrets/key", {}, ("get", "", "secrets", "a")),
    ("PATCH", "/apis/digitalworker.io/v1alpha1/namespaces/a/digitalworkers/w/scale", {},
     ("patch", "digitalworker.io", "digitalworkers/scale", "a")),
    ("PUT", "/apis/apps/v1/namespaces/a/deployments/d", {}, ("update", "apps", "deployments", "a")),
    ("DELETE", "/api/v1/namespaces/a/pods", {}, ("deletecollection", "", "pods", "a")),
    ("GET", "/api/v1/namespaces/a", {}, ("get", "", "namespaces", None)),
    ("PATCH", "/api/v1/namespaces/a/status", {}, ("patch", "", "namespaces/status", None)),
    ("GET", "/apis/apps/v1", {}, None),  # discovery: any authenticated identity
    ("GET", "/version", {}, None),
])
def test_requests_map_to_rbac_attributes_as_the_api_server_maps_them(method, path, query, expected):
    from digital_worker.operator.emulator import request_attributes

    assert request_attributes(method, path, query) == expected


def test_the_operator_identity_gets_only_what_its_cluster_role_grants():
    """The operator connects as its ServiceAccount, and the emulated API applies the ClusterRole
    the stacks install: every end-to-end test that runs the operator checks its RBAC this way."""
    from digital_worker.operator.emulator import EmulatedCluster
    from digital_worker.operator.kube import KubeClient, KubeError

    cluster = EmulatedCluster(pod_simulator=False, nodes=[])
    with pytest.raises(RuntimeError, match=r"RBAC does not grant .*create core/secrets in default"):
        with cluster:
            as_operator = KubeClient.from_kubeconfig(str(cluster.operator_kubeconfig_path))
            as_admin = KubeClient.from_kubeconfig(str(cluster.kubeconfig_path))
            assert as_operator.list("v1", "pods", "default") == []  # granted: list pods
            assert as_operator.get("v1", "secrets", "default", "api-key") is None  # granted: get (none there)
            secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "api-key", "namespace": "default"}}
            with pytest.raises(KubeError, match='cannot create resource "secrets"') as refused:
                as_operator.create(secret)
            assert refused.value.status == 403
            as_admin.create(secret)  # the developer's own identity is a cluster admin
            assert cluster.forbidden == [f"{OPERATOR_USER}: create core/secrets in default"]
