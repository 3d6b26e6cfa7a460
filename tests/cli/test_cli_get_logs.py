"""`digital-worker get` and `logs` against the emulated cluster with the real operator; the timeline logic pure."""
from __future__ import annotations

import contextlib
import copy
import io
import shutil
import subprocess
import time

import pytest
import yaml

from digital_worker.cli import main
from digital_worker.operator import schema as api
from digital_worker.operator.dev import apply_worker, bundled_example, wait_for_phase
from digital_worker.operator.summaries import timeline

CLI = shutil.which("digital-worker")


@pytest.fixture(scope="module")
def running_worker():
    """The bundled example, Ready on the emulated cluster, then a new revision started as a canary."""
    from digital_worker.operator.emulator import EmulatedCluster
    from digital_worker.operator.kube import KubeClient
    from digital_worker.operator.runner import OperatorThread

    body = yaml.safe_load(bundled_example())
    with EmulatedCluster(namespaces=("default", "ai"), pod_startup_seconds=0.2) as cluster:
        with OperatorThread(str(cluster.operator_kubeconfig_path), resync_seconds=2):
            client = KubeClient.from_kubeconfig(str(cluster.kubeconfig_path))
            apply_worker(client, copy.deepcopy(body))
            ready = wait_for_phase(client, "ai", "support-bot", {"Ready"}, 60)
            # A runtime change is a new revision: the canary's first step (setWeight 10) then a 5m pause.
            client.patch(api.API_VERSION, api.PLURAL, "ai", "support-bot",
                         {"spec": {"runtime": {"memFractionStatic": 0.8}}})
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                current = client.get(api.API_VERSION, api.PLURAL, "ai", "support-bot")
                if ((current.get("status") or {}).get("rollout") or {}).get("step", 0) >= 1:
                    break
                time.sleep(0.2)
            else:
                raise AssertionError(f"no canary progress: {current.get('status')}")
            yield str(cluster.kubeconfig_path), ready["status"]["currentRevision"], current


def cli(*args: str, process: bool = False) -> subprocess.CompletedProcess:
    """The real CLI: in a process of its own when `process`, else its `main()` here (a CLI start costs ~1 s)."""
    if process:
        return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=60, cwd="/")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def first_cells(table: str) -> list[str]:
    """The first column of each row of a rich table (wrapped rows continue with an empty first cell)."""
    cells = [line.split("│")[1].strip() for line in table.splitlines() if line.startswith("│")]
    return [cell for cell in cells if cell]


def test_get_shows_dev_modes_tables(running_worker):
    kubeconfig, stable, _ = running_worker
    result = cli("get", "--kubeconfig", kubeconfig, process=True)
    assert result.returncode == 0, result.stderr
    assert "DigitalWorkers" in result.stdout and "Children" in result.stdout
    assert "support-bot" in result.stdout and "qwen2.5-7b" in result.stdout
    assert f"support-bot-{stable}" in result.stdout  # the stable revision's Deployment and ConfigMap
    assert result.stdout.count("Pod ") >= 2 or result.stdout.count("│ Pod") >= 2
    one = cli("get", "support-bot", "-n", "ai", "--kubeconfig", kubeconfig)
    assert one.returncode == 0 and "support-bot" in one.stdout
    missing = cli("get", "nobody", "-n", "ai", "--kubeconfig", kubeconfig)
    assert missing.returncode == 2 and "nobody not found" in missing.stderr


def test_logs_merge_events_and_status_newest_last(running_worker):
    kubeconfig, stable, current = running_worker
    result = cli("logs", "support-bot", "-n", "ai", "--kubeconfig", kubeconfig)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for reason in ("RevisionCreated", "Ready", "RolloutStarted"):  # Events the operator posted
        assert reason in out, reason
    assert "Available=True" in out and "rollout" in out and f"stable {stable}" in out
    # Newest last: RevisionCreated (first deploy) comes before RolloutStarted (the canary).
    assert out.index("RevisionCreated") < out.index("RolloutStarted")
    times = [cell for cell in first_cells(out) if cell != "now"]
    assert times == sorted(times) and len(times) >= 4
    limited = cli("logs", "support-bot", "-n", "ai", "--kubeconfig", kubeconfig, "--limit", "2")
    assert first_cells(limited.stdout) == first_cells(out)[-2:]
    missing = cli("logs", "nobody", "-n", "ai", "--kubeconfig", kubeconfig)
    assert missing.returncode == 2 and "ai/nobody not found" in missing.stderr
    anywhere = cli("logs", "support-bot", "--kubeconfig", kubeconfig)  # the only support-bot: found in "ai"
    assert anywhere.returncode == 0 and "ai/support-bot: Events" in anywhere.stdout
    assert "not found in any namespace" in cli("logs", "nobody", "--kubeconfig", kubeconfig).stderr


def test_status_shows_the_rollout_and_no_cluster_is_a_one_line_error(running_worker, tmp_path):
    kubeconfig, _, _ = running_worker
    status = cli("status", "support-bot", "--kubeconfig", kubeconfig)
    assert status.returncode == 0 and "Canary rollout of ai/support-bot" in status.stdout
    dead = tmp_path / "kubeconfig"
    dead.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "x",
        "clusters": [{"name": "x", "cluster": {"server": "http://127.0.0.1:1"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "x", "context": {"cluster": "x", "user": "u"}}]}))
    result = cli("logs", "support-bot", "--kubeconfig", str(dead))
    assert result.returncode == 2 and "cannot read the cluster" in result.stderr


def test_timeline_pure():
    body = {"metadata": {"name": "w", "namespace": "ai"}, "status": {
        "conditions": [{"type": "Available", "status": "True", "reason": "Ready", "message": "2/2",
                        "lastTransitionTime": "2026-01-01T10:00:05Z"}],
        "rollout": {"phase": "Aborted", "revision": "new", "stableRevision": "old", "step": 2, "weight": 0,
                    "stepStartedAt": 1767261660.0, "abortReason": "error rate 0.4 > 0.02"},  # 10:01:00
        "autoscaling": {"mode": "Auto", "currentReplicas": 2, "desiredReplicas": 3, "action": "scale_up",
                        "reason": "forecast", "holdCondition": None},
        "gpuHealth": {"replacedPods": ["w-old-a"], "taintedNodes": ["gpu-node-1"], "heldBack": 0,
                      "lastCheck": "2026-01-01T10:00:30Z"}}}

    def event(kind, name, reason, when, namespace="ai", type_="Normal"):
        return {"metadata": {"namespace": namespace}, "involvedObject": {"kind": kind, "name": name, "namespace": namespace},
                "reason": reason, "type": type_, "message": reason.lower(), "lastTimestamp": when}

    events = [
        event("DigitalWorker", "w", "RevisionCreated", "2026-01-01T10:00:00Z"),
        event("Pod", "w-old-a", "GpuFault", "2026-01-01T10:00:20Z", type_="Warning"),
        event("Node", "gpu-node-1", "NodeTainted", "2026-01-01T10:00:21Z", namespace="default"),
        event("Node", "gpu-node-2", "NodeTainted", "2026-01-01T10:00:22Z", namespace="default"),  # not ours
        event("DigitalWorker", "other", "Ready", "2026-01-01T10:00:01Z"),  # another worker
        event("Pod", "wx-1", "Started", "2026-01-01T10:00:02Z"),  # a name that only shares a prefix
    ]
    entries = timeline(body, events, limit=None)
    assert [(e.reason, e.time) for e in entries] == [
        ("RevisionCreated", "2026-01-01T10:00:00Z"),
        ("Available=True", "2026-01-01T10:00:05Z"),
        ("GpuFault", "2026-01-01T10:00:20Z"),
        ("NodeTainted", "2026-01-01T10:00:21Z"),
        ("GpuHealth", "2026-01-01T10:00:30Z"),
        ("Aborted", "2026-01-01T10:01:00Z"),
        ("scale_up", ""),  # no lastScaleTime: the current decision, shown last
    ]
    assert "abort: error rate 0.4 > 0.02" in entries[5].message and "2 -> 3" in entries[6].message
    assert [e.reason for e in timeline(body, events, limit=2)] == ["Aborted", "scale_up"]
