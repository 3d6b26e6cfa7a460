"""Helpers for the dev-fleet tests: waiting, worker status, and open-loop chat load on a worker's
simulated replicas (the load and the waiting are dwtest_support's, shared with the operator tests)."""
from __future__ import annotations

from digital_worker.operator import schema as api
from digital_worker.operator.kube import KubeClient
from dwtest_support import chat_load as load, sim_endpoints as endpoints, wait_until  # noqa: F401  (re-exported)


def worker_status(kube: KubeClient, namespace: str, name: str) -> dict:
    return (kube.get(api.API_VERSION, api.PLURAL, namespace, name) or {}).get("status") or {}
