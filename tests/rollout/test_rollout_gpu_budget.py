"""A canary's reconcile passes never make the worker's Deployments ask for more GPUs than the nodes
have, in any API state between two writes (pure: an in-memory API, no emulator, no kopf).

The states are the ones a real cluster passes through: a Deployment the previous pass scaled up
whose new pod the Deployment controller has not created yet, a stable pod already gone for it; and
an abort, where the stable grows back into what the canary gives up."""
from __future__ import annotations

import copy

from digital_worker.operator import reconcile, render, schema as api
from digital_worker.operator.kube import Conflict
from digital_worker.operator.spec import normalize_spec
from dwtest_support import example_worker

NS = "ai"
GPUS_PER_NODE = 4  # two nodes: 8 GPUs, four 2-GPU replicas


class MemoryApi:
    """Just the KubeClient calls a reconcile pass makes, over dicts; after every write it notes the
    GPUs the worker's Deployments ask for (spec.replicas x the pod template's GPUs)."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str | None, str], dict] = {}
        self.asked: list[int] = []

    def add(self, obj: dict) -> None:
        meta = obj["metadata"]
        self.objects[(_plural(obj["kind"]), meta.get("namespace"), meta["name"])] = copy.deepcopy(obj)

    def list(self, api_version, plural, namespace=None, label_selector=None):
        wanted = dict(term.split("=", 1) for term in label_selector.split(",")) if label_selector else {}
        return [copy.deepcopy(obj) for (kind, ns, _), obj in sorted(self.objects.items())
                if kind == plural and (namespace is None or ns == namespace)
                and all((obj["metadata"].get("labels") or {}).get(k) == v for k, v in wanted.items())]

    def get(self, api_version, plural, namespace, name, subresource=None):
        obj = self.objects.get((plural, namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def create(self, obj):
        key = (_plural(obj["kind"]), obj["metadata"].get("namespace"), obj["metadata"]["name"])
        if key in self.objects:
            raise Conflict(409, "exists")
        self.objects[key] = copy.deepcopy(obj)
        self._note()
        return copy.deepcopy(obj)

    def patch(self, api_version, plural, namespace, name, patch, subresource=None):
        obj = self.objects[(plural, namespace, name)]
        _merge(obj, copy.deepcopy(patch))
        self._note()
        return copy.deepcopy(obj)

    def delete(self, api_version, plural, namespace, name):
        self.objects.pop((plural, namespace, name), None)
        self._note()

    def gpus_asked(self) -> int:
        return sum(int(d["spec"]["replicas"]) * int(c["resources"]["limits"]["nvidia.com/gpu"])
                   for d in self.list("apps/v1", "deployments", NS, f"{api.LABEL_INSTANCE}=bot")
                   for c in d["spec"]["template"]["spec"]["containers"])

    def _note(self) -> None:
        self.asked.append(self.gpus_asked())


def _plural(kind: str) -> str:
    from digital_worker.operator.kube import plural_of

    return plural_of(kind)


def _merge(target: dict, patch: dict) -> None:
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = value


def worker(rollout_state: dict, tag: str = "v2") -> tuple[dict, str, str]:
    """The worker mid-rollout from revision `main` to `tag` (maxSurge 1, maxUnavailable 1), with
    the rollout state of a pass that already ran."""
    canary = {"steps": [{"setWeight": 50}, {"pause": {}}], "maxSurge": 1, "maxUnavailable": 1}
    body = example_worker("bot", NS, replicas=4, fallback=None, rollout={"strategy": "Canary", "canary": canary})
    stable_revision = render.revision_hash(normalize_spec(body["spec"])[0])
    body["spec"]["model"]["revision"] = tag
    new_revision = render.revision_hash(normalize_spec(body["spec"])[0])
    body["metadata"].update(uid="u-1", generation=2)
    body["status"] = {"observedGeneration": 1, "stableRevision": stable_revision, "currentRevision": new_revision,
                      "rollout": {"strategy": "Canary", "revision": new_revision, "stableRevision": stable_revision,
                                  "phase": "Progressing", "step": 0, "stepStartedAt": 0.0, "weight": 25.0,
                                  "requestedWeight": 50, **rollout_state}}
    return body, stable_revision, new_revision


def cluster(body: dict, revisions: dict[str, tuple[int, list[str | None]]]) -> MemoryApi:
    """Two 4-GPU nodes; per revision (Deployment replicas, the node of each of its pods: None for
    one not scheduled yet). Pods on a node are ready."""
    kube = MemoryApi()
    kube.add(body)
    for index in (1, 2):
        kube.add({"apiVersion": "v1", "kind": "Node", "metadata": {
            "name": f"gpu-node-{index}", "labels": {"digitalworker.io/gpu-type": "nvidia-h100-80gb"}},
            "spec": {}, "status": {"allocatable": {"nvidia.com/gpu": str(GPUS_PER_NODE)},
                                   "conditions": [{"type": "Ready", "status": "True"}]}})
    spec = normalize_spec(body["spec"])[0]
    for revision, (replicas, nodes) in revisions.items():
        revision_spec = copy.deepcopy(spec)
        if revision == body["status"]["stableRevision"]:
            revision_spec["model"]["revision"] = "main"
        deployment = render.render_deployment(body, revision_spec, revision, replicas)
        ready = sum(1 for node in nodes if node)
        deployment["status"] = {"replicas": len(nodes), "readyReplicas": ready, "availableReplicas": ready}
        kube.add(deployment)
        template = deployment["spec"]["template"]
        for number, node in enumerate(nodes):
            kube.add({"apiVersion": "v1", "kind": "Pod",
                      "metadata": {"name": f"{deployment['metadata']['name']}-{number}", "namespace": NS,
                                   "labels": dict(template["metadata"]["labels"])},
                      "spec": {**copy.deepcopy(template["spec"]), **({"nodeName": node} if node else {})},
                      "status": {"phase": "Running" if node else "Pending"}})
    return kube


def test_a_canary_replica_without_its_pod_yet_keeps_its_gpus():
    """The previous pass shifted one stable replica to the canary (stable 3, canary 1); the stable's
    pod is gone, the canary's not created yet. Those 2 GPUs are the canary's: no third canary
    replica may be planned into them (that asked for 10 of 8 GPUs)."""
    body, stable, new = worker({})
    kube = cluster(body, {stable: (3, ["gpu-node-1", "gpu-node-2", "gpu-node-1"]), new: (1, [])})
    assert kube.gpus_asked() == 8
    reconcile.reconcile(body, kube)
    assert kube.asked and max(kube.asked) <= 8, kube.asked
    deployments = {d["metadata"]["labels"][api.LABEL_REVISION]: d["spec"]["replicas"]
                   for d in kube.list("apps/v1", "deployments", NS)}
    assert deployments[new] >= 1 and deployments[stable] >= 1


def test_a_pending_canary_pod_keeps_its_gpus_too():
    body, stable, new = worker({})
    kube = cluster(body, {stable: (3, ["gpu-node-1", "gpu-node-2", "gpu-node-1"]), new: (1, [None])})
    reconcile.reconcile(body, kube)
    assert kube.asked and max(kube.asked) <= 8, kube.asked


def test_an_abort_scales_the_canary_down_before_the_stable_grows_back():
    body, stable, new = worker({})
    body["metadata"]["annotations"] = {f"{api.GROUP}/abort": "true"}
    kube = cluster(body, {stable: (2, ["gpu-node-1", "gpu-node-2"]), new: (2, ["gpu-node-1", "gpu-node-2"])})
    reconcile.reconcile(body, kube)
    deployments = {d["metadata"]["labels"][api.LABEL_REVISION]: d["spec"]["replicas"]
                   for d in kube.list("apps/v1", "deployments", NS)}
    assert deployments == {stable: 4, new: 0}
    assert max(kube.asked) <= 8, kube.asked


def test_promotion_grows_the_canary_only_into_gpus_there_are():
    """Promoted in full at 50% on full nodes: the canary's growth to 4 beside the stable's 2 would
    ask for 12 GPUs, and its Pending pods would hold the promotion forever. With maxUnavailable 1 a
    stable replica gives way; with 0 the promotion waits, reason InsufficientGPU."""
    body, stable, new = worker({"step": 1, "weight": 50.0})
    body["metadata"]["annotations"] = {f"{api.GROUP}/promote": "full"}
    kube = cluster(body, {stable: (2, ["gpu-node-1", "gpu-node-2"]), new: (2, ["gpu-node-1", "gpu-node-2"])})
    result = reconcile.reconcile(body, kube)
    assert max(kube.asked) <= 8, kube.asked
    deployments = {d["metadata"]["labels"][api.LABEL_REVISION]: d["spec"]["replicas"]
                   for d in kube.list("apps/v1", "deployments", NS)}
    assert deployments == {stable: 1, new: 3}
    assert result.status["rollout"]["phase"] == "Progressing" and "waitingFor" not in result.status["rollout"]

    body, stable, new = worker({"step": 1, "weight": 50.0})
    body["spec"]["rollout"]["canary"]["maxUnavailable"] = 0
    body["metadata"]["annotations"] = {f"{api.GROUP}/promote": "full"}
    kube = cluster(body, {stable: (2, ["gpu-node-1", "gpu-node-2"]), new: (2, ["gpu-node-1", "gpu-node-2"])})
    result = reconcile.reconcile(body, kube)
    assert not kube.asked or max(kube.asked) <= 8, kube.asked
    assert result.status["rollout"]["waitingFor"] == "InsufficientGPU"
    assert {d["spec"]["replicas"] for d in kube.list("apps/v1", "deployments", NS)} == {2}
