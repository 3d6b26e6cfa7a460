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

from digital_worker.operator import pods, schema as api
from digital_worker.operator.kube import Conflict, KubeClient


DEFAULT_REPORT_DIR = ".digital-worker/report"


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


def run_dev(*, manifest: str | None, kubeconfig_out: str, duration: float | None, timeout: float,
            tour: bool = False, scenario: str = "tour", headless: bool = False, speed: float = 1.0,
            prometheus: str | None = None, report_dir: str | None = None) -> int:
    """`tour=False`: apply the manifest, show what it reconciles and serve (until Ctrl-C or `duration`).
    Otherwise run the scripted tour (operator/tour.py) and write its report."""
    if tour:
        return run_tour(manifest=manifest, kubeconfig_out=kubeconfig_out, scenario=scenario, headless=headless,
                        speed=speed, prometheus=prometheus, report_dir=report_dir or DEFAULT_REPORT_DIR,
                        duration=duration)
    return serve(manifest=manifest, kubeconfig_out=kubeconfig_out, duration=duration, timeout=timeout)


def serve(*, manifest: str | None, kubeconfig_out: str, duration: float | None, timeout: float) -> int:
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
        with OperatorThread(str(cluster.operator_kubeconfig_path), resync_seconds=10):
            console.print("[bold]Operator[/] running (kopf, real handlers)")
            client = KubeClient.from_kubeconfig(str(cluster.kubeconfig_path))
            apply_worker(client, body)
            console.print(f"applied DigitalWorker {namespace}/{body['metadata']['name']}")
            final = wait_for_phase(client, namespace, body["metadata"]["name"], {"Ready", "Degraded"}, timeout)
            for table in summary_tables(client, namespace):
                console.print(table)
            phase = final["status"]["phase"]
            console.print(f"DigitalWorker {body['metadata']['name']} is [bold]{phase}[/]: {final['status']['message']}")
            endpoints = [e for pod in client.list("v1", "pods", namespace, f"{api.LABEL_INSTANCE}={body['metadata']['name']}")
                         if (e := pods.sim_endpoint(pod))]
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


# --- the tour ----------------------------------------------------------------------------------------

class LiveView:
    """What the tour shows on a terminal: the workers, their revisions and replicas, load vs forecast,
    TTFT, the autoscaler's last decision and why, and the narration's last lines."""

    def __init__(self, console, tour) -> None:
        from collections import deque

        self.console, self.tour = console, tour
        self.lines: deque[str] = deque(maxlen=12)
        self._lock = threading.Lock()  # the recorder's thread narrates Events while rich renders
        self.live = None

    def narrate(self, text: str) -> None:
        with self._lock:
            self.lines.append(f"[dim]{self.tour.now():6.1f}s[/] {text}")

    def __rich__(self):
        from rich.console import Group
        from rich.panel import Panel
        from rich.table import Table

        sample = self.tour.recorder.latest()
        table = Table(title="DigitalWorkers", expand=True)
        for column in ("Worker", "Phase", "Stable", "Canary (weight)", "Ready/Desired", "Load: actual / forecast",
                       "TTFT p95", "Last decision (why)"):
            table.add_column(column, overflow="fold")
        if sample:
            canary = "-"
            if sample.get("rollout_phase") in ("Progressing", "Paused"):
                canary = f"{sample.get('rollout_revision')} ({sample.get('canary_weight')}%)"
            elif sample.get("rollout_phase"):
                canary = f"{sample.get('rollout_revision')} {sample.get('rollout_phase')}"
            forecast = sample.get("forecast")
            ttft = sample.get("ttft_p95")
            table.add_row(
                self.tour.name, str(sample.get("phase")), str(sample.get("stable_revision")), canary,
                f"{sample.get('ready')}/{sample.get('replicas')} (autoscaler {sample.get('desired', '-')})",
                f"{sample.get('rate', 0):.1f} / {forecast:.1f} req/s" if forecast is not None else
                f"{sample.get('rate', 0):.1f} req/s / no forecast yet",
                f"{ttft:.2f}s" if ttft is not None else "-",
                f"{sample.get('decision')}: {(sample.get('reason') or '')[:90]}")
        with self._lock:
            lines = "\n".join(self.lines)
        return Group(table, Panel(lines, title=f"tour at x{self.tour.timing.speed:g}: {self.tour.current_step}"))

    def __enter__(self) -> "LiveView":
        from rich.live import Live

        self.live = Live(self, console=self.console, refresh_per_second=2, transient=False)
        self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)


def start_gpu_agents(cluster: Any) -> tuple[Any | None, str]:
    """Simulated node agents with GPU fault injection (operator/simnodes.py): (agents, "") or (None, why not)."""
    try:
        from digital_worker.operator.simnodes import start_simulated_node_agents

        return start_simulated_node_agents(cluster), ""
    except Exception as exc:  # the tour goes on without its GPU step, and says why
        return None, f"simulated node agents unavailable ({type(exc).__name__}: {exc})"


def _prometheus_for_tour(prometheus: str | None, workdir: Path):
    """(URL or None, launcher we own or None): an explicit URL, `off`, or a `prometheus` on PATH."""
    from digital_worker.operator import devprom

    if prometheus and prometheus.lower() not in ("off", "none"):
        return prometheus, None
    if prometheus is None and devprom.prometheus_binary():
        launcher = devprom.PrometheusLauncher(workdir)
        launcher.start()
        return launcher.url, launcher
    return None, None


def run_tour(*, manifest: str | None, kubeconfig_out: str, scenario: str, headless: bool, speed: float,
             prometheus: str | None, report_dir: str, duration: float | None = None) -> int:
    """The tour; exit 0 when every step passed (or was skipped), or when `duration` cut it short
    without a failure; 130 on Ctrl-C/SIGTERM (the report is written either way)."""
    import _thread
    import contextlib
    import shutil
    import tempfile

    import yaml
    from rich.console import Console

    from digital_worker.operator import devprom
    from digital_worker.operator.commands import load_manifest
    from digital_worker.operator.emulator import EmulatedCluster
    from digital_worker.operator.report import write_report
    from digital_worker.operator.runner import OperatorThread
    from digital_worker.operator.simpods import SimulatedSglangPods
    from digital_worker.operator.tour import SCENARIOS, Tour, TourTiming, verdict

    console = Console(width=None if Console().is_terminal else 132)
    live_view = console.is_terminal and not headless
    body = load_manifest(manifest) if manifest else yaml.safe_load(bundled_example())
    namespace = body["metadata"].setdefault("namespace", "default")
    logging.basicConfig(level=logging.ERROR)
    # Streams cut when the load stops at the end are expected, not worth a traceback each.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    timing = TourTiming.for_speed(speed)
    runtime = SimulatedSglangPods()
    workdir = Path(tempfile.mkdtemp(prefix="dw-dev-"))
    stack = contextlib.ExitStack()
    started = time.monotonic()
    timed_out = threading.Event()
    if threading.current_thread() is threading.main_thread():  # SIGTERM ends the tour like Ctrl-C
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        prometheus_url, launcher = _prometheus_for_tour(prometheus, workdir / "prometheus")
        if launcher is not None:
            stack.callback(launcher.stop)
        cluster = stack.enter_context(EmulatedCluster(kubeconfig=Path(kubeconfig_out).resolve(),
                                                      namespaces=("default", namespace), runtime=runtime,
                                                      fail_on_forbidden=False))
        console.print(f"[bold]Emulated Kubernetes API[/] at {cluster.url}; kubeconfig: [cyan]{cluster.kubeconfig_path}[/]")
        gpu_agents, gpu_unavailable = start_gpu_agents(cluster)
        if gpu_agents is not None and hasattr(gpu_agents, "stop"):
            stack.callback(gpu_agents.stop)
        env = {"DW_PROMETHEUS_URL": prometheus_url} if prometheus_url else {}
        stack.enter_context(OperatorThread(str(cluster.operator_kubeconfig_path), resync_seconds=10, env=env))
        client = KubeClient.from_kubeconfig(str(cluster.kubeconfig_path))
        console.print("[bold]Operator[/] running (kopf, real handlers); metrics: " +
                      (f"Prometheus at {prometheus_url}" if prometheus_url else "in-process scraper (no Prometheus)"))
        view: LiveView | None = None
        tour = Tour(kube=client, runtime=runtime, body=body, timing=timing, prometheus_url=prometheus_url,
                    gpu_faults=gpu_agents, gpu_unavailable=gpu_unavailable, narrate=lambda text: view.narrate(text) if view else
                    console.print(f"[{tour.now():6.1f}s] {text}", highlight=False))
        if prometheus_url:
            extra = None
            if gpu_agents is not None:
                extra = lambda: {job: (targets, labels) for job, targets, labels in _agent_jobs(gpu_agents)}  # noqa: E731
            # Our Prometheus gets its jobs directly; someone else's reads them from a file_sd file.
            sink = launcher if launcher is not None else devprom.FileTargets(Path(report_dir).resolve() / "prometheus-targets.json")
            sync = devprom.PodTargetSync(sink, client, tour.namespace, tour.name, extra_jobs=extra).start()
            stack.callback(sync.stop)
            if launcher is None:
                console.print(f"Point that Prometheus's file_sd_configs at [cyan]{sink.path}[/] (scrape interval 1s): "
                              "the simulated replicas and GPU agents are listed there, labelled as the platform does.")
        steps = SCENARIOS[scenario]
        if duration is not None:  # stop like Ctrl-C would: the report is still written
            timer = threading.Timer(duration, lambda: (timed_out.set(), _thread.interrupt_main()))
            timer.daemon = True
            timer.start()
            stack.callback(timer.cancel)
        console.print(f"Scenario [bold]{scenario}[/]: {' → '.join(steps)} (speed x{timing.speed:g}); "
                      f"load: {tour.trace.source}")
        if live_view:
            with LiveView(console, tour) as view:
                results = tour.run(steps)
            view = None
        else:
            results = tour.run(steps)
        paths = write_report(tour.dump(), report_dir)
        console.print(f"Report: [cyan]{Path(report_dir).resolve()}[/] ({', '.join(p.name for p in paths)})")
        # The operator ran as its ServiceAccount: a refused request is a gap in the RBAC we ship.
        refused = cluster.forbidden
        if refused:
            console.print("[bold red]RBAC[/]: the operator's ClusterRole refused " + "; ".join(refused))
        ok = all(r.ok for r in results) and len(results) == len(steps) and not refused
        failed = any(not r.ok and not r.interrupted for r in results) or bool(refused)
        state = "finished" if ok else f"stopped after --duration {duration:g}s" if timed_out.is_set() else \
            "interrupted" if tour.interrupted else "FAILED"
        console.print(f"Tour {state} in {time.monotonic() - started:.0f}s: " +
                      ", ".join(f"{r.name} {verdict(r)}" for r in results))
        if ok or (timed_out.is_set() and not failed):
            return 0
        return 130 if tour.interrupted else 1
    except KeyboardInterrupt:
        console.print("stopped" if timed_out.is_set() else "interrupted")
        return 0 if timed_out.is_set() else 130
    finally:
        stack.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _agent_jobs(gpu_agents: Any) -> list[tuple[str, list[str], dict[str, str]]]:
    """Normalise the simulated node agents' scrape targets to (job, targets, labels)."""
    jobs = []
    for index, item in enumerate(gpu_agents.scrape_targets()):
        if isinstance(item, dict):
            labels = dict(item.get("labels", {}))
            jobs.append((item.get("job", f"gpu-agent-{labels.get('node', index)}"), list(item.get("targets", [])),
                         labels))
        else:
            job, targets, labels = item
            jobs.append((job, list(targets), dict(labels)))
    return jobs
