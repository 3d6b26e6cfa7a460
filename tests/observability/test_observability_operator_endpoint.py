"""The operator's own /metrics as `digital-worker run --metrics-port` serves it, in a real operator
process on the emulated cluster: every family the dashboard and the alerts read is there from the
start (known label values at 0), and reconcile passes are counted."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from digital_worker.operator.emulator import EmulatedCluster
from digital_worker.operator.kube import KubeClient
from dwtest_support import free_port, wait_http
from promql_names import sample_names

REPO = Path(__file__).resolve().parents[2]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def test_run_serves_the_operator_metrics(tmp_path):
    with EmulatedCluster(namespaces=("default", "team")) as cluster:
        port = free_port()
        env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig_path)}
        log = open(tmp_path / "operator.log", "wb")
        operator = subprocess.Popen(
            [sys.executable, "-m", "digital_worker", "run", "--liveness", f"http://127.0.0.1:{free_port()}/healthz",
             "--metrics-port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        try:
            wait_http(f"http://127.0.0.1:{port}/metrics", timeout=60)
            text = scrape(port)
            for line in ('digitalworker_operator_rollouts_total{result="Aborted",strategy="Canary"} 0.0',
                         'digitalworker_operator_rollouts_total{result="Completed",strategy="BlueGreen"} 0.0',
                         'digitalworker_operator_analysis_verdicts_total{verdict="Inconclusive"} 0.0',
                         'digitalworker_operator_reconcile_errors_total{kind="unexpected"} 0.0'):
                assert line in text, line
            names = sample_names(text)
            for family in ("digitalworker_autoscaler_holding", "digitalworker_autoscaler_current_replicas",
                           "digitalworker_autoscaler_desired_replicas", "digitalworker_autoscaler_decisions_total",
                           "digitalworker_autoscaler_forecast_requests_per_second",
                           "digitalworker_autoscaler_fit_seconds_bucket"):
                assert family in names, family

            kube = KubeClient.from_kubeconfig(str(cluster.kubeconfig_path))
            body = copy.deepcopy(yaml.safe_load((REPO / "examples" / "digitalworker.yaml").read_text()))
            body["metadata"] = {"name": "bot", "namespace": "team"}
            kube.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "support-bot-key", "namespace": "team"},
                         "stringData": {"api-key": "not-a-real-key"}})
            kube.create(body)
            deadline = time.monotonic() + 60
            count = 0.0
            while time.monotonic() < deadline and count < 1:
                line = next((l for l in scrape(port).splitlines()
                             if l.startswith("digitalworker_operator_reconcile_duration_seconds_count")), "x 0")
                count = float(line.split()[-1])
                time.sleep(0.3)
            assert count >= 1, (tmp_path / "operator.log").read_text()[-2000:]
        finally:
            operator.terminate()
            try:
                operator.wait(15)
            except subprocess.TimeoutExpired:
                operator.kill()
                operator.wait()
            log.close()
