"""The agent as a real process: the no-NVML path, HTTP behaviour, Prometheus scraping it, XIDs."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

from agent_process import AgentProcess


def test_without_nvml_the_agent_starts_reports_down_and_stays_healthy(tmp_path):
    # The real nvidia-ml-py path: this machine has no driver.
    with AgentProcess(tmp_path, fake_gpus=None) as agent:
        for _ in range(3):
            assert agent.get("/healthz") == (200, "ok\n")
            assert agent.get("/readyz") == (200, "ok\n")
            status, body = agent.get("/metrics")
            assert status == 200
            assert 'digital_worker_nvml_up{Hostname="gpu-node-1"} 0' in body
            assert "DCGM_FI_DEV_GPU_UTIL" not in body
            time.sleep(0.6)
        assert agent.process.poll() is None
        output = agent.output()
    assert output.count("NVML unavailable") == 1
    assert "Traceback" not in output


def test_sigterm_stops_cleanly(tmp_path):
    agent = AgentProcess(tmp_path)
    with agent:
        agent.process.send_signal(signal.SIGTERM)
        assert agent.process.wait(timeout=10) == 0


def test_http_paths_methods_and_keep_alive(tmp_path):
    with AgentProcess(tmp_path) as agent:
        assert agent.get("/nope")[0] == 404
        assert agent.get("/metrics?debug=1")[0] == 200
        with socket.create_connection(("127.0.0.1", agent.port), timeout=5) as conn:
            stream = conn.makefile("rwb")
            for _ in range(2):  # two requests on one connection, as Prometheus does
                stream.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n\r\n")
                stream.flush()
                status = stream.readline()
                headers = {}
                while (line := stream.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode().partition(":")
                    headers[name.lower()] = value.strip()
                body = stream.read(int(headers["content-length"]))
                assert status.startswith(b"HTTP/1.1 200")
                assert headers["content-type"].startswith("text/plain; version=0.0.4")
                assert b"DCGM_FI_DEV_GPU_UTIL" in body
            stream.write(b"HEAD /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")
            stream.flush()
            head = stream.read()
            assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n")  # no body
        with socket.create_connection(("127.0.0.1", agent.port), timeout=5) as conn:
            conn.sendall(b"POST /metrics HTTP/1.0\r\n\r\n")
            assert conn.recv(100).startswith(b"HTTP/1.1 405")
        with socket.create_connection(("127.0.0.1", agent.port), timeout=5) as conn:
            conn.sendall(b"garbage\r\n\r\n")
            assert conn.recv(100).startswith(b"HTTP/1.1 400")
        assert agent.get("/healthz")[0] == 200  # still serving after bad clients


def test_prometheus_scrapes_the_agent_and_sees_an_injected_xid(tmp_path, prometheus):
    with AgentProcess(tmp_path, fake_gpus=8, node_name="gpu-node-7") as agent:
        prometheus.set_targets("gpu-agent", [f"127.0.0.1:{agent.port}"])
        util = prometheus.wait_for('DCGM_FI_DEV_GPU_UTIL{Hostname="gpu-node-7"}', timeout=30,
                                   predicate=lambda result: len(result) == 8)
        assert {series["metric"]["gpu"] for series in util} == {str(i) for i in range(8)}
        assert util[0]["metric"]["modelName"] == "NVIDIA H100 80GB HBM3"
        # Counters arrive under dcgm-exporter's exact names.
        assert len(prometheus.query("DCGM_FI_DEV_PCIE_REPLAY_COUNTER")) == 8
        assert prometheus.query("digital_worker_nvml_up")[0]["value"][1] == "1"
        # Queries in the style of NVIDIA's DCGM exporter Grafana dashboard work unchanged.
        for promql, series in (('avg by (gpu, Hostname) (DCGM_FI_DEV_GPU_TEMP{Hostname=~"gpu-node-7"})', 8),
                               ("sum by (Hostname) (DCGM_FI_DEV_POWER_USAGE)", 1),
                               ('DCGM_FI_DEV_SM_CLOCK{gpu=~"0|1"} * 1000000', 2),
                               ("DCGM_FI_DEV_FB_USED / (DCGM_FI_DEV_FB_USED + DCGM_FI_DEV_FB_FREE)", 8),
                               ("rate(DCGM_FI_DEV_PCIE_REPLAY_COUNTER[1m])", 8)):
            assert len(prometheus.wait_for(promql, timeout=30)) == series, promql

        agent.inject_xid(5, 79)
        xid = prometheus.wait_for("DCGM_FI_DEV_XID_ERRORS > 0", timeout=30)
        assert [(s["metric"]["gpu"], s["value"][1]) for s in xid] == [("5", "79")]
        unhealthy = prometheus.wait_for("digital_worker_gpu_healthy == 0", timeout=30)
        assert [s["metric"]["UUID"] for s in unhealthy] == ["GPU-fa4e0000-0000-4000-8000-000000000005"]
        counted = prometheus.wait_for('digital_worker_gpu_xid_errors_total{xid="79"}', timeout=30)
        assert counted[0]["value"][1] == "1"


def test_cli_rejects_bad_options_without_traceback():
    result = subprocess.run([sys.executable, "-m", "digital_worker.agents", "agent", "--interval", "0"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--interval" in result.stderr and "Traceback" not in result.stderr
