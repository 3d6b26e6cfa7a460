"""`digital-worker test --scenario full-flow` without `--endpoint`: the whole flow on the embedded default.

Stands up what `digital-worker dev` does (the emulated cluster, the real operator, one simulated
SGLang replica per pod), applies the bundled example (or `-f FILE`), waits for Ready, checks every
replica's health, then runs the endpoint smoke test (runtime/smoke.py) against one replica. The
stand-up steps are checks of the same report, so a flow that breaks early says where.
"""
from __future__ import annotations

import logging
import time
import urllib.request
from typing import Any, Callable

import yaml

from digital_worker.operator import pods as pods_module
from digital_worker.operator import schema as api
from digital_worker.runtime.smoke import CheckResult, SmokeReport, SmokeSettings, run_smoke

STAND_UP_CHECKS = ("cluster", "operator", "deploy", "replicas")
SMOKE_CHECKS = ("health", "model-info", "chat", "chat-stream", "latency", "metrics")


def replica_endpoints(client, namespace: str, name: str) -> list[str]:
    """URLs of the worker's ready simulated replicas (the pod simulator annotates each pod)."""
    urls = []
    for pod in client.list("v1", "pods", namespace, f"{api.LABEL_INSTANCE}={name}"):
        url = pods_module.sim_endpoint(pod)
        if pods_module.is_ready(pod) and url:
            urls.append(url)
    return sorted(urls)


def why_not_ready(client, namespace: str, name: str) -> str:
    """The worker's phase and message, and where its pods are stuck (unscheduled, not ready)."""
    body = client.get(api.API_VERSION, api.PLURAL, namespace, name) or {}
    status = body.get("status") or {}
    pods = client.list("v1", "pods", namespace, f"{api.LABEL_INSTANCE}={name}")
    unscheduled = [p["metadata"]["name"] for p in pods if not (p.get("spec") or {}).get("nodeName")]
    not_ready = [p["metadata"]["name"] for p in pods if not pods_module.is_ready(p)]
    text = f"phase {status.get('phase', 'none yet')}: {status.get('message', 'no status from the operator')}"
    if unscheduled:
        selector = ((body.get("spec") or {}).get("runtime") or {}).get("gpuType")
        text += (f"; {len(unscheduled)} pod(s) not scheduled (no node with free GPUs"
                 + (f" labelled {api.LABEL_GPU_TYPE}={selector}" if selector else "") + ")")
    elif not_ready:
        text += f"; {len(not_ready)} pod(s) not ready"
    return text


def _healthy(url: str, timeout: float) -> str | None:
    """None when /health answers 200, else what went wrong."""
    try:
        with urllib.request.urlopen(url + "/health", timeout=timeout) as response:
            return None if response.status == 200 else f"HTTP {response.status}"
    except Exception as exc:  # any failure is the finding itself
        return f"{type(exc).__name__}: {exc}"


def run_full_flow(*, manifest: str | None = None, model: str | None = None, api_key: str | None = None,
                  requests: int = 5, max_tokens: int = 16, request_timeout: float = 60.0,
                  ready_timeout: float = 60.0,
                  progress: Callable[[CheckResult], None] | None = None) -> SmokeReport:
    from digital_worker.operator.commands import load_manifest
    from digital_worker.operator.dev import apply_worker, bundled_example, wait_for_phase
    from digital_worker.operator.emulator import EmulatedCluster
    from digital_worker.operator.kube import KubeClient
    from digital_worker.operator.runner import OperatorThread
    from digital_worker.operator.simpods import SimulatedSglangPods

    body = load_manifest(manifest) if manifest else yaml.safe_load(bundled_example())
    meta = body["metadata"]
    namespace = meta.setdefault("namespace", "default")
    name = meta["name"]
    checks: list[CheckResult] = []
    context: dict[str, Any] = {"worker": f"{namespace}/{name}", "scenario": "full-flow"}
    clock = time.perf_counter()

    def record(check_name: str, ok: bool, detail: str) -> bool:
        nonlocal clock
        now = time.perf_counter()
        result = CheckResult(check_name, "pass" if ok else "fail", detail, round(now - clock, 4))
        clock = now
        checks.append(result)
        if progress is not None:
            progress(result)
        return ok

    def give_up(endpoint: str) -> SmokeReport:
        done = {check.name for check in checks}
        rest = [n for n in STAND_UP_CHECKS + SMOKE_CHECKS if n not in done]
        skipped = tuple(CheckResult(n, "skip", f"not run: {checks[-1].name} failed") for n in rest)
        return SmokeReport(endpoint, model or body["spec"]["model"]["name"], tuple(checks) + skipped, None, context)

    started = time.perf_counter()
    logging.getLogger("kopf").setLevel(logging.ERROR)  # the report says what matters; kopf's warnings are noise here
    with EmulatedCluster(namespaces=("default", namespace), runtime=SimulatedSglangPods()) as cluster:
        record("cluster", True, f"emulated Kubernetes API at {cluster.url}, CRD installed")
        with OperatorThread(str(cluster.operator_kubeconfig_path), resync_seconds=10, log_level=logging.ERROR):
            record("operator", True, "the real operator (kopf) is running")
            client = KubeClient.from_kubeconfig(str(cluster.kubeconfig_path))
            apply_worker(client, body)
            try:
                final = wait_for_phase(client, namespace, name, {"Ready", "Degraded"}, ready_timeout)
            except TimeoutError:
                record("deploy", False, f"{namespace}/{name} not Ready after {ready_timeout:g}s: "
                                        f"{why_not_ready(client, namespace, name)}")
                return give_up(cluster.url)
            status = final.get("status") or {}
            ready_seconds = time.perf_counter() - started
            context["ready_seconds"] = round(ready_seconds, 3)
            if not record("deploy", status.get("phase") == "Ready",
                          f"{namespace}/{name} is {status.get('phase')} after {ready_seconds:.1f}s: "
                          f"{status.get('message', '')}"):
                return give_up(cluster.url)
            endpoints = replica_endpoints(client, namespace, name)
            unhealthy = {url: problem for url in endpoints if (problem := _healthy(url, request_timeout))}
            if not endpoints or unhealthy:
                record("replicas", False, "no ready replica with an endpoint" if not endpoints else
                       "unhealthy: " + ", ".join(f"{u} ({p})" for u, p in unhealthy.items()))
                return give_up(cluster.url)
            record("replicas", True, f"{len(endpoints)} ready replica(s) answer /health: {', '.join(endpoints)}")
            context["replicas"] = endpoints
            smoke = run_smoke(SmokeSettings(endpoints[0], model=model or body["spec"]["model"]["name"],
                                            api_key=api_key, requests=requests, max_tokens=max_tokens,
                                            timeout=request_timeout), progress=progress)
            context["total_seconds"] = round(time.perf_counter() - started, 3)
            return smoke.with_checks(before=tuple(checks), **context)
