"""On-prem GPU host preparation: what `pulumi up` costs per phase, against real sshd hosts.

Starts N loopback "hosts" (Debian's sshd in per-host mount namespaces, fake nvidia-smi and k3s
installer: tests/stacks/stacks_fakehosts.py) and runs the GpuHost provider the way the engine
orders it: the server first, then the agents in parallel. Per phase it reports wall time, remote
commands run and how many of them changed something. The point: a re-run with nothing to do
only reads (no installer, no kubectl writes), and label changes never reinstall k3s.

    python bench/stacks_onprem.py [--hosts 1 3 6] [--json FILE]

Needs root, `unshare` and openssh-server (as the tests do). Wall times on loopback measure our
own overhead (SSH handshakes, round trips), not real k3s installs.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "stacks"))

from stacks_fakehosts import FakeFleet, has_tools  # noqa: E402

from digital_worker.stacks.onprem import GpuHostProvider  # noqa: E402

MUTATING = ("install", "label node", "taint node", "drain", "delete node", "uninstall", "rm -f", "k3s-install")


def host_props(fleet, host, role, **extra):
    props = {"node_name": host.name, "role": role, "address": "127.0.0.1", "port": host.port, "user": "root",
             "private_key": fleet.private_key, "host_key": host.host_key, "installer_script": fleet.installer,
             "node_ready_timeout": 10, "labels": {}, "taints": ["nvidia.com/gpu=present:NoSchedule"]}
    props.update(extra)
    return props


def count(outs_list):
    commands = [c for outs in outs_list for c in outs.get("commands", [])]
    return len(commands), sum(1 for c in commands if any(m in c for m in MUTATING))


def run_phase(provider, items, action):
    """items: list of (id, olds, news); server first, then the rest in parallel like Pulumi."""
    start = time.perf_counter()
    results = [action(provider, *items[0])]
    if len(items) > 1:
        with futures.ThreadPoolExecutor(max_workers=len(items) - 1) as pool:
            results += list(pool.map(lambda item: action(provider, *item), items[1:]))
    return time.perf_counter() - start, results


def bench(hosts: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-stacks-") as tmp:
        fleet = FakeFleet(Path(tmp))
        try:
            nodes = [fleet.add_host(f"gpu-{i}") for i in range(hosts)]
            provider = GpuHostProvider()
            server_props = host_props(fleet, nodes[0], "server")
            start = time.perf_counter()
            server = provider.create(server_props)
            server_outs = server.outs

            def agent_props(host, **extra):
                return host_props(fleet, host, "agent", server_url=server_outs["server_url"],
                                  k3s_token=server_outs["k3s_token"],
                                  server={"address": "127.0.0.1", "port": nodes[0].port, "user": "root",
                                          "host_key": server_outs["host_key_seen"]}, **extra)

            created = [server]
            if hosts > 1:
                with futures.ThreadPoolExecutor(max_workers=hosts - 1) as pool:
                    created += list(pool.map(lambda h: provider.create(agent_props(h)), nodes[1:]))
            create_s = time.perf_counter() - start
            props = [server_props] + [agent_props(h) for h in nodes[1:]]
            state = [(c.id, c.outs, p) for c, p in zip(created, props)]

            diff_start = time.perf_counter()
            no_diff = all(provider.diff(i, o, n).changes is False for i, o, n in state)
            diff_s = time.perf_counter() - diff_start
            # A forced re-run (e.g. `pulumi up --refresh` after state loss): everything is re-checked.
            rerun_s, reruns = run_phase(provider, state, lambda p, i, o, n: p.update(i, o, n))
            relabelled = [(i, o, dict(n, labels={"pool": "batch"})) for i, o, n in state]
            label_s, labelled = run_phase(provider, relabelled, lambda p, i, o, n: p.update(i, o, n))
            installs_before_delete = len([line for line in fleet.installs() if line != "uninstalled"])
            delete_start = time.perf_counter()
            # Agents first (they depend on the server), then the server, as Pulumi orders a destroy.
            agents = [(u.outs, s[0]) for u, s in zip(labelled[1:], state[1:])]
            if agents:
                with futures.ThreadPoolExecutor(max_workers=len(agents)) as pool:
                    list(pool.map(lambda a: provider.delete(a[1], a[0]), agents))
            provider.delete(state[0][0], labelled[0].outs)
            delete_s = time.perf_counter() - delete_start
            create_cmds, create_mut = count([c.outs for c in created])
            rerun_cmds, rerun_mut = count([r.outs for r in reruns])
            label_cmds, label_mut = count([r.outs for r in labelled])
            return {
                "hosts": hosts,
                "create_s": round(create_s, 3),
                "create_commands": create_cmds, "create_mutating": create_mut,
                "diff_no_change": no_diff, "diff_s": round(diff_s, 5),
                "rerun_s": round(rerun_s, 3), "rerun_commands": rerun_cmds, "rerun_mutating": rerun_mut,
                "relabel_s": round(label_s, 3), "relabel_commands": label_cmds, "relabel_mutating": label_mut,
                "k3s_installs": installs_before_delete,
                "delete_s": round(delete_s, 3),
                "rerun_over_create": round(rerun_s / create_s, 3),
                "nodes_left_after_delete": len(list((fleet.cluster / "nodes").glob("*.json"))),
            }
        finally:
            fleet.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, nargs="+", default=[1, 3, 6])
    parser.add_argument("--json", default=None, help="write the results as JSON to this file")
    args = parser.parse_args()
    if not has_tools():
        print("needs root, unshare and /usr/sbin/sshd", file=sys.stderr)
        return 2
    rows = [bench(n) for n in args.hosts]
    columns = ["hosts", "create_s", "create_commands", "create_mutating", "diff_no_change", "rerun_s",
               "rerun_commands", "rerun_mutating", "relabel_s", "relabel_mutating", "k3s_installs", "delete_s",
               "rerun_over_create", "nodes_left_after_delete"]
    widths = [max(len(c), 6) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in rows:
        print("  ".join(str(row[c]).rjust(w) for c, w in zip(columns, widths)))
    if args.json:
        Path(args.json).write_text(json.dumps({"benchmark": "stacks_onprem", "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
