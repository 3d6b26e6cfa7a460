"""`digital-worker stacks ...`: the stacks' offline helpers (no Pulumi CLI needed).

Module level imports argparse only; the handlers import the stack code.
"""
from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    stacks = subparsers.add_parser(
        "stacks", help="check stack config and print the platform manifests (Pulumi stacks helpers)",
        description="Helpers for the Pulumi stacks in Pulumi.yaml: validate a Pulumi.<stack>.yaml without "
                    "Pulumi, print the platform objects for kubectl, or check a GPU host over SSH.")
    commands = stacks.add_subparsers(dest="stacks_command", metavar="SUBCOMMAND")
    commands.required = True

    check = commands.add_parser(
        "check", help="validate a Pulumi.<stack>.yaml (all problems, each with its key)",
        description="Parse a stack file the way the Pulumi program does and report every problem; "
                    "DigitalWorkers are validated by the operator's own validator.")
    check.add_argument("stack_file", help="path to Pulumi.<stack>.yaml")
    check.set_defaults(handler=cmd_check)

    manifests = commands.add_parser(
        "manifests", help="print the platform objects the Platform component deploys (YAML)",
        description="Print namespace, CRDs, operator RBAC/Deployment/Service, node agent, PodMonitors, alert "
                    "rules, the Grafana dashboard ConfigMap and DigitalWorkers as YAML for kubectl; Helm releases "
                    "(Prometheus, device plugin) are not "
                    "included. Settings come from a stack file or the defaults.")
    manifests.add_argument("-f", "--stack-file", default=None, help="Pulumi.<stack>.yaml to take settings from")
    manifests.add_argument("-n", "--namespace", default=None, help="operator namespace (overrides the stack file)")
    manifests.add_argument("--operator-image", default=None, help="operator image (overrides the stack file)")
    manifests.add_argument("--prometheus", choices=("podmonitor", "helm", "none"), default=None,
                           help="scrape setup to render (default: the stack file's, else helm)")
    manifests.set_defaults(handler=cmd_manifests)

    host = commands.add_parser(
        "check-host", help="read-only SSH check of one GPU host (driver, toolkit, k3s marker)",
        description="Connect with a verified host key and report the GPUs, the container toolkit and "
                    "whether the host was already prepared. Changes nothing on the host.")
    host.add_argument("address")
    host.add_argument("--port", type=int, default=22)
    host.add_argument("--user", default="root")
    host.add_argument("--key", required=True, help="path of the SSH private key")
    host.add_argument("--host-key", required=True, help="expected host key line: 'ssh-ed25519 AAAA...'")
    host.set_defaults(handler=cmd_check_host)

    observability = subparsers.add_parser(
        "observability", help="print the Prometheus alerting rules or the Grafana dashboard",
        description="The alerts and the fleet dashboard the platform deploys (stacks/observability): print "
                    "them for your own Prometheus and Grafana, or regenerate the checked-in copies.")
    what = observability.add_subparsers(dest="observability_command", metavar="SUBCOMMAND")
    what.required = True
    rules = what.add_parser("rules", help="Prometheus rule file (YAML), or a PrometheusRule with --prometheus-rule")
    rules.add_argument("--prometheus-rule", action="store_true", help="wrap as a Prometheus Operator PrometheusRule")
    rules.add_argument("-n", "--namespace", default="digital-worker-system", help="namespace of the PrometheusRule")
    rules.set_defaults(handler=cmd_observability_rules)
    dashboard = what.add_parser("dashboard", help="Grafana dashboard JSON, or a sidecar ConfigMap with --configmap")
    dashboard.add_argument("--configmap", action="store_true",
                           help='wrap in a ConfigMap labelled grafana_dashboard: "1" (YAML)')
    dashboard.add_argument("-n", "--namespace", default="digital-worker-system", help="namespace of the ConfigMap")
    dashboard.set_defaults(handler=cmd_observability_dashboard)
    write = what.add_parser("write", help="regenerate stacks/observability/dashboard.json and prometheus-rules.yaml")
    write.add_argument("--dir", default=None, help="write there instead (default: next to the generator)")
    write.set_defaults(handler=cmd_observability_write)


def _load(path: str, require_secrets: bool = True):
    from pathlib import Path

    from digital_worker.cli import UserError
    from digital_worker.stacks import config

    file = Path(path)
    try:
        values, secrets = config.load_stack_file(file)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    except Exception as exc:  # YAML errors
        raise UserError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    try:
        return config.parse(values, base_dir=file.resolve().parent, has_secret=lambda key: key in secrets,
                            require_secrets=require_secrets)
    except config.ConfigError as exc:
        raise UserError(f"{path}: {exc}") from None


def cmd_check(args: argparse.Namespace) -> int:
    parsed = _load(args.stack_file, require_secrets=False)
    for note in parsed.missing_secrets:
        print(f"note: {note}")
    print(f"{args.stack_file}: target {parsed.target}, namespace {parsed.platform.namespace}, "
          f"{len(parsed.platform.workers)} DigitalWorker(s), prometheus {parsed.prometheus_mode_requested}: ok")
    return 0


def cmd_manifests(args: argparse.Namespace) -> int:
    import dataclasses

    import yaml

    from digital_worker.cli import UserError
    from digital_worker.stacks import manifests

    settings = _load(args.stack_file, require_secrets=False).platform if args.stack_file else manifests.PlatformSettings()
    changes = {}
    if args.namespace:
        changes["namespace"] = args.namespace
    if args.operator_image:
        changes["operator_image"] = args.operator_image
    if args.prometheus:
        changes["prometheus_mode"] = args.prometheus
    settings = dataclasses.replace(settings, **changes)
    try:
        objects = manifests.platform_objects(settings).all()
    except ValueError as exc:
        raise UserError(str(exc)) from None
    sys.stdout.write(yaml.safe_dump_all(objects, sort_keys=False))
    return 0


def cmd_check_host(args: argparse.Namespace) -> int:
    from pathlib import Path

    from digital_worker.cli import UserError
    from digital_worker.stacks import hostprep
    from digital_worker.stacks.remote import RemoteError, RemoteHost, SshTarget, parse_public_key

    try:
        parse_public_key(args.host_key)
        key_text = Path(args.key).read_text()
    except ValueError as exc:
        raise UserError(f"--host-key: {exc}") from None
    except OSError as exc:
        raise UserError(f"--key: cannot read {args.key}: {exc.strerror}") from None
    target = SshTarget(args.address, user=args.user, port=args.port, private_key=key_text, host_key=args.host_key)
    try:
        with RemoteHost(target, name=args.address) as host:
            gpus = hostprep.probe_gpus(host)
            toolkit = host.run("nvidia-ctk --version", step="check container toolkit", check=False)
            marker = hostprep.read_marker(host)
    except RemoteError as exc:
        raise UserError(str(exc)) from None
    print(f"{args.address}: {len(gpus)} x {gpus[0].product} (driver {gpus[0].driver_version}), "
          f"gpu-type {hostprep.gpu_type_from_product(gpus[0].product, gpus[0].memory_mib)}")
    print("container toolkit: " + (toolkit.stdout.strip().splitlines()[0] if toolkit.status == 0 else "missing"))
    print("prepared: " + (f"yes, node {marker.get('node_name')} ({marker.get('role')})" if marker else "no"))
    return 0


def cmd_observability_rules(args: argparse.Namespace) -> int:
    from digital_worker.stacks import observability

    if args.prometheus_rule:
        import yaml

        sys.stdout.write(yaml.safe_dump(observability.prometheus_rule_object(args.namespace), sort_keys=False,
                                        width=1 << 16))
    else:
        sys.stdout.write(observability.rules_yaml())
    return 0


def cmd_observability_dashboard(args: argparse.Namespace) -> int:
    from digital_worker.stacks import observability

    if args.configmap:
        import yaml

        sys.stdout.write(yaml.safe_dump(observability.dashboard_configmap(args.namespace), sort_keys=False))
    else:
        sys.stdout.write(observability.dashboard_json())
    return 0


def cmd_observability_write(args: argparse.Namespace) -> int:
    from pathlib import Path

    from digital_worker.stacks import observability

    directory = Path(args.dir) if args.dir else observability.HERE
    for path in observability.write_files(directory):
        print(f"wrote {path}")
    return 0
