"""`digital-worker agent` (the per-node GPU agent) and `digital-worker agent-manifests`.

Module level imports argparse only; the handlers import the agent code.
"""
from __future__ import annotations

import argparse
import os


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {text}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    agent = subparsers.add_parser(
        "agent",
        help="run the per-node GPU metrics and fault agent",
        description="Serve per-GPU NVML metrics (dcgm-exporter names), XID faults and pod attribution "
                    "on /metrics, with /healthz and /readyz, on one port.",
    )
    agent.add_argument("--port", type=_port, default=int(os.environ.get("DW_AGENT_PORT", 9400)),
                       help="HTTP port for /metrics, /healthz, /readyz (default 9400, env DW_AGENT_PORT)")
    agent.add_argument("--listen-address", default="0.0.0.0", help="address to bind (default 0.0.0.0)")
    agent.add_argument("--interval", type=_positive_float, default=1.0,
                       help="seconds between NVML collections (default 1)")
    agent.add_argument("--node-name", default=os.environ.get("NODE_NAME", ""),
                       help="Kubernetes node name for the Hostname label (default env NODE_NAME, else hostname)")
    agent.add_argument("--nvml-backend", default=None,
                       help="pynvml-compatible module or .py path (default env DW_NVML_BACKEND, else pynvml)")
    agent.add_argument("--pod-resources-socket", default="/var/lib/kubelet/pod-resources/kubelet.sock",
                       help="kubelet PodResources socket; empty string disables pod attribution")
    agent.add_argument("--pod-resources-refresh", type=_positive_float, default=10.0,
                       help="seconds between PodResources List calls (default 10)")
    agent.add_argument("--pod-resources-client", choices=["http2", "grpcio"], default="http2",
                       help="how to call the kubelet: our small HTTP/2 client (default) or grpcio (+18 MB RSS)")
    agent.add_argument("--nvml-retry", type=_positive_float, default=60.0,
                       help="seconds between NVML init attempts while no driver answers (default 60)")
    agent.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    agent.set_defaults(handler=_run_agent)

    manifests = subparsers.add_parser(
        "agent-manifests",
        help="print the node agent's Kubernetes manifests (DaemonSet, Service, PodMonitor) as YAML",
        description="Render the node agent manifests that the stacks deploy.",
    )
    manifests.add_argument("--namespace", required=True, help="namespace to deploy the agent in")
    manifests.add_argument("--image", required=True, help="agent container image")
    manifests.add_argument("--port", type=_port, default=9400, help="metrics port (default 9400)")
    manifests.add_argument("--node-selector", action="append", default=[], metavar="KEY=VALUE",
                           help="node label the DaemonSet must match (repeatable; default: GPU nodes)")
    manifests.add_argument("--no-podmonitor", action="store_true",
                           help="leave out the PodMonitor (clusters without the Prometheus Operator)")
    manifests.set_defaults(handler=_print_manifests)


def _run_agent(args: argparse.Namespace) -> int:
    from digital_worker.agents.agent import AgentConfig, main

    config = AgentConfig(
        port=args.port, listen_address=args.listen_address, interval=args.interval,
        node_name=args.node_name, nvml_backend=args.nvml_backend,
        pod_resources_socket=args.pod_resources_socket or None,
        pod_resources_refresh=args.pod_resources_refresh, pod_resources_transport=args.pod_resources_client,
        nvml_retry=args.nvml_retry,
    )
    return main(config, args.log_level)


def _print_manifests(args: argparse.Namespace) -> int:
    import yaml

    from digital_worker.agents.manifests import agent_manifests, agent_podmonitor
    from digital_worker.cli import UserError

    node_selector = None
    if args.node_selector:
        node_selector = {}
        for item in args.node_selector:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise UserError(f"--node-selector must be KEY=VALUE, got {item!r}")
            node_selector[key] = value
    try:
        documents = agent_manifests(args.namespace, args.image, port=args.port, node_selector=node_selector)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if not args.no_podmonitor:
        documents.append(agent_podmonitor(args.namespace))
    print(yaml.safe_dump_all(documents, sort_keys=False), end="")
    return 0
