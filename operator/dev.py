"""`digital-worker dev`: the embedded default. Emulated cluster + the real operator + a DigitalWorker."""
from __future__ import annotations

import logging
import secrets
import signal
import threading
import time
from importlib import resources
from pathlib import Path
from typing import Any

from digital_worker.operator import schema as api
from digital_worker.operator.kube import Conflict, KubeClient


def bundled_example() -> str:
    return resources.files("digital_worker").joinpath("examples/digitalworker.yaml").read_text()


def ensure_namespace(client: KubeClient, namespace: str) -> None:
    if client.get("v1", "namespaces", None, namespace) is None:
        try:
            client.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
        except Conflict:
            pass


def apply_worker(client: KubeClient, body: dict[str, Any]) -> dict[str, Any]:
    """Create the DigitalWorker (and the API-key Secret it names, with a random key, if missing)."""
    meta = body["metadata"]
    ensure_namespace(client, meta["namespace"])
    ref = body.get("spec", {}).get("runtime", {}).get("apiKeySecretRef")
    if ref and client.get("v1", "secrets", meta["namespace"], ref["name"]) is None:
        client.create({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                       "metadata": {"name": ref["name"], "namespace": meta["namespace"]},
                       "stringData": {ref["key"]: secrets.token_urlsafe(24)}})
    try:
        return client.create(body)
    except Conflict:
        return client.patch(api.API_VERSION, api.PLURAL, meta["namespace"], meta["name"], {"spec": body["spec"]})


def wait_for_phase(client: KubeClient, namespace: str, name: str, phases: set[str], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        body = client.get(api.API_VERSION, api.PLURAL, namespace, name) or {}
        if (body.get("status") or {}).get("phase") in phases:
            return body
        time.sleep(0.2)
    raise TimeoutError(f"{namespace}/{name} did not reach {sorted(phases)} in {timeout}s: {body.get('status')}")


def summary_tables(client: KubeClient, namespace: str | None = None):
    """Rich tables of DigitalWorkers and their children: what `dev` shows (and `status` will)."""
    from rich.table import Table

    workers = Table(title="DigitalWorkers")
    for column in ("Namespace", "Name", "Model", "Phase", "Ready", "Desired", "Revision", "Message"):
        workers.add_column(column)
    children = Table(title="Children")
    for column in ("Kind", "Name", "Replicas", "Ready"):
        children.add_column(column)
    for body in client.list(api.API_VERSION, api.PLURAL, namespace):
        status = body.get("status") or {}
        meta = body["metadata"]
        workers.add_row(meta["namespace"], meta["name"], body["spec"]["model"]["name"], status.get("phase", "-"),
                        str(status.get("readyReplicas", 0)), str(status.get("desiredReplicas", "-")),
                        status.get("currentRevision", "-"), status.get("message", ""))
        selector = f"{api.LABEL_INSTANCE}={meta['name']}"
        for api_version, plural in (("apps/v1", "deployments"), ("v1", "services"), ("v1", "configmaps"),
                                    ("policy/v1", "poddisruptionbudgets"), ("v1", "pods")):
            for child in client.list(api_version, plural, meta["namespace"], selector):
                child_status = child.get("status") or {}
                replicas = (child.get("spec") or {}).get("replicas", "")
                ready = child_status.get("readyReplicas", "")
                if plural == "pods":
                    ready = next((c.get("status") for c in child_status.get("conditions", [])
                                  if c.get("type") == "Ready"), "")
                children.add_row(child["kind"] if "kind" in child else plural, child["metadata"]["name"],
                                 str(replicas), str(ready))
    return workers, children


def run_dev(*, manifest: str | None, kubeconfig_out: str, duration: float | None, timeout: float) -> int:
    import yaml
    from rich.console import Console

    from digital_worker.operator.commands import load_manifest
    from digital_worker.operator.emulator import EmulatedCluster
    from digital_worker.operator.runner import OperatorThread

    console = Console(width=None if Console().is_terminal else 132)
    body = load_manifest(manifest) if manifest else yaml.safe_load(bundled_example())
    namespace = body["metadata"].setdefault("namespace", "default")
    logging.basicConfig(level=logging.WARNING)
    from digital_worker.operator.simpods import SimulatedSglangPods

    # Each pod the pod simulator starts runs a simulated SGLang replica built from its revision's ConfigMap.
    with EmulatedCluster(kubeconfig=Path(kubeconfig_out).resolve(), namespaces=("default", namespace),
                         runtime=SimulatedSglangPods()) as cluster:
        console.print(f"[bold]Emulated Kubernetes API[/] at {cluster.url}")
        console.print(f"kubeconfig: [cyan]{cluster.kubeconfig_path}[/]  (try: kubectl --kubeconfig "
                      f"{cluster.kubeconfig_path} get dw -A)")
        with OperatorThread(str(cluster.kubeconfig_path), resync_seconds=10):
            console.print("[bold]Operator[/] running (kopf, real handlers)")
            client = KubeClient.from_kubeconfig(str(cluster.kubeconfig_path))
            apply_worker(client, body)
            console.print(f"applied DigitalWorker {namespace}/{body['metadata']['name']}")
            final = wait_for_phase(client, namespace, body["metadata"]["name"], {"Ready", "Degraded"}, timeout)
            for table in summary_tables(client, namespace):
                console.print(table)
            phase = final["status"]["phase"]
            console.print(f"DigitalWorker {body['metadata']['name']} is [bold]{phase}[/]: {final['status']['message']}")
            endpoints = [pod["metadata"].get("annotations", {}).get(f"{api.GROUP}/sim-endpoint")
                         for pod in client.list("v1", "pods", namespace, f"{api.LABEL_INSTANCE}={body['metadata']['name']}")]
            endpoints = [e for e in endpoints if e]
            if endpoints:
                model = body["spec"]["model"]["name"]
                console.print(f"Simulated SGLang replicas: {', '.join(endpoints)}")
                console.print(f"  try: curl -s {endpoints[0]}/v1/chat/completions -H 'Content-Type: application/json' "
                              f"-d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"hi\"}}]}}'")
            stop = threading.Event()
            if duration is None:
                console.print("Serving until Ctrl-C.")
                signal.signal(signal.SIGTERM, lambda *_: stop.set())
                try:
                    while not stop.wait(1):
                        pass
                except KeyboardInterrupt:
                    pass
            else:
                stop.wait(duration)
            return 0 if phase == "Ready" else 1
