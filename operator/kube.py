"""A thin, raw-JSON client over the real kubernetes client's ApiClient.

Typed models cost a lot of CPU per object and hide fields we do not model; the operator works with
plain dicts, as kopf does. Errors become three kinds the reconcile logic understands.
"""
from __future__ import annotations

import json
import threading
import time
import urllib.parse
from typing import Any


_TIMEOUT = 30.0  # seconds per request
_AUTH_REFRESH_SECONDS = 10.0


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
        self._base: tuple[str, dict[str, str]] = ("", {})
        self._auth_until = 0.0

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
        # Straight to the client's urllib3 pool (its TLS, proxy and auth settings): the generated
        # client's request path re-walks every body to sanitize it and re-parses the URL each time,
        # which was most of a reconcile's CPU. The body is plain JSON already.
        from urllib3.exceptions import HTTPError

        with self._lock:
            self.requests += 1
        base, credentials = self._credentials()
        headers = {**credentials, "Content-Type": content_type, "Accept": "application/json"}
        url = base + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        try:
            response = self.api_client.rest_client.pool_manager.request(
                method, url, body=json.dumps(body).encode() if body is not None else None, headers=headers,
                timeout=_TIMEOUT, preload_content=True)
        except (HTTPError, OSError) as exc:
            raise TransientError(0, str(exc)) from None
        if not 200 <= response.status < 300:
            if response.status == 401 and self._auth_until:  # the token may have expired meanwhile
                self._auth_until = 0.0
                raise TransientError(401, "unauthorized: credentials refreshed, retry")
            raise _error(response.status, response.data)
        return json.loads(response.data) if response.data else None

    def _credentials(self) -> tuple[str, dict[str, str]]:
        """The server URL and the default and auth headers, re-read every few seconds (and after a
        401): the kubeconfig's token refresh hook re-reads the proxy environment each time it runs."""
        now = time.monotonic()
        if now >= self._auth_until:
            configuration = self.api_client.configuration
            headers = dict(self.api_client.default_headers)
            for auth in configuration.auth_settings().values():  # runs the token refresh hook, if any
                if auth.get("in") == "header" and auth.get("value"):
                    headers[auth["key"]] = auth["value"]
            self._base = (configuration.host, headers)
            self._auth_until = now + _AUTH_REFRESH_SECONDS
        return self._base

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
