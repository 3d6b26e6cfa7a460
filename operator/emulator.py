"""An emulated Kubernetes cluster on loopback, shared by the tests and `digital-worker dev`.

`kmock.KubernetesEmulator` (by kopf's author) serves the real Kubernetes HTTP API from memory. It
merges dicts naively and runs no controllers, so this module adds, in a thin subclass, what the
operator and kubectl rely on and a real API server does: uid/resourceVersion/generation/
creationTimestamp, labelSelector on lists, list kind/apiVersion, status and scale subresource
semantics, PUT, and garbage collection through ownerReferences. A small pod simulator plays the
Deployment controller and kubelet: it creates pods for Deployments, marks them ready (optionally
after starting a simulated SGLang replica per pod through a `PodRuntime`) and sets Deployment status.
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime
import itertools
import json
import logging
import os
import random
import re
import string
import tempfile
import threading
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import aiohttp.web
import attrs
import kmock
import yaml
from kmock._internal import enums, rendering

from digital_worker.operator import schema as api
from digital_worker.operator.pods import SIM_ENDPOINT_ANNOTATION

logger = logging.getLogger(__name__)

VERBS = {"list", "watch", "get", "create", "patch", "update", "delete"}

# group/version/plural → (kind, namespaced, subresources, short names)
BUILTIN_RESOURCES: dict[str, tuple[str, bool, set[str], set[str]]] = {
    # kmock 0.8 cannot parse /api/v1/namespaces[/NAME] (it reads "namespaces" as the namespace
    # prefix), so the emulator serves namespaces under an internal plural and rewrites those paths.
    "v1/" + "x-namespaces": ("Namespace", False, {"status"}, {"ns"}),
    "v1/nodes": ("Node", False, {"status"}, {"no"}),
    "v1/pods": ("Pod", True, {"status"}, {"po"}),
    "v1/services": ("Service", True, {"status"}, {"svc"}),
    "v1/configmaps": ("ConfigMap", True, set(), {"cm"}),
    "v1/secrets": ("Secret", True, set(), set()),
    "v1/events": ("Event", True, set(), {"ev"}),
    "v1/serviceaccounts": ("ServiceAccount", True, set(), {"sa"}),
    "apps/v1/deployments": ("Deployment", True, {"status", "scale"}, {"deploy"}),
    "policy/v1/poddisruptionbudgets": ("PodDisruptionBudget", True, {"status"}, {"pdb"}),
    "coordination.k8s.io/v1/leases": ("Lease", True, set(), set()),
    "events.k8s.io/v1/events": ("Event", True, set(), {"ev"}),
    "apiextensions.k8s.io/v1/customresourcedefinitions": ("CustomResourceDefinition", False, {"status"}, {"crd"}),
    "gateway.networking.k8s.io/v1/httproutes": ("HTTPRoute", True, {"status"}, set()),
    "kopf.dev/v1/clusterkopfpeerings": ("ClusterKopfPeering", False, set(), set()),
    "kopf.dev/v1/kopfpeerings": ("KopfPeering", True, set(), set()),
}
NAMESPACES_PLURAL = "x-namespaces"
_NAMESPACES_PATH = re.compile(r"^/api/v1/namespaces(/[^/]+(?:/status)?)?/?$")
# Where the scale subresource keeps its replica count, per resource plural.
SCALE_PATHS = {"deployments": ("spec", "replicas"), api.PLURAL: ("spec", "replicas")}


def _now() -> str:
    return datetime.datetime.now(tz=datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _selector_matches(selector: str | None, labels: dict[str, str]) -> bool:
    """Equality-based label selectors (`a=b,c!=d,e`), which is what kubectl and we send."""
    if not selector:
        return True
    for term in selector.split(","):
        term = term.strip()
        if not term:
            continue
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


# --- RBAC, as the API server's authorizer applies it to one identity ---------------------------

# The identity the operator's kubeconfig presents (`EmulatedCluster.operator_kubeconfig_path`).
OPERATOR_TOKEN = "digital-worker-operator"
OPERATOR_USER = "system:serviceaccount:digital-worker:digital-worker-operator"

RbacRules = tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...]  # (apiGroup, resources, verbs)

_VERB_BY_METHOD = {"POST": "create", "PUT": "update", "PATCH": "patch"}


def request_attributes(method: str, path: str, query: dict[str, str]) -> tuple[str, str, str, str | None] | None:
    """(verb, apiGroup, resource[/subresource], namespace) of a request, as RBAC sees it; None for
    non-resource URLs (discovery, /version), which every authenticated identity may read."""
    parts = [part for part in path.split("/") if part]
    if parts[:2] == ["api", "v1"]:
        group, rest = "", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 3:
        group, rest = parts[1], parts[3:]
    else:
        return None
    if not rest:
        return None
    namespace = None
    if rest[0] == "namespaces" and len(rest) >= 3 and not (len(rest) == 3 and rest[2] in ("status", "finalize")):
        namespace, rest = rest[1], rest[2:]
    resource, name, subresource = rest[0], (rest[1] if len(rest) > 1 else None), (rest[2] if len(rest) > 2 else None)
    if method == "GET":
        verb = "get" if name else ("watch" if query.get("watch") in ("true", "1") else "list")
    elif method == "DELETE":
        verb = "delete" if name else "deletecollection"
    else:
        verb = _VERB_BY_METHOD.get(method, method.lower())
    return verb, group, f"{resource}/{subresource}" if subresource else resource, namespace


def rbac_allows(rules: RbacRules, verb: str, group: str, resource: str) -> bool:
    return any(group == rule_group and resource in resources and verb in verbs
               for rule_group, resources, verbs in rules)


class _DirectDispatch(kmock.RawHandler):
    """Serve plain Kubernetes verbs without kmock's reaction matching, unless a test added reactions.

    kmock matches every request against every reaction by re-filtering the requests in flight; at a
    thousand objects that matching was most of the emulated API's CPU. Object verbs go straight to
    the emulator's own `_serve_*` methods; watches, discovery and any test-injected reaction (e.g.
    `emulator[lambda r: ...] << 500`) still go through kmock's DSL. It sits in the MRO between
    kmock's KubernetesEmulator (which stores the state first) and RawHandler (the DSL).
    """

    __slots__ = ()

    async def _handle(self, request: rendering.Request):  # type: ignore[override]
        direct = {
            enums.action.LIST: self._serve_list, enums.action.FETCH: self._serve_fetch,
            enums.action.CREATE: self._serve_create, enums.action.UPDATE: self._serve_update,
            enums.action.DELETE: self._serve_delete,
        }.get(request.action)
        if direct is None or request.resource is None or not request.resource.plural \
                or len(self._payloads) > self._builtin_payloads:  # discovery, or a test's own reactions
            return await super()._handle(request)
        try:
            payload = await direct(request)
        except Exception as exc:
            return await self._render_error(exc)
        return aiohttp.web.Response(body=json.dumps(payload).encode(), content_type="application/json")


@attrs.define(kw_only=True)
class ClusterEmulator(kmock.KubernetesEmulator, _DirectDispatch):
    """kmock's emulator plus the API-server behaviour the operator depends on."""

    _counter: Any = attrs.field(factory=lambda: itertools.count(1), init=False)
    # Requests served, by "METHOD plural" (benchmarks report API requests per reconcile from it).
    request_counts: dict[str, int] = attrs.field(factory=dict, init=False)
    # kmock keeps every request and matches each new one by scanning that history (quadratic);
    # the operator needs no history, so only requests still being served are kept.
    keep_request_log: bool = False
    _inflight: set[int] = attrs.field(factory=set, init=False)
    _live_uids: set[str] = attrs.field(factory=set, init=False)
    # resource → {(namespace, name): Object}: kmock scans every object on each get/list (O(N) per call).
    _by_resource: dict[Any, dict[tuple[str | None, str], Any]] = attrs.field(factory=dict, init=False)

    _builtin_payloads: int = attrs.field(default=0, init=False)
    # bearer token -> (user, RBAC rules) for identities the API checks, as a real cluster checks a
    # ServiceAccount; other tokens (the developer's, the tests' clients) are cluster admins.
    authorizations: dict[str, tuple[str, RbacRules]] = attrs.field(factory=dict, init=False)
    # Every request refused by RBAC, as "user: verb group/resource in namespace".
    forbidden: list[str] = attrs.field(factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._builtin_payloads = len(self._payloads)
        for key, (kind, namespaced, subresources, shortnames) in BUILTIN_RESOURCES.items():
            self.resources[key] = kmock.ResourceInfo(kind=kind, namespaced=namespaced, verbs=VERBS,
                                                     subresources=subresources, shortnames=shortnames)
        self.resources[f"{api.GROUP}/{api.VERSION}/{api.PLURAL}"] = kmock.ResourceInfo(
            kind=api.KIND, singular=api.SINGULAR, namespaced=True, verbs=VERBS,
            subresources={"status", "scale"}, shortnames=set(api.SHORT_NAMES), categories={"all", "ai"})

    async def __call__(self, raw_request: aiohttp.web.BaseRequest):  # type: ignore[override]
        refusal = self._authorize(raw_request)
        if refusal is not None:
            return refusal
        match = _NAMESPACES_PATH.match(raw_request.rel_url.path)
        if match:
            path = f"/api/v1/{NAMESPACES_PLURAL}" + (match.group(1) or "")
            raw_request = raw_request.clone(rel_url=raw_request.rel_url.with_path(path))
        return await super().__call__(raw_request)

    def _authorize(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.Response | None:
        """403 Forbidden, worded as the API server words it, when a checked identity lacks the rule."""
        if not self.authorizations:
            return None
        token = raw_request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        identity = self.authorizations.get(token)
        if identity is None:
            return None
        attributes = request_attributes(raw_request.method, raw_request.rel_url.path, dict(raw_request.rel_url.query))
        if attributes is None:
            return None
        user, rules = identity
        verb, group, resource, namespace = attributes
        if rbac_allows(rules, verb, group, resource):
            return None
        scope = f' in the namespace "{namespace}"' if namespace else " at the cluster scope"
        message = f'{resource} is forbidden: User "{user}" cannot {verb} resource "{resource}" ' \
                  f'in API group "{group}"{scope}'
        self.forbidden.append(f"{user}: {verb} {group or 'core'}/{resource}" + (f" in {namespace}" if namespace else ""))
        logger.warning("emulated API refused: %s", message)
        status = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                  "message": message, "reason": "Forbidden", "code": 403}
        return aiohttp.web.Response(status=403, body=json.dumps(status).encode(), content_type="application/json")

    # --- request pre-processing: what the real API server adds or refuses -----------------------

    def _next_version(self) -> str:
        return str(next(self._counter))

    def _current(self, request: rendering.Request) -> dict[str, Any] | None:
        key = (request.resource, request.namespace, request.name)
        if key in self.objects and not self.objects[key].deleted:
            return self.objects[key].raw
        return None

    def _has_status_subresource(self, request: rendering.Request) -> bool:
        info = self.resources[request.resource] if request.resource in self.resources else None
        return bool(info and "status" in info.subresources)

    def _prepare(self, request: rendering.Request) -> rendering.Request:
        if request.resource is None:
            return request
        if request.method == enums.method.PUT and request.name is not None:
            # A replace: kmock answers 404 to PUT, so treat it as a full-object merge (good enough
            # for clients that GET, modify and PUT back, like `kubectl replace` and `kubectl edit`).
            _mutate(request, action=enums.action.UPDATE)
        if request.action == enums.action.CREATE and isinstance(request.data, dict):
            data = dict(request.data)
            meta = dict(data.get("metadata") or {})
            if not meta.get("name") and meta.get("generateName"):
                suffix = "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
                meta["name"] = meta["generateName"] + suffix
            meta.setdefault("namespace", request.namespace) if request.namespace else None
            meta["uid"] = str(uuid.uuid4())
            meta["resourceVersion"] = self._next_version()
            meta["generation"] = 1
            meta["creationTimestamp"] = _now()
            data["metadata"] = meta
            resource = request.resource
            if resource is not None and resource.plural == "customresourcedefinitions" and "status" not in data:
                data["status"] = {"conditions": [{"type": "Established", "status": "True"}]}
            _mutate(request, data=data)
            return request
        if request.action == enums.action.UPDATE and isinstance(request.data, (dict, list)):
            current = self._current(request)
            if current is None:
                return request
            _mutate(request, data=self._update_patch(request, current))
            return request
        return request

    def _update_patch(self, request: rendering.Request, current: dict[str, Any]) -> Any:
        data = request.data
        meta_current = current.get("metadata", {})
        if isinstance(data, list):  # a JSON patch: apply it here to compute the new object
            import jsonpatch

            try:
                new = jsonpatch.apply_patch(current, data, in_place=False)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                # The API server answers 422 when a JSON patch's `test` fails (kopf relies on it).
                raise kmock.KubernetesError(status=422, reason="Invalid", message=str(exc)) from None
            data = _merge_diff(current, new)
        data = dict(data)
        subresource = request.subresource
        if subresource == "scale":
            replicas = (data.get("spec") or {}).get("replicas")
            path = SCALE_PATHS.get(request.resource.plural)
            data = {path[0]: {path[1]: replicas}} if path and replicas is not None else {}
        elif subresource == "status":
            data = {"status": data.get("status")} if "status" in data else {}
        elif self._has_status_subresource(request):
            data.pop("status", None)  # the main resource ignores status changes, as the API server does
        meta_patch = dict(data.get("metadata") or {})
        for immutable in ("uid", "creationTimestamp", "generation", "resourceVersion", "name", "namespace"):
            meta_patch.pop(immutable, None)
        meta_patch["resourceVersion"] = self._next_version()
        if "spec" in data and data["spec"] != current.get("spec"):
            merged = kmock_merge(current.get("spec") or {}, data["spec"] or {})
            if merged != current.get("spec"):
                meta_patch["generation"] = int(meta_current.get("generation", 1)) + 1
        data["metadata"] = meta_patch
        return data

    async def _handle(self, request: rendering.Request):  # type: ignore[override]
        if not self.keep_request_log:
            self._inflight.add(id(request))
            if len(self._requests) > 16:
                self._requests[:] = [r for r in self._requests if id(r) in self._inflight]
            try:
                return await self._handle_tracked(request)
            finally:
                self._inflight.discard(id(request))
        return await self._handle_tracked(request)

    async def _handle_tracked(self, request: rendering.Request):
        request = self._prepare(request)
        if request.resource is not None:
            key = f"{request.method.value if request.method else '?'} {request.resource.plural}" + \
                (f"/{request.subresource}" if request.subresource else "") + \
                (" watch" if request.action == enums.action.WATCH else "")
            self.request_counts[key] = self.request_counts.get(key, 0) + 1
        uid = None
        if request.action in (enums.action.DELETE, enums.action.UPDATE) and request.name is not None:
            # A DELETE, or a PATCH removing the last finalizer, may end the object: its dependents follow.
            uid = (self._current(request) or {}).get("metadata", {}).get("uid")
        response = await super()._handle(request)
        if request.action == enums.action.CREATE and isinstance(request.data, dict):
            # Stored even when a test's reaction answered an error (kmock applies state first).
            meta = request.data.get("metadata", {})
            self._live_uids.add(meta.get("uid"))
            owners = [ref.get("uid") for ref in meta.get("ownerReferences") or []]
            if owners and not any(owner in self._live_uids for owner in owners):
                # Like the real garbage collector: a dependent whose owners are all gone goes too.
                resource = request.resource
                asyncio.get_running_loop().call_later(0.05, lambda: asyncio.ensure_future(self._delete_path(
                    _object_path(resource, meta.get("namespace"), meta.get("name")))))
        if request.action == enums.action.CREATE and isinstance(request.data, dict):
            meta = request.data.get("metadata", {})
            self._index(request.resource, meta.get("namespace"), meta.get("name"))
        if request.resource is not None and request.name is not None:
            key = (request.resource, request.namespace, request.name)
            self._index(request.resource, request.namespace, request.name)
            if key in self.objects:
                obj = self.objects[key]
                if obj.deleted:
                    del self.objects[key]  # keep memory flat: kmock keeps every version otherwise
                    self._live_uids.discard(uid)
                    if uid:
                        await self._collect_garbage(uid)
                elif len(obj.history) > 1:
                    obj.history = [obj.last.raw]
        return response

    def _index(self, resource: Any, namespace: str | None, name: str | None) -> None:
        """Bring the index entry for one object in line with the store."""
        objects = self.objects._objects  # the ObjectsArray's own dict: O(1) by key
        bucket = self._by_resource.setdefault(resource, {})
        obj = objects.get((resource, namespace, name))
        if obj is None or obj.deleted:
            bucket.pop((namespace, name), None)
        else:
            bucket[(namespace, name)] = obj

    def _lookup(self, request: rendering.Request, *, namespace: str | None = None, name: str | None = None) -> Any:
        key = (request.resource, namespace if namespace is not None else request.namespace,
               name if name is not None else request.name)
        return self.objects._objects.get(key)

    def _known(self, resource: Any) -> bool:
        return resource in self.resources or resource in self._by_resource

    async def _collect_garbage(self, owner_uid: str) -> None:
        """Background cascading deletion: dependents of a deleted owner go too (kube-controller-manager's GC)."""
        dependents = [
            key for key, obj in list(self.objects.items())
            if not obj.deleted and any(ref.get("uid") == owner_uid
                                       for ref in obj.raw.get("metadata", {}).get("ownerReferences", []) or [])
        ]
        for resource, namespace, name in dependents:
            await self._delete_path(_object_path(resource, namespace, name))

    async def _delete_path(self, path: str) -> None:
        with contextlib.suppress(Exception):
            async with self.servers[0].client.delete(path) as response:
                await response.read()

    # --- serving: list with selectors and kinds, scale subresource ------------------------------

    async def _serve_list(self, request: rendering.Request):  # type: ignore[override]
        if not self._known(request.resource):
            raise kmock.KubernetesResourceNotFoundError()
        selector = request.params.get("labelSelector")
        field_selector = request.params.get("fieldSelector")
        namespace = request.namespace
        items = [obj.raw for (ns, _), obj in self._by_resource.get(request.resource, {}).items()
                 if (namespace is None or ns == namespace) and not obj.deleted]
        items = [item for item in items if _selector_matches(selector, item.get("metadata", {}).get("labels") or {})]
        if field_selector:
            items = [item for item in items if _field_selector_matches(field_selector, item)]
        info = self.resources[request.resource] if request.resource in self.resources else None
        kind = (info.kind if info and info.kind else "") + "List"
        api_version = request.resource.version if not request.resource.group else \
            f"{request.resource.group}/{request.resource.version}"
        return {"kind": kind, "apiVersion": api_version,
                "metadata": {"resourceVersion": str(next(self._counter))}, "items": items}

    async def _serve_version(self, request: rendering.Request):  # type: ignore[override]
        result = await super()._serve_version(request)
        if request.resource is not None and not request.resource.group:
            result["groupVersion"] = request.resource.version  # core is "v1", not "/v1"
        for item in result.get("resources", []):  # subresources carry no short names of their own
            item["name"] = item["name"].replace(NAMESPACES_PLURAL, "namespaces")
            if "/" in item["name"]:
                item["shortNames"] = []
                item["categories"] = []
        return result

    async def _serve_fetch(self, request: rendering.Request):  # type: ignore[override]
        found = self._lookup(request)
        if found is None or found.deleted:
            raise kmock.KubernetesObjectNotFoundError()
        obj = found.raw
        if request.subresource == "scale":
            return _scale_object(request.resource.plural, obj)
        return obj

    async def _serve_create(self, request: rendering.Request):  # type: ignore[override]
        meta = (request.data or {}).get("metadata", {})
        found = self._lookup(request, namespace=request.namespace or meta.get("namespace"), name=meta.get("name"))
        return found.raw

    async def _serve_delete(self, request: rendering.Request):  # type: ignore[override]
        return self._lookup(request).last.raw

    async def _serve_update(self, request: rendering.Request):  # type: ignore[override]
        obj = self._lookup(request).last.raw
        if request.subresource == "scale":
            return _scale_object(request.resource.plural, obj)
        return obj


def _merge_diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """A merge patch turning `old` into `new` (None removes a key), to apply JSON patches as merges."""
    diff: dict[str, Any] = {}
    for key in set(old) | set(new):
        if key not in new:
            diff[key] = None
        elif isinstance(old.get(key), dict) and isinstance(new[key], dict):
            nested = _merge_diff(old[key], new[key])
            if nested:
                diff[key] = nested
        elif old.get(key) != new[key] or key not in old:
            diff[key] = new[key]
    return diff


def _mutate(request: rendering.Request, **changes: Any) -> None:
    """Change a request in place: kmock tracks requests by identity, so a copy would match no reaction."""
    for name, value in changes.items():
        object.__setattr__(request, name, value)


def kmock_merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    from kmock._internal.dicts import merge_patch_dict

    return dict(merge_patch_dict(base, patch))


def _field_selector_matches(selector: str, item: dict[str, Any]) -> bool:
    for term in selector.split(","):
        if "=" not in term:
            continue
        path, value = term.replace("==", "=").split("=", 1)
        node: Any = item
        for part in path.strip().split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if str(node if node is not None else "") != value.strip():
            return False
    return True


def _scale_object(plural: str, obj: dict[str, Any]) -> dict[str, Any]:
    meta = obj.get("metadata", {})
    status = obj.get("status") or {}
    return {
        "apiVersion": "autoscaling/v1", "kind": "Scale",
        "metadata": {"name": meta.get("name"), "namespace": meta.get("namespace"),
                     "resourceVersion": meta.get("resourceVersion"), "uid": meta.get("uid")},
        "spec": {"replicas": (obj.get("spec") or {}).get("replicas", 0)},
        "status": {"replicas": status.get("replicas", 0),
                   "selector": status.get("selector") or ",".join(
                       f"{k}={v}" for k, v in ((obj.get("spec") or {}).get("selector") or {})
                       .get("matchLabels", {}).items())},
    }


def _object_path(resource: Any, namespace: str | None, name: str) -> str:
    prefix = f"/api/{resource.version}" if not resource.group else f"/apis/{resource.group}/{resource.version}"
    if namespace:
        return f"{prefix}/namespaces/{namespace}/{resource.plural}/{name}"
    return f"{prefix}/{resource.plural}/{name}"


# --- the pod simulator: Deployment controller + kubelet, just enough ------------------------------

class PodRuntime(Protocol):
    """What runs "inside" a simulated pod (e.g. a simulated SGLang server)."""

    async def start(self, pod: dict[str, Any]) -> str | None:
        """Start the pod's workload; return its base URL (or None if there is nothing to reach)."""

    async def ready(self, pod: dict[str, Any]) -> bool:
        """Whether the readiness probe would pass now."""

    async def stop(self, pod: dict[str, Any], grace_seconds: float = 0.0) -> None:
        """Stop the pod's workload: SIGTERM, then SIGKILL once `grace_seconds` have passed."""


class NullRuntime:
    """Pods with nothing inside: ready after the simulator's startup delay."""

    async def start(self, pod: dict[str, Any]) -> str | None:
        return None

    async def ready(self, pod: dict[str, Any]) -> bool:
        return True

    async def stop(self, pod: dict[str, Any], grace_seconds: float = 0.0) -> None:
        return None


@attrs.define
class SimulatedNode:
    name: str
    gpus: int = 8
    gpu_type: str = "nvidia-h100-80gb"


def _grace_seconds(pod: dict[str, Any]) -> float:
    """The pod's termination grace period (Kubernetes' default: 30 s)."""
    return float((pod.get("spec") or {}).get("terminationGracePeriodSeconds", 30))


def _gpus(pod_spec: dict[str, Any]) -> int:
    return sum(int(str(((c.get("resources") or {}).get("limits") or {}).get("nvidia.com/gpu", 0)) or 0)
               for c in pod_spec.get("containers") or [])


class _Scheduler:
    """Just enough of kube-scheduler for GPU pods: a node whose labels match the pod's nodeSelector,
    whose NoSchedule/NoExecute taints the pod tolerates, with free `nvidia.com/gpu` for it (the most
    free first); None leaves the pod Pending. Without any node, everything lands on "sim-node"."""

    def __init__(self, nodes: list[dict[str, Any]], pods: list[dict[str, Any]]) -> None:
        self.nodes = nodes
        self.free = {n["metadata"]["name"]: int(str(((n.get("status") or {}).get("allocatable") or {})
                                                    .get("nvidia.com/gpu", 0))) for n in nodes}
        for pod in pods:
            node = (pod.get("spec") or {}).get("nodeName")
            if node in self.free and not pod["metadata"].get("deletionTimestamp"):
                self.free[node] -= _gpus(pod.get("spec") or {})

    def release(self, pod: dict[str, Any]) -> None:
        node = (pod.get("spec") or {}).get("nodeName")
        if node in self.free:
            self.free[node] += _gpus(pod.get("spec") or {})

    def place(self, pod_spec: dict[str, Any]) -> str | None:
        if not self.nodes:
            return "sim-node"
        wanted, selector = _gpus(pod_spec), pod_spec.get("nodeSelector") or {}
        tolerations = pod_spec.get("tolerations") or []
        candidates = [n for n in self.nodes
                      if all((n["metadata"].get("labels") or {}).get(k) == v for k, v in selector.items())
                      and all(self._tolerated(t, tolerations) for t in (n.get("spec") or {}).get("taints") or []
                              if t.get("effect") in ("NoSchedule", "NoExecute"))
                      and self.free[n["metadata"]["name"]] >= wanted]
        if not candidates:
            return None
        name = max(candidates, key=lambda n: self.free[n["metadata"]["name"]])["metadata"]["name"]
        self.free[name] -= wanted
        return name

    @staticmethod
    def _tolerated(taint: dict[str, Any], tolerations: list[dict[str, Any]]) -> bool:
        return any(t.get("key") in (None, taint.get("key")) and (
            t.get("operator") == "Exists" or t.get("value") == taint.get("value"))
            and t.get("effect") in (None, "", taint.get("effect")) for t in tolerations)


class PodSimulator:
    """Turns Deployments into pods and pods into Ready, like the Deployment controller and kubelet."""

    def __init__(self, emulator: ClusterEmulator, session: aiohttp.ClientSession, *,
                 runtime: PodRuntime | None = None, startup_seconds: float = 0.5,
                 interval: float = 0.25) -> None:
        self.emulator = emulator
        self.session = session
        self.runtime = runtime or NullRuntime()
        self.startup_seconds = startup_seconds
        self.interval = interval
        self._started_at: dict[str, float] = {}
        self._endpoints: dict[str, str | None] = {}
        self._terminating: set[asyncio.Task] = set()  # replicas shutting down after their pod was deleted

    def _objects(self, plural: str) -> list[dict[str, Any]]:
        return [obj.raw for resource, bucket in list(self.emulator._by_resource.items()) if resource.plural == plural
                for obj in list(bucket.values()) if not obj.deleted]

    async def _request(self, method: str, path: str, body: Any = None, content_type: str = "application/merge-patch+json") -> None:
        headers = {"Content-Type": content_type} if body is not None else {}
        async with self.session.request(method, path, json=body, headers=headers) as response:
            await response.read()
            if response.status >= 400 and response.status != 404:
                logger.debug("pod simulator: %s %s -> %s", method, path, response.status)

    async def run(self) -> None:
        while True:
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception:  # the simulator must outlive any one bad object
                logger.exception("pod simulator step failed")
            await asyncio.sleep(self.interval)

    async def step(self) -> None:
        loop = asyncio.get_running_loop()
        deployments = self._objects("deployments")
        pods = self._objects("pods")
        pods_by_owner: dict[str, list[dict[str, Any]]] = {}
        for pod in pods:
            for ref in pod["metadata"].get("ownerReferences") or []:
                pods_by_owner.setdefault(ref.get("uid"), []).append(pod)
        scheduler = _Scheduler(self._objects("nodes"), pods)
        live_uids = {d["metadata"].get("uid") for d in deployments}
        for pod in pods:  # pods whose Deployment is gone (GC missed or raced)
            owners = [ref.get("uid") for ref in pod["metadata"].get("ownerReferences") or []]
            if owners and not any(uid in live_uids for uid in owners):
                await self._delete_pod(pod)
        for deployment in deployments:
            meta = deployment["metadata"]
            spec = deployment.get("spec") or {}
            desired = int(spec.get("replicas", 1) or 0)
            owned = sorted(pods_by_owner.get(meta.get("uid"), []),
                           key=lambda p: p["metadata"].get("creationTimestamp", ""))
            owned = [p for p in owned if not p["metadata"].get("deletionTimestamp")]
            for pod in owned[desired:][::-1]:
                await self._delete_pod(pod)
                scheduler.release(pod)
            for _ in range(len(owned), desired):
                template_spec = ((spec.get("template") or {}).get("spec")) or {}
                await self._create_pod(deployment, scheduler.place(template_spec))
            ready = 0
            for pod in owned[:desired]:
                if not (pod.get("spec") or {}).get("nodeName"):  # Pending: bind it once a node has room
                    node = scheduler.place(pod.get("spec") or {})
                    if node is not None:
                        await self._request("PATCH", f"/api/v1/namespaces/{meta['namespace']}/pods/"
                                                     f"{pod['metadata']['name']}", {"spec": {"nodeName": node}})
                    continue
                ready += await self._update_pod(pod, loop.time())
            current = min(len(owned), desired) if owned else 0
            status = {
                "observedGeneration": meta.get("generation", 1),
                "replicas": current, "updatedReplicas": current,
                "readyReplicas": ready, "availableReplicas": ready,
                "unavailableReplicas": max(desired - ready, 0),
                "conditions": [{"type": "Available", "status": "True" if ready >= desired else "False",
                                "reason": "MinimumReplicasAvailable" if ready >= desired else
                                "MinimumReplicasUnavailable"}],
            }
            old = deployment.get("status") or {}
            if any(old.get(k) != v for k, v in status.items() if k != "conditions") or \
                    (old.get("conditions") or [{}])[0].get("status") != status["conditions"][0]["status"]:
                await self._request("PATCH", f"/apis/apps/v1/namespaces/{meta['namespace']}/deployments/"
                                             f"{meta['name']}/status", {"status": status})

    async def _create_pod(self, deployment: dict[str, Any], node: str | None) -> None:
        meta = deployment["metadata"]
        template = (deployment.get("spec") or {}).get("template") or {}
        suffix = "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
        pod = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": f"{meta['name']}-{suffix}", "namespace": meta["namespace"],
                "labels": dict((template.get("metadata") or {}).get("labels") or {}),
                "annotations": dict((template.get("metadata") or {}).get("annotations") or {}),
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": meta["name"],
                                     "uid": meta.get("uid"), "controller": True}],
            },
            "spec": {**(template.get("spec") or {}), **({"nodeName": node} if node else {})},
            "status": {"phase": "Pending", "conditions": [{"type": "Ready", "status": "False"}]},
        }
        await self._request("POST", f"/api/v1/namespaces/{meta['namespace']}/pods", pod, "application/json")

    async def _delete_pod(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        key = f"{meta['namespace']}/{meta['name']}"
        self._started_at.pop(key, None)
        self._terminate(pod, _grace_seconds(pod))
        await self._request("DELETE", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}")

    def _terminate(self, pod: dict[str, Any], grace_seconds: float = 0.0) -> None:
        """Stop the pod's replica if this simulator started one."""
        key = f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"
        if key not in self._endpoints:
            return
        del self._endpoints[key]
        # As each kubelet does, in the background: one replica draining its requests (or, by a bug,
        # never stopping) must not hold up the rest of the cluster's pods and Deployment status.
        task = asyncio.create_task(self.runtime.stop(pod, grace_seconds))
        self._terminating.add(task)
        task.add_done_callback(self._terminated)

    def _terminated(self, task: asyncio.Task) -> None:
        self._terminating.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("pod simulator: a replica failed to stop", exc_info=task.exception())

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Stop every replica still running or terminating, without a grace period (the cluster is going away)."""
        for pod in self._objects("pods"):
            self._terminate(pod)
        if self._terminating:
            _, stuck = await asyncio.wait(set(self._terminating), timeout=timeout)
            for task in stuck:
                logger.error("pod simulator: a replica did not stop within %.0f s", timeout)
                task.cancel()

    async def _update_pod(self, pod: dict[str, Any], now: float) -> int:
        """Advance one pod's lifecycle; return 1 when it is ready."""
        meta = pod["metadata"]
        key = f"{meta['namespace']}/{meta['name']}"
        if key not in self._started_at:
            self._started_at[key] = now
            self._endpoints[key] = await self.runtime.start(pod)
        started = now - self._started_at[key] >= self.startup_seconds
        ready = started and await self.runtime.ready(pod)
        status = pod.get("status") or {}
        was_ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions", []))
        endpoint = self._endpoints.get(key)
        if ready != was_ready or status.get("phase") != "Running":
            patch: dict[str, Any] = {"status": {
                "phase": "Running", "podIP": "127.0.0.1", "hostIP": "127.0.0.1",
                "conditions": [{"type": "Ready", "status": "True" if ready else "False",
                                "lastTransitionTime": _now()}],
            }}
            if endpoint:
                patch["metadata"] = {"annotations": {SIM_ENDPOINT_ANNOTATION: endpoint}}
                await self._request("PATCH", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                                    {"metadata": patch.pop("metadata")})
            await self._request("PATCH", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/status", patch)
        return int(ready)


# --- the whole emulated cluster, on a thread of its own ------------------------------------------

class EmulatedCluster:
    """kmock over HTTP on loopback, a kubeconfig for it, simulated GPU nodes and the pod simulator.

    It runs on its own thread and event loop, so that synchronous clients (kubectl, the kubernetes
    client) and the operator's own loop can use it freely. Use as a context manager.
    """

    def __init__(self, *, kubeconfig: str | os.PathLike[str] | None = None, nodes: list[SimulatedNode] | None = None,
                 runtime: PodRuntime | None = None, pod_startup_seconds: float = 0.5,
                 pod_simulator: bool = True, namespaces: tuple[str, ...] = ("default",),
                 install_crd: bool = True, port: int | None = None,
                 operator_rbac: RbacRules | None = None, fail_on_forbidden: bool = True) -> None:
        self._kubeconfig_arg = kubeconfig
        # The operator connects with `operator_kubeconfig_path`, as its ServiceAccount, and the API
        # refuses what these rules (default: the ClusterRole the stacks install) do not grant.
        if operator_rbac is None:
            from digital_worker.operator.deploy import OPERATOR_RBAC_RULES

            operator_rbac = OPERATOR_RBAC_RULES
        self.operator_rbac = operator_rbac
        # Leaving the `with` block with refused requests on record raises: the operator would have
        # failed the same way on a real cluster. `digital-worker dev` reports them instead.
        self.fail_on_forbidden = fail_on_forbidden
        self.operator_kubeconfig_path: Path | None = None
        self.nodes = nodes if nodes is not None else [SimulatedNode(f"gpu-node-{i}") for i in range(1, 5)]
        self.runtime = runtime
        self.pod_startup_seconds = pod_startup_seconds
        self.pod_simulator_enabled = pod_simulator
        self.namespaces = namespaces
        self.install_crd = install_crd
        self.port = port
        self.emulator: ClusterEmulator | None = None
        self.url = ""
        self.kubeconfig_path: Path | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.pod_simulator: PodSimulator | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> "EmulatedCluster":
        self.start()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.stop()
        if self.fail_on_forbidden and exc_type is None and self.forbidden:
            raise RuntimeError("the emulated API refused the operator requests its RBAC does not grant "
                               "(operator/deploy.py OPERATOR_RBAC_RULES): " + "; ".join(self.forbidden))

    @property
    def forbidden(self) -> list[str]:
        """The distinct requests refused by RBAC so far, sorted (see `ClusterEmulator.forbidden`)."""
        return sorted(set(self.emulator.forbidden)) if self.emulator is not None else []

    def start(self) -> None:
        self._thread = threading.Thread(target=self._thread_main, name="emulated-cluster", daemon=True)
        self._thread.start()
        if not self._ready.wait(30) or self._error is not None:
            raise RuntimeError(f"emulated cluster failed to start: {self._error}")

    def stop(self) -> None:
        if self.loop is not None and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(30)
        if self._tmpdir is not None:
            self._tmpdir.cleanup()

    def call(self, fn: Callable[[], Awaitable[Any]], timeout: float = 30) -> Any:
        """Run a coroutine on the cluster's loop from another thread (tests use it to inspect or fault)."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(fn(), self.loop).result(timeout)

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # surfaced to start() or logged
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        emulator = ClusterEmulator()
        emulator.authorizations[OPERATOR_TOKEN] = (OPERATOR_USER, tuple(self.operator_rbac))
        self.emulator = emulator
        async with emulator, kmock.Server(emulator, port=self.port) as server:
            self.url = str(server.url).rstrip("/")
            self._write_kubeconfig()
            await self._seed(server.client)
            tasks = []
            if hasattr(self.runtime, "bind"):
                self.runtime.bind(emulator)  # runtimes that read the cluster (e.g. the pods' ConfigMaps)
            if self.pod_simulator_enabled:
                self.pod_simulator = PodSimulator(emulator, server.client, runtime=self.runtime,
                                                  startup_seconds=self.pod_startup_seconds)
                tasks.append(asyncio.create_task(self.pod_simulator.run()))
            self._ready.set()
            await self._stop.wait()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            # kmock re-raises every error it answered when its context exits; they were already
            # answered as HTTP errors (e.g. kubectl's protobuf requests), so log and drop them.
            for error in emulator.errors:
                logger.debug("emulated API answered an error: %r", error)
            if emulator._errors:
                emulator._errors[-1].clear()
            if self.pod_simulator is not None:
                await self.pod_simulator.shutdown()

    async def _seed(self, client: aiohttp.ClientSession) -> None:
        async def post(path: str, body: dict[str, Any]) -> None:
            async with client.post(path, json=body) as response:
                await response.read()

        for namespace in self.namespaces:
            await post("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
        for node in self.nodes:
            await post("/api/v1/nodes", {
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": node.name, "labels": {
                    "kubernetes.io/hostname": node.name, api.LABEL_GPU_TYPE: node.gpu_type,
                    "nvidia.com/gpu.product": node.gpu_type.upper()}},
                "spec": {},
                "status": {"capacity": {"nvidia.com/gpu": str(node.gpus), "cpu": "96", "memory": "1Ti"},
                           "allocatable": {"nvidia.com/gpu": str(node.gpus), "cpu": "94", "memory": "1000Gi"},
                           "conditions": [{"type": "Ready", "status": "True"}]},
            })
        if self.install_crd:
            await post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", api.crd_manifest())

    def _write_kubeconfig(self) -> None:
        if self._kubeconfig_arg is None:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="dw-cluster-")
            self.kubeconfig_path = Path(self._tmpdir.name) / "kubeconfig"
        else:
            self.kubeconfig_path = Path(self._kubeconfig_arg)
            self.kubeconfig_path.parent.mkdir(parents=True, exist_ok=True)
        self.kubeconfig_path.write_text(yaml.safe_dump(self._kubeconfig("developer", "emulated-cluster")))
        self.operator_kubeconfig_path = self.kubeconfig_path.with_name(self.kubeconfig_path.name + ".operator")
        self.operator_kubeconfig_path.write_text(yaml.safe_dump(self._kubeconfig(OPERATOR_USER, OPERATOR_TOKEN)))

    def _kubeconfig(self, user: str, token: str) -> dict[str, Any]:
        return {
            "apiVersion": "v1", "kind": "Config", "current-context": "digital-worker-dev",
            "clusters": [{"name": "digital-worker-dev", "cluster": {"server": self.url}}],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": "digital-worker-dev",
                          "context": {"cluster": "digital-worker-dev", "user": user, "namespace": "default"}}],
        }
