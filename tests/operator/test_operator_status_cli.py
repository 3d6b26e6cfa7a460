"""`digital-worker status`: the rollout and its analysis as tables, and a clear error without a cluster."""
from __future__ import annotations

import subprocess
import sys

from rich.console import Console

from digital_worker.operator.commands import rollout_tables
from dwtest_support import free_port


def render(tables) -> str:
    console = Console(width=160, record=True)
    for table in tables:
        console.print(table)
    return console.export_text()


def test_rollout_tables_show_weights_and_last_analysis_values():
    body = {"metadata": {"namespace": "ai", "name": "bot"}, "status": {"rollout": {
        "strategy": "Canary", "phase": "Aborted", "revision": "b2c9", "stableRevision": "c4ea", "step": 1,
        "weight": 0, "exact": True, "message": "aborted: analysis failed",
        "analysis": {"phase": "Failed", "runs": 2, "lastVerdict": "Failed", "checks": [
            {"name": "maxErrorRate", "metric": "error_rate", "value": 0.0512, "baseline": 0.001, "threshold": 0.01,
             "verdict": "Failed", "message": "0.0512 > 0.01"},
            {"name": "maxTTFTP95Ratio", "metric": "ttft_p95", "value": None, "baseline": None, "threshold": 1.5,
             "verdict": "Inconclusive", "message": "no data"}]}}}}
    text = render(rollout_tables(body))
    assert "Canary rollout of ai/bot" in text and "Aborted" in text and "b2c9" in text and "c4ea" in text
    assert "0.0512" in text and "maxErrorRate" in text and "Failed" in text and "Inconclusive" in text
    assert "2 run(s)" in text


def test_bluegreen_table_names_the_active_revision():
    body = {"metadata": {"namespace": "ai", "name": "bot"}, "status": {"rollout": {
        "strategy": "BlueGreen", "phase": "Progressing", "revision": "new1", "stableRevision": "old1", "step": 7,
        "weight": 100, "active": "new1", "message": "old1 stays warm 250s more"}}}
    text = render(rollout_tables(body))
    assert "BlueGreen rollout" in text and "Active" in text and "new1" in text
    assert rollout_tables({"metadata": {"namespace": "a", "name": "b"}, "status": {}}) == []


def test_status_without_a_reachable_cluster_is_one_line_and_exit_2(tmp_path):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(f"""apiVersion: v1
kind: Config
current-context: c
clusters: [{{name: c, cluster: {{server: "http://127.0.0.1:{free_port()}"}}}}]
users: [{{name: u, user: {{token: t}}}}]
contexts: [{{name: c, context: {{cluster: c, user: u}}}}]
""")
    result = subprocess.run([sys.executable, "-m", "digital_worker", "status", "--kubeconfig", str(kubeconfig)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "cannot read the cluster" in result.stderr
