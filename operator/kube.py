"""A thin, raw-JSON client over the real kubernetes client's ApiClient.

Typed models cost a lot of CPU per object and hide fields we do not model; the operator works with
plain dicts, as kopf does. Errors become three kinds the reconcile logic understands.
"""
from __future__ import annotations

import json
import threading
from typing import Any


class KubeError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


class NotFound(KubeError):
    pass


class Conflict(KubeError):
    pass


class TransientError(KubeError):
    """5xx, 429, timeouts and refused connections: retry later with backoff."""


def _error(status: int, raw: Any) -> KubeError:
    message = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw or "")
    try:
        message = json.loads(message).get("message", message)
    except (ValueError, AttributeError):
        pass
    if status == 404:
        return NotFound(404, message)
    if status == 409:
        return Conflict(409, message)
    if status == 429 or status >= 500 or status == 0:
        return TransientError(status, message)
    return KubeError(status, message)


def _path(api_version: str, plural: str, namespace: str | None, name: str | None = None,
          subresource: str | None = None) -> str:
    prefix = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    path = prefix + (f"/namespaces/{namespace}" if namespace else "") + f"/{plural}"
    if name:
        path += f"/{name}"
    if subresource:
        path += f"/{subresource}"
    return path


class KubeClient:
    """Synchronous by design (the kubernetes client is): call it from worker threads."""

    def __init__(self, api_client: Any | None = None) -> None:
        if api_client is None:
            from kubernetes import client

            api_client = client.ApiClient()
        self.api_client = api_client
        self.requests = 0
        self._lock = threading.Lock()

    @classmethod
    def from_kubeconfig(cls, path: str | None = None) -> "KubeClient":
        from kubernetes import client, config

        configuration = client.Configuration()
        try:
            config.load_kube_config(config_file=path, client_configuration=configuration)
        except config.ConfigException:
            config.load_incluster_config(client_configuration=configuration)
        configuration.connection_pool_maxsize = 64
        return cls(client.ApiClient(configuration))

    def _call(self, method: str, path: str, body: Any = None, query: dict[str, str] | None = None,
              content_type: str = "application/json") -> Any:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        with self._lock:
            self.requests += 1
        try:
            method_, url, headers, body_, post = self.api_client.param_serialize(
                method, path, query_params=list((query or {}).items()),
                header_params={"Content-Type": content_type, "Accept": "application/json"},
                body=body, auth_settings=["BearerToken"],
            )
            response = self.api_client.call_api(method_, url, header_params=headers, body=body_,
                                                post_params=post, _request_timeout=30)
            response.read()
        except ApiException as exc:
            raise _error(exc.status, exc.body) from None
        except (HTTPError, OSError) as exc:
            raise TransientError(0, str(exc)) from None
        if not 200 <= response.status < 300:
            raise _error(response.status, response.data)
        return json.loads(response.data) if response.data else None

    def get(self, api_version: str, plural: str, namespace: str | None, name: str,
            subresource: str | None = None) -> dict[str, Any] | None:
        try:
            return self._call("GET", _path(api_version, plural, namespace, name, subresource))
        except NotFound:
            return None

    def list(self, api_version: str, plural: str, namespace: str | None = None,
             label_selector: str | None = None) -> list[dict[str, Any]]:
        query = {"labelSelector": label_selector} if label_selector else None
        return (self._call("GET", _path(api_version, plural, namespace), query=query) or {}).get("items", [])

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        plural = plural_of(obj["kind"])
        return self._call("POST", _path(obj["apiVersion"], plural, meta.get("namespace")), body=obj)

    def patch(self, api_version: str, plural: str, namespace: str | None, name: str, patch: Any,
              subresource: str | None = None) -> dict[str, Any]:
        content_type = "application/json-patch+json" if isinstance(patch, list) else "application/merge-patch+json"
        return self._call("PATCH", _path(api_version, plural, namespace, name, subresource), body=patch,
                          content_type=content_type)

    def delete(self, api_version: str, plural: str, namespace: str | None, name: str) -> None:
        try:
            self._call("DELETE", _path(api_version, plural, namespace, name),
                       body={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"})
        except NotFound:
            pass


_PLURALS = {
    "ConfigMap": "configmaps", "Deployment": "deployments", "Service": "services",
    "PodDisruptionBudget": "poddisruptionbudgets", "Pod": "pods", "Node": "nodes", "Event": "events",
    "Secret": "secrets", "Namespace": "namespaces", "HTTPRoute": "httproutes",
    "DigitalWorker": "digitalworkers", "CustomResourceDefinition": "customresourcedefinitions",
}


def plural_of(kind: str) -> str:
    return _PLURALS.get(kind) or kind.lower() + "s"
