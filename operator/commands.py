"""Operator-side subcommands: crd, render, run, dev. Heavy imports happen inside the handlers."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    crd = subparsers.add_parser("crd", help="print the DigitalWorker CRD (YAML)",
                                description="Print the DigitalWorker CustomResourceDefinition, generated from the "
                                            "operator's Python schema (the one source of truth).")
    crd.set_defaults(handler=cmd_crd)

    render = subparsers.add_parser("render", help="print the manifests the operator would apply",
                                   description="Validate a DigitalWorker manifest and print the Kubernetes objects "
                                               "the operator would create for it (for GitOps review).")
    render.add_argument("-f", "--filename", required=True, help="DigitalWorker YAML file ('-' for stdin)")
    render.add_argument("-n", "--namespace", default=None, help="namespace when the manifest has none")
    render.set_defaults(handler=cmd_render)

    run = subparsers.add_parser("run", help="run the operator against the current kubeconfig or in-cluster",
                                description="Run the DigitalWorker operator (kopf) against KUBECONFIG, "
                                            "~/.kube/config or the in-cluster service account.")
    run.add_argument("-n", "--namespace", action="append", dest="namespaces",
                     help="watch only these namespaces (repeatable; default: cluster-wide)")
    run.add_argument("--liveness", default="http://0.0.0.0:8080/healthz",
                     help="liveness endpoint URL to serve (default: %(default)s)")
    run.add_argument("--peering", default=None,
                     help="kopf peering name for leader election between replicas (default: standalone)")
    run.add_argument("--prometheus-url", default=None, help="Prometheus for analysis and autoscaling")
    run.add_argument("--metrics-port", type=int, default=9090,
                     help="serve the operator's Prometheus metrics on this port (0: off; default: %(default)s)")
    run.add_argument("--verbose", action="store_true")
    run.set_defaults(handler=cmd_run)

    dev = subparsers.add_parser("dev", help="the embedded default: emulated cluster + real operator + a narrated tour",
                                description="Start an emulated Kubernetes API on loopback, run the real operator "
                                            "against it with simulated SGLang replicas, and run a scripted tour: "
                                            "deploy, traffic ramps and the autoscaler scales out, a canary is "
                                            "promoted, a bad version is rolled back, a GPU fault is healed. Ends "
                                            "with a report (charts and a summary). --no-tour only applies the "
                                            "manifest and serves until Ctrl-C; the kubeconfig path is printed.")
    dev.add_argument("-f", "--filename", default=None,
                     help="DigitalWorker manifest to apply (default: the bundled examples/digitalworker.yaml)")
    dev.add_argument("--kubeconfig-out", default=".digital-worker/kubeconfig",
                     help="where to write the emulated cluster's kubeconfig (default: %(default)s)")
    dev.add_argument("--scenario", default="tour", choices=("tour", "autoscale", "canary", "rollback", "gpu-fault"),
                     help="the whole tour, or one story of it (default: %(default)s)")
    dev.add_argument("--no-tour", action="store_true", help="no tour: apply the manifest and serve (until Ctrl-C "
                                                            "or --duration)")
    dev.add_argument("--headless", action="store_true", help="no live view: plain narrated lines")
    dev.add_argument("--speed", type=float, default=1.0,
                     help="compress the tour's clock: intervals and durations of the applied spec and the load "
                          "trace divided by this, within the schema's floors (default: %(default)s; CI uses 10)")
    dev.add_argument("--prometheus", default=None, metavar="URL",
                     help="Prometheus for the operator (default: start `prometheus` from PATH if there is one, "
                          "else the in-process scraper; 'off' forces in-process)")
    dev.add_argument("--report", default=".digital-worker/report", metavar="DIR",
                     help="where the tour writes its charts and summary (default: %(default)s)")
    dev.add_argument("--duration", type=float, default=None,
                     help="stop after this many seconds, as Ctrl-C would (the tour still writes its report)")
    dev.add_argument("--timeout", type=float, default=60.0,
                     help="with --no-tour: seconds to wait for the DigitalWorker to become Ready (default: %(default)s)")
    dev.set_defaults(handler=cmd_dev)

    emulated = subparsers.add_parser(
        "emulated-cluster", help="serve only the emulated Kubernetes API (for `run`, kubectl, benchmarks)",
        description="Serve the emulated Kubernetes API on loopback with the DigitalWorker CRD installed, write "
                    "its kubeconfig, and run until SIGTERM/Ctrl-C. Point `digital-worker run` at it.")
    emulated.add_argument("--kubeconfig-out", default=".digital-worker/kubeconfig")
    emulated.add_argument("--no-pods", action="store_true", help="do not simulate pods for Deployments")
    emulated.add_argument("--stats-out", default=None, help="write API request counts (JSON) here on exit")
    emulated.set_defaults(handler=cmd_emulated_cluster)
    register_rollout_commands(subparsers)


def cmd_crd(args: argparse.Namespace) -> int:
    from digital_worker.operator.schema import crd_yaml

    sys.stdout.write(crd_yaml())
    return 0


def load_manifest(path: str) -> dict:
    import yaml

    from digital_worker.cli import UserError

    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    try:
        documents = [doc for doc in yaml.safe_load_all(text) if doc]
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    workers = [doc for doc in documents if isinstance(doc, dict) and doc.get("kind") == "DigitalWorker"]
    if len(workers) != 1:
        raise UserError(f"{path} must hold exactly one DigitalWorker (found {len(workers)})")
    return workers[0]


def cmd_render(args: argparse.Namespace) -> int:
    import yaml

    from digital_worker.cli import UserError
    from digital_worker.operator import render, spec

    body = load_manifest(args.filename)
    meta = body.setdefault("metadata", {})
    meta.setdefault("namespace", args.namespace or "default")
    meta.setdefault("uid", "<assigned-by-the-api-server>")
    problems = spec.validate(body)
    if problems:
        raise UserError("invalid DigitalWorker: " + "; ".join(problems))
    normalized, _ = spec.normalize_spec(body["spec"])
    sys.stdout.write(yaml.safe_dump_all(render.render_all(body, normalized), sort_keys=False, width=120))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import os

    from digital_worker.operator.runner import run_foreground

    if args.prometheus_url:
        os.environ["DW_PROMETHEUS_URL"] = args.prometheus_url
    run_foreground(namespaces=args.namespaces, liveness=args.liveness, peering=args.peering, verbose=args.verbose,
                   metrics_port=args.metrics_port)
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    from digital_worker.operator.dev import run_dev

    return run_dev(manifest=args.filename, kubeconfig_out=args.kubeconfig_out, duration=args.duration,
                   timeout=args.timeout, tour=not args.no_tour, scenario=args.scenario, headless=args.headless,
                   speed=args.speed, prometheus=args.prometheus, report_dir=args.report)


def cmd_emulated_cluster(args: argparse.Namespace) -> int:
    import json
    import signal
    import threading

    from digital_worker.operator.emulator import EmulatedCluster

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with EmulatedCluster(kubeconfig=Path(args.kubeconfig_out).resolve(), pod_simulator=not args.no_pods) as cluster:
        print(f"emulated Kubernetes API at {cluster.url}; kubeconfig: {cluster.kubeconfig_path}", flush=True)
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        if args.stats_out:
            counts = cluster.call(lambda: _counts(cluster))
            Path(args.stats_out).write_text(json.dumps(counts, indent=2, sort_keys=True))
    return 0


async def _counts(cluster) -> dict:
    return dict(cluster.emulator.request_counts)


def register_rollout_commands(subparsers: argparse._SubParsersAction) -> None:
    actions = {
        "promote": "move a canary past its current step (--full: to the end at once)",
        "abort": "abort a canary: the stable revision takes all traffic back",
        "retry": "start an aborted canary again from its first step",
        "pause": "pause a canary where it is",
        "resume": "resume a paused canary (also after an inconclusive analysis)",
    }
    for verb, text in actions.items():
        parser = subparsers.add_parser(verb, help=text, description=text.capitalize() + ". Works through an "
                                       "annotation on the DigitalWorker, so `kubectl annotate` does the same.")
        parser.add_argument("name")
        parser.add_argument("-n", "--namespace", default="default")
        parser.add_argument("--kubeconfig", default=None)
        if verb == "promote":
            parser.add_argument("--full", action="store_true", help="skip all remaining steps")
        parser.set_defaults(handler=cmd_rollout_action, verb=verb)
    status = subparsers.add_parser("status", help="show DigitalWorkers, their revisions and rollout state",
                                   description="Show DigitalWorkers with their revisions, rollout and autoscaling state.")
    status.add_argument("name", nargs="?")
    status.add_argument("-n", "--namespace", default=None)
    status.add_argument("--kubeconfig", default=None)
    status.set_defaults(handler=cmd_status)


def connect(kubeconfig: str | None):
    """A client for the current kubeconfig (or in-cluster); a missing config is a one-line error."""
    from digital_worker.cli import UserError
    from digital_worker.operator.kube import KubeClient

    try:
        return KubeClient.from_kubeconfig(kubeconfig)
    except Exception as exc:
        raise UserError(f"no Kubernetes config found (KUBECONFIG, ~/.kube/config or in-cluster): {exc}") from None


def cmd_rollout_action(args: argparse.Namespace) -> int:
    from digital_worker.cli import UserError
    from digital_worker.operator import rollout
    from digital_worker.operator import schema as api
    from digital_worker.operator.kube import NotFound

    annotation = {"promote": rollout.ANNOTATION_PROMOTE, "abort": rollout.ANNOTATION_ABORT,
                  "retry": rollout.ANNOTATION_RETRY, "pause": rollout.ANNOTATION_PAUSE,
                  "resume": rollout.ANNOTATION_RESUME}[args.verb]
    value = "full" if getattr(args, "full", False) else ("step" if args.verb == "promote" else "true")
    client = connect(args.kubeconfig)
    try:
        client.patch(api.API_VERSION, api.PLURAL, args.namespace, args.name,
                     {"metadata": {"annotations": {annotation: value}}})
    except NotFound:
        raise UserError(f"DigitalWorker {args.namespace}/{args.name} not found") from None
    print(f"{args.verb}: requested on {args.namespace}/{args.name}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console

    from digital_worker.cli import UserError
    from digital_worker.operator import schema as api
    from digital_worker.operator.dev import summary_tables
    from digital_worker.operator.kube import KubeError

    client = connect(args.kubeconfig)
    console = Console(width=None if Console().is_terminal else 132)
    try:
        workers, _ = summary_tables(client, args.namespace)
        bodies = client.list(api.API_VERSION, api.PLURAL, args.namespace)
    except KubeError as exc:
        raise UserError(f"cannot read the cluster: {exc}") from None
    console.print(workers)
    for body in bodies:
        if args.name and body["metadata"]["name"] != args.name:
            continue
        status = body.get("status") or {}
        for table in rollout_tables(body):
            console.print(table)
        if status.get("autoscaling"):
            console.print(f"autoscaling: {json.dumps(status['autoscaling'])}")
        if status.get("fallback"):
            console.print(f"fallback: {json.dumps(status['fallback'])}")
    return 0


def rollout_tables(body: dict) -> list:
    """The rollout of one worker: revisions and weights, then each check's last value and verdict."""
    from rich.table import Table

    status = body.get("status") or {}
    rollout = status.get("rollout")
    if not rollout:
        return []
    where = f"{body['metadata']['namespace']}/{body['metadata']['name']}"
    strategy = rollout.get("strategy", "Canary")
    table = Table(title=f"{strategy} rollout of {where}")
    for column in ("Phase", "New", "Stable", "Step", "Weight", "Active" if strategy == "BlueGreen" else "Exact",
                   "Message"):
        table.add_column(column)
    table.add_row(rollout.get("phase", ""), rollout.get("revision", ""), rollout.get("stableRevision", ""),
                  str(rollout.get("step", "")), f"{rollout.get('weight', 0)}%",
                  str(rollout.get("active" if strategy == "BlueGreen" else "exact", "")), rollout.get("message", ""))
    tables = [table]
    for key in ("analysis", "prePromotionAnalysis", "postPromotionAnalysis"):
        analysis = rollout.get(key)
        if not analysis or not analysis.get("checks"):
            continue
        checks = Table(title=f"{key}: {analysis.get('phase', '')}, {analysis.get('runs', 0)} run(s), "
                             f"last {analysis.get('lastVerdict') or '-'}")
        for column in ("Check", "Metric", "Value", "Stable", "Threshold", "Verdict", "Message"):
            checks.add_column(column)
        for check in analysis["checks"]:
            checks.add_row(*(("-" if check.get(k) is None else
                              f"{check[k]:.4g}" if isinstance(check.get(k), float) else str(check[k]))
                             for k in ("name", "metric", "value", "baseline", "threshold", "verdict", "message")))
        tables.append(checks)
    return tables
