"""What the operator reads off a pod: whether it is ready, and where it serves HTTP."""
from __future__ import annotations

from typing import Any, Mapping

from digital_worker.operator import schema as api

# Set by the emulated cluster's pod simulator: the simulated SGLang replica's base URL.
SIM_ENDPOINT_ANNOTATION = f"{api.GROUP}/sim-endpoint"


def is_ready(pod: Mapping[str, Any]) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def sim_endpoint(pod: Mapping[str, Any]) -> str | None:
    endpoint = (pod["metadata"].get("annotations") or {}).get(SIM_ENDPOINT_ANNOTATION)
    return endpoint.rstrip("/") if endpoint else None


def base_url(pod: Mapping[str, Any], default_port: int = 30000) -> str | None:
    """The simulated replica's endpoint in the emulated cluster, else the pod IP and serving port."""
    endpoint = sim_endpoint(pod)
    if endpoint:
        return endpoint
    ip = (pod.get("status") or {}).get("podIP")
    port = (pod["metadata"].get("annotations") or {}).get("prometheus.io/port", str(default_port))
    return f"http://{ip}:{port}" if ip else None


def metrics_url(pod: Mapping[str, Any], default_port: int = 30000) -> str | None:
    url = base_url(pod, default_port)
    return f"{url}/metrics" if url else None
