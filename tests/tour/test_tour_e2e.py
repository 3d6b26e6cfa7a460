"""`digital-worker dev` end to end, through the CLI in a subprocess, as a new user (and CI) runs it.

The tour at x10 headless: emulated API, the kopf operator, simulated SGLang replicas, simulated GPU
node agents, trace-replaying load, and a real Prometheus (the `prometheus` on PATH, as CI installs
it). Each step is checked from what the tour recorded from the API: the cluster's Events, the
worker's status and the final Deployments/pods/node taints; then the report's files and a chart.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

CLI = [sys.executable, "-c", "import sys; from digital_worker.cli import main; sys.exit(main(sys.argv[1:]))"]
REPO = Path(__file__).resolve().parents[2]


def run_cli(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "160"}
    return subprocess.run(CLI + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def events(data: dict, reason: str) -> list[dict]:
    return [e for e in data["events"] if e["reason"] == reason]


def test_tour_headless_tells_the_whole_story(tmp_path):
    report = tmp_path / "report"
    started = time.monotonic()
    result = run_cli(["dev", "--scenario", "tour", "--headless", "--speed", "10", "--report", str(report),
                      "--kubeconfig-out", str(tmp_path / "kubeconfig")], tmp_path, timeout=240)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "Tour finished" in result.stdout
    data = json.loads((report / "tour.json").read_text())
    steps = {s["name"]: s for s in data["steps"]}
    assert list(steps) == ["deploy", "ramp", "canary", "rollback", "gpu-fault"]
    assert all(s["ok"] and not s["skipped"] for s in steps.values()), steps
    if data["prometheus"] is None:
        pytest.fail("expected the tour to start the `prometheus` on PATH (CI installs it)")

    # Scale-out before the ramp's peak: a Scaled Event from the operator, and spec.replicas above 1.
    ramp = steps["ramp"]["facts"]
    scaled = events(data, "Scaled")
    assert scaled and scaled[0]["t"] <= ramp["peak_at"], (scaled, ramp)
    assert any((s.get("replicas") or 0) > 1 for s in data["samples"] if s["t"] <= ramp["peak_at"])

    # The canary was promoted: analysis passed, then RolloutCompleted for the new revision.
    canary = steps["canary"]["facts"]["revision"]
    assert events(data, "AnalysisPassed")
    assert any(canary in e["message"] for e in events(data, "RolloutCompleted"))
    assert any(s.get("rollout_revision") == canary and 0 < (s.get("canary_weight") or 0) < 100
               for s in data["samples"]), "the canary's weight is recorded while it progresses"

    # The bad version was aborted by analysis and scaled to zero; the promoted revision serves.
    bad = steps["rollback"]["facts"]["revision"]
    aborted = events(data, "RolloutAborted")
    assert any(bad in e["message"] and e["type"] == "Warning" and "analysis failed" in e["message"] for e in aborted)
    final = data["final_state"]
    assert final["status"]["rollout"]["phase"] == "Aborted"
    assert final["status"]["stableRevision"] == canary
    assert final["deployments"][bad]["replicas"] == 0
    assert final["deployments"][canary]["replicas"] >= 2 and final["deployments"][canary]["ready"] >= 1

    # The replica on the faulty GPU was replaced and its node tainted.
    fault = steps["gpu-fault"]["facts"]
    assert fault["pod"] in final["status"]["gpuHealth"]["replacedPods"]
    assert fault["pod"] not in final["pods"]
    assert "digitalworker.io/gpu-unhealthy" in final["node_taints"][fault["node"]]

    # Load was real: requests answered by each revision; HTTP 500s only from the bad one (streams cut
    # by a replica going away, e.g. the one on the faulty GPU, are counted apart).
    by_revision = data["requests"]["by_revision"]
    assert by_revision[canary]["ok"] > 0 and by_revision[bad]["http_5xx"] > 0
    assert by_revision[canary]["http_5xx"] == 0

    # The report: every chart, the summary, and a chart that is not blank.
    for name in ("load.png", "forecast.png", "replicas.png", "ttft_p95.png", "rollout_weights.png", "summary.md"):
        assert (report / name).stat().st_size > 0, name
    summary = (report / "summary.md").read_text()
    assert "all steps passed" in summary and "RolloutAborted" in summary
    import matplotlib.image

    pixels = matplotlib.image.imread(report / "replicas.png")
    assert pixels.shape[0] > 100 and pixels[..., :3].std() > 0.05
    print(f"tour took {elapsed:.0f}s")


def test_no_tour_still_serves_like_before(tmp_path):
    result = run_cli(["dev", "--no-tour", "--duration", "3", "--kubeconfig-out", str(tmp_path / "kubeconfig")],
                     tmp_path, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "DigitalWorker support-bot is Ready" in result.stdout
    assert "Simulated SGLang replicas: http://127.0.0.1:" in result.stdout
    assert (tmp_path / "kubeconfig").exists()
    assert not (tmp_path / ".digital-worker" / "report").exists()


def test_one_story_against_a_prometheus_the_user_runs(tmp_path):
    """`--scenario rollback --prometheus URL`: the operator judges the canary from that Prometheus,
    which scrapes the simulated replicas from the file_sd file dev mode keeps up to date."""
    from digital_worker.operator.devprom import PrometheusLauncher

    report = tmp_path / "report"
    with PrometheusLauncher(tmp_path / "prometheus", file_sd=[report / "prometheus-targets.json"]) as prometheus:
        result = run_cli(["dev", "--scenario", "rollback", "--headless", "--speed", "10", "--report", str(report),
                          "--prometheus", prometheus.url, "--kubeconfig-out", str(tmp_path / "kubeconfig")],
                         tmp_path, timeout=180)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        # The replicas are gone (their series stale): look back over the run.
        scraped = prometheus.query('count by (digitalworker_io_revision) '
                                   '(max_over_time({__name__=~"sglang[:_]num_requests_total"}[5m]))')
    data = json.loads((report / "tour.json").read_text())
    assert data["prometheus"] == prometheus.url
    assert [s["name"] for s in data["steps"]] == ["deploy", "traffic", "rollback"]
    bad = data["steps"][-1]["facts"]["revision"]
    assert any(bad in e["message"] and "analysis failed" in e["message"] for e in events(data, "RolloutAborted"))
    assert {s["metric"]["digitalworker_io_revision"] for s in scraped} >= {bad, data["steps"][0]["facts"]["revision"]}
