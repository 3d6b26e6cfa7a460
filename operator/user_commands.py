"""The verbs a user reaches for first: init, test, get, logs.

`init` writes a commented DigitalWorker and a Pulumi stack config (operator/scaffold.py); `test
--scenario full-flow` smoke-tests an endpoint (runtime/smoke.py) or, without `--endpoint`, the
whole embedded flow (operator/fullflow.py); `get` and `logs` summarise workers on a cluster
(operator/summaries.py). Module level imports argparse only; handlers import what they need, so
`test --endpoint` runs with the `runtime` extra alone.
"""
from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    init = subparsers.add_parser(
        "init", help="write a commented DigitalWorker manifest and a Pulumi stack config",
        description="Ask a few questions (defaults in brackets; Enter accepts) and write <name>.yaml (a "
                    "DigitalWorker, checked by the operator's own validation) and Pulumi.<stack>.yaml (checked "
                    "as the stacks program reads it). Flags answer questions up front; --yes takes the defaults "
                    "for the rest. Existing files are never overwritten without --force.")
    init.add_argument("--template", choices=("minimal", "full"), default="minimal",
                      help="minimal: model and runtime basics; full: every section, commented (default: %(default)s)")
    init.add_argument("--output-dir", default=".", help="where to write both files (default: the current folder)")
    init.add_argument("--name", default=None, help="DigitalWorker name")
    init.add_argument("-n", "--namespace", default=None, help="namespace of the DigitalWorker")
    init.add_argument("--model", default=None, help="model name clients ask for")
    init.add_argument("--source", default=None, help="model weights: hf://org/repo, s3://bucket/prefix, pvc://claim/path")
    init.add_argument("--gpus", default=None, help="GPUs per replica")
    init.add_argument("--gpu-type", default=None, help="node label digitalworker.io/gpu-type to schedule on")
    init.add_argument("--stack", choices=("existing", "onprem", "aws"), default=None, help="Pulumi stack to configure")
    init.add_argument("--kubeconfig", default=None, help="existing: kubeconfig path")
    init.add_argument("--context", default=None, help="existing: kubeconfig context")
    init.add_argument("--host-address", default=None, help="onprem: first GPU host's address")
    init.add_argument("--host-user", default=None, help="onprem: SSH user with passwordless sudo")
    init.add_argument("--host-key", default=None, help="onprem: the host's verified SSH host key line")
    init.add_argument("--accept-unknown-host-keys", action="store_true",
                      help="onprem: trust the first host key seen and pin it (instead of --host-key)")
    init.add_argument("--region", default=None, help="aws: region")
    init.add_argument("--instance-type", default=None, help="aws: GPU instance type, e.g. g6.2xlarge")
    init.add_argument("-y", "--yes", "--non-interactive", dest="yes", action="store_true",
                      help="ask nothing: flags, then defaults")
    init.add_argument("--force", action="store_true", help="overwrite existing files")
    init.set_defaults(handler=cmd_init)

    test = subparsers.add_parser(
        "test", help="end-to-end smoke test of a deployment (or of the whole embedded flow)",
        description="Check a serving endpoint like a client would: health, model info, a chat completion "
                    "(plain and streaming), metrics, TTFT and end-to-end percentiles. Without --endpoint, stand "
                    "up the embedded default (emulated cluster, real operator, simulated SGLang replicas), wait "
                    "for Ready and test a replica. Exits 1 when a check fails, naming it.")
    test.add_argument("--scenario", choices=("full-flow",), default="full-flow", help="what to run (default: %(default)s)")
    test.add_argument("--endpoint", default=None,
                      help="base URL of an SGLang/OpenAI-compatible server, e.g. http://HOST:30000 (default: "
                           "the embedded flow)")
    test.add_argument("--model", default=None, help="model to ask for (default: the first /v1/models lists)")
    test.add_argument("--api-key", default=None, help="API key sent as a Bearer token")
    test.add_argument("--api-key-env", default=None, metavar="VAR",
                      help="take the API key from this environment variable (keeps it off the command line)")
    test.add_argument("--requests", type=int, default=5, help="streaming requests for the percentiles (default: %(default)s)")
    test.add_argument("--max-tokens", type=int, default=16, help="tokens per completion (default: %(default)s)")
    test.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default: %(default)s)")
    test.add_argument("-f", "--filename", default=None,
                      help="embedded flow: the DigitalWorker to deploy (default: the bundled example)")
    test.add_argument("--ready-timeout", type=float, default=60.0,
                      help="embedded flow: seconds to wait for Ready (default: %(default)s)")
    test.add_argument("--json", default=None, metavar="FILE", help="also write the report as JSON")
    test.set_defaults(handler=cmd_test)

    get = subparsers.add_parser("get", help="DigitalWorkers and their children, as dev mode shows them",
                                description="Tables of DigitalWorkers (phase, ready/desired, revision, message) and "
                                            "the objects the operator made for them.")
    get.add_argument("name", nargs="?", help="only this DigitalWorker")
    get.add_argument("-n", "--namespace", default=None, help="namespace (default: all)")
    get.add_argument("--kubeconfig", default=None)
    get.set_defaults(handler=cmd_get)

    logs = subparsers.add_parser("logs", help="a DigitalWorker's recent Events and status transitions",
                                 description="One timeline, newest last: the worker's Events (its own, its pods', "
                                             "GPU-health Events of nodes it tainted) and the transitions its status "
                                             "records (conditions, rollout, autoscaling, GPU health).")
    logs.add_argument("name")
    logs.add_argument("-n", "--namespace", default=None, help="namespace (default: wherever the only worker of "
                                                               "that name is)")
    logs.add_argument("--kubeconfig", default=None)
    logs.add_argument("--limit", type=int, default=50, help="newest entries to show (default: %(default)s; 0: all)")
    logs.set_defaults(handler=cmd_logs)


def _console():
    from rich.console import Console

    return Console(width=None if Console().is_terminal else 132)


def cmd_init(args: argparse.Namespace) -> int:
    from pathlib import Path

    from digital_worker.cli import UserError
    from digital_worker.operator import scaffold

    given = {"name": args.name, "namespace": args.namespace, "model": args.model, "source": args.source,
             "gpus": args.gpus, "gpu_type": args.gpu_type, "stack": args.stack, "kubeconfig": args.kubeconfig,
             "context": args.context, "host_address": args.host_address, "host_user": args.host_user,
             "host_key": args.host_key, "accept_unknown_host_keys": args.accept_unknown_host_keys or None,
             "region": args.region, "instance_type": args.instance_type}
    try:
        answers = scaffold.gather(given, interactive=not args.yes)
        written = scaffold.scaffold(answers, template=args.template, output_dir=Path(args.output_dir),
                                    force=args.force)
    except scaffold.ScaffoldError as exc:
        raise UserError(str(exc)) from None
    print(f"wrote {written.manifest} (DigitalWorker {answers.namespace}/{answers.name}, template {args.template}: valid)")
    print(f"wrote {written.stack_config} (stack {answers.stack})")
    for note in written.notes:
        print(f"note: {note}")
    print("next:")
    print(f"  digital-worker render -f {written.manifest}    # what the operator will create")
    print(f"  digital-worker dev -f {written.manifest}       # run it on the embedded default")
    print(f"  pulumi stack init {answers.stack} && pulumi up    # the platform (run next to Pulumi.yaml)")
    print(f"  kubectl apply -f {written.manifest}")
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    import json
    import os

    from digital_worker.cli import UserError
    from digital_worker.runtime.smoke import SmokeSettings, print_report, run_smoke

    if args.requests < 0 or args.max_tokens < 1 or args.timeout <= 0:
        raise UserError("--requests must be >= 0, --max-tokens >= 1 and --timeout > 0")
    api_key = args.api_key
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise UserError(f"--api-key-env: environment variable {args.api_key_env} is not set")

    def progress(check) -> None:
        mark = {"pass": "ok", "fail": "FAIL", "skip": "skip"}[check.status]
        print(f"  [{mark}] {check.name}: {check.detail}", file=sys.stderr, flush=True)

    if args.endpoint:
        if args.filename:
            raise UserError("-f/--filename is for the embedded flow; with --endpoint the deployment exists already")
        print(f"full-flow smoke test of {args.endpoint}", file=sys.stderr, flush=True)
        report = run_smoke(SmokeSettings(args.endpoint, model=args.model, api_key=api_key, requests=args.requests,
                                         max_tokens=args.max_tokens, timeout=args.timeout), progress=progress)
    else:
        from digital_worker.operator.fullflow import run_full_flow

        print("full-flow on the embedded default: emulated cluster, operator, simulated SGLang replicas",
              file=sys.stderr, flush=True)
        report = run_full_flow(manifest=args.filename, model=args.model, api_key=api_key, requests=args.requests,
                               max_tokens=args.max_tokens, request_timeout=args.timeout,
                               ready_timeout=args.ready_timeout, progress=progress)
    print_report(report)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(report.to_dict(), file, indent=2)
    return 0 if report.ok else 1


def cmd_get(args: argparse.Namespace) -> int:
    from digital_worker.cli import UserError
    from digital_worker.operator import schema as api
    from digital_worker.operator.commands import connect
    from digital_worker.operator.dev import summary_tables
    from digital_worker.operator.kube import KubeError
    from digital_worker.operator.summaries import OneWorker

    client = connect(args.kubeconfig)
    try:
        if args.name and not [b for b in client.list(api.API_VERSION, api.PLURAL, args.namespace)
                              if b["metadata"]["name"] == args.name]:
            where = f" in namespace {args.namespace}" if args.namespace else ""
            raise UserError(f"DigitalWorker {args.name} not found{where}")
        tables = summary_tables(OneWorker(client, args.name) if args.name else client, args.namespace)
    except KubeError as exc:
        raise UserError(f"cannot read the cluster: {exc}") from None
    console = _console()
    for table in tables:
        console.print(table)
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from digital_worker.cli import UserError
    from digital_worker.operator.commands import connect
    from digital_worker.operator.kube import KubeError
    from digital_worker.operator.summaries import collect, timeline_table

    client = connect(args.kubeconfig)
    try:
        namespace = args.namespace or find_namespace(client, args.name)
        entries = collect(client, namespace, args.name, args.limit or None)
    except KubeError as exc:
        raise UserError(f"cannot read the cluster: {exc}") from None
    if entries is None:
        raise UserError(f"DigitalWorker {namespace}/{args.name} not found")
    _console().print(timeline_table(entries, f"{namespace}/{args.name}: Events and status, newest last"))
    return 0


def find_namespace(client, name: str) -> str:
    """The namespace of the one DigitalWorker called `name`; a UserError when there are none or several."""
    from digital_worker.cli import UserError
    from digital_worker.operator import schema as api

    namespaces = sorted(b["metadata"]["namespace"] for b in client.list(api.API_VERSION, api.PLURAL)
                        if b["metadata"]["name"] == name)
    if not namespaces:
        raise UserError(f"DigitalWorker {name} not found in any namespace")
    if len(namespaces) > 1:
        raise UserError(f"DigitalWorker {name} exists in {', '.join(namespaces)}: say which with -n")
    return namespaces[0]
