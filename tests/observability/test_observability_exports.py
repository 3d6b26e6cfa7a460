"""The dashboard and the alerts against what we really export.

A simulated SGLang replica under load (30% of requests failing), a node agent on the fake NVML with an
XID injected, and the operator's metrics endpoint served as `digital-worker run --metrics-port`
serves it (after a real autoscaler tick and recorded rollout/analysis results) are scraped by a real
Prometheus. Then: every metric name a dashboard query or an alert references is in those scrapes
(Kubernetes' own CPU series aside), every dashboard query parses and runs on that Prometheus, and the
data-plane panels (SGLang, GPUs) and the operator's panels show data. The alerts' conditions hold
on exactly the faults present (failing replica, fatal XID, aborted canary).
"""
from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
import urllib.request

import aiohttp
import prometheus_client
from digital_worker.agents import nvml_fake
from digital_worker.agents.agent import AgentConfig, NodeAgent
from digital_worker.operator.autoscaling.controller import Autoscaler
from digital_worker.operator.autoscaling.metrics import InMemoryMetricsSource, InProcessScraper
from digital_worker.operator.metrics import operator_metrics, record_analysis_verdict, record_rollout_result
from digital_worker.runtime.sim import SimConfig, SimulatedSGLang
from digital_worker.stacks.observability import alerts, grafana
from digital_worker.stacks.observability.promql import PLATFORM_METRICS
from dwtest_support import free_port
from promql_names import referenced, sample_names, unknown_names

WORKER_LABELS = {"namespace": "team", "digitalworker_io_instance": "bot", "digitalworker_io_revision": "r1"}
# What Grafana puts in place of its variables when everything is selected.
GRAFANA_VARIABLES = {"$__rate_interval": "30s", "$namespace": ".*", "$worker": ".*"}


def fetch(url: str, accept: str | None = None) -> str:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read().decode()


def instant_query(prometheus_url: str, expr: str) -> dict:
    """The raw answer: a PromQL parse error is HTTP 400 with errorType bad_data."""
    request = urllib.request.Request(f"{prometheus_url}/api/v1/query",
                                     data=urllib.parse.urlencode({"query": expr}).encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)
    except urllib.error.HTTPError as error:
        return json.load(error)


async def send_traffic(url: str, count: int) -> dict[int, int]:
    """Streaming and non-streaming chat completions; returns the count per HTTP status."""
    statuses: dict[int, int] = {}

    async def one(session: aiohttp.ClientSession, index: int) -> None:
        body = {"model": "sim", "max_tokens": 8, "stream": index % 2 == 0,
                "messages": [{"role": "user", "content": f"hello {index}"}]}
        async with session.post(f"{url}/v1/chat/completions", json=body) as response:
            await response.read()
            statuses[response.status] = statuses.get(response.status, 0) + 1

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(one(session, i) for i in range(count)))
    return statuses


async def test_dashboard_and_alerts_use_exported_metrics_and_run_on_prometheus(prometheus):
    server = SimulatedSGLang(SimConfig(port=0, host="127.0.0.1", model_name="sim", cold_start_seconds=0.0,
                                       error_rate=0.3, seed=7))
    await server.start()
    nvml_fake.fake_configure(gpus=2)
    agent = NodeAgent(AgentConfig(port=0, listen_address="127.0.0.1", interval=0.2, pod_resources_socket=None),
                      nvml=nvml_fake)
    agent_port = agent.start()
    operator_port = free_port()
    operator_metrics()  # as `digital-worker run --metrics-port` does (operator/runner.py)
    httpd, _ = prometheus_client.start_http_server(operator_port, addr="127.0.0.1")
    autoscaler = Autoscaler(metrics=operator_metrics().autoscaler)
    try:
        nvml_fake.fake_inject_xid(1, 79)
        statuses = await send_traffic(server.url, 40)
        assert statuses.get(200, 0) > 10 and statuses.get(500, 0) > 0, statuses
        # The operator's side: one real autoscaler tick from the in-process scraper, one rollout, one verdict.
        memory = InMemoryMetricsSource()
        await asyncio.to_thread(InProcessScraper(memory).scrape, "team/bot", [server.url.split("//")[1]])
        await autoscaler.tick("team/bot", {"mode": "DryRun", "minReplicas": 1, "maxReplicas": 4}, 1, 1,
                              time.time(), memory)

        await asyncio.to_thread(prometheus.set_targets, "sglang", [server.url.split("//")[1]], WORKER_LABELS)
        await asyncio.to_thread(prometheus.set_targets, "agent", [f"127.0.0.1:{agent_port}"])
        await asyncio.to_thread(prometheus.set_targets, "operator", [f"127.0.0.1:{operator_port}"])
        for ready in ('{__name__=~"sglang[:_]num_requests_total"}', "digital_worker_gpu_xid_errors_total",
                      "digitalworker_operator_rollouts_total"):
            await asyncio.to_thread(prometheus.wait_for, ready, 60.0)
        # Recorded after Prometheus saw the counters at 0 (created at registration), as in a running
        # operator: so increase() sees the first abort.
        record_rollout_result("Canary", "Aborted")
        record_analysis_verdict("Failed")
        await send_traffic(server.url, 20)  # more samples inside the rate windows
        await asyncio.sleep(4)

        # What we export, from real scrapes: both exposition formats of the simulator, the agent, the operator.
        exported: set[str] = set()
        for url in (f"{server.url}/metrics", f"http://127.0.0.1:{agent_port}/metrics",
                    f"http://127.0.0.1:{operator_port}/metrics"):
            exported |= sample_names(await asyncio.to_thread(fetch, url))
        openmetrics = await asyncio.to_thread(fetch, f"{server.url}/metrics",
                                              "application/openmetrics-text; version=1.0.0")
        exported |= {line.split("{")[0].split(" ")[0] for line in openmetrics.splitlines()
                     if line and not line.startswith("#")}
        stored = set(json.loads(await asyncio.to_thread(
            fetch, f"{prometheus.url}/api/v1/label/__name__/values"))["data"])
        assert any(name.startswith("sglang") for name in stored)
        exported |= stored
        assert "digitalworker_autoscaler_holding" in exported and "DCGM_FI_DEV_GPU_TEMP" in exported

        board = grafana.dashboard()
        queries = grafana.queries(board)
        assert len(queries) > 30
        problems = {q: unknown_names(q, exported) for q in queries}
        assert not {q: p for q, p in problems.items() if p}, "dashboard queries reference metrics nobody exports"
        for rule in alerts.alert_rules():
            missing = [n for n in unknown_names(rule["expr"], exported) if n not in PLATFORM_METRICS]
            assert not missing, (rule["alert"], missing)

        panel_queries = [t["expr"] for panel in board["panels"] for t in panel.get("targets", [])]
        empty = []
        for expr in queries:
            concrete = expr
            for variable, value in GRAFANA_VARIABLES.items():
                concrete = concrete.replace(variable, value)
            answer = await asyncio.to_thread(instant_query, prometheus.url, concrete)
            assert answer["status"] == "success", (expr, answer)
            if not answer["data"]["result"] and expr in panel_queries:
                empty.append(expr)
        # Only the forecast (and its error) needs hours of history; everything else shows data already.
        needs_history = {"digitalworker_autoscaler_forecast_requests_per_second",
                         "digitalworker_autoscaler_forecast_abs_error"}
        assert [e for e in empty if not referenced(e)[0] <= needs_history] == []
        assert len(empty) <= 2
        # The alerts' conditions (without their `for`) on the same real series: the failing replica,
        # the fatal XID and the aborted canary show; nothing else does.
        firing: dict[str, list[dict]] = {}
        for rule in alerts.alert_rules():
            answer = await asyncio.to_thread(instant_query, prometheus.url, rule["expr"])
            assert answer["status"] == "success", (rule["alert"], answer)
            if answer["data"]["result"]:
                firing[rule["alert"]] = [r["metric"] for r in answer["data"]["result"]]
        assert set(firing) == {"DigitalWorkerHighErrorRate", "DigitalWorkerGPUXidError", "DigitalWorkerGPUFatalXid",
                               "DigitalWorkerRolloutAborted"}, firing
        assert firing["DigitalWorkerHighErrorRate"] == [{"namespace": "team", "digitalworker_io_instance": "bot"}]
        assert [(m["gpu"], m["xid"]) for m in firing["DigitalWorkerGPUFatalXid"]] == [("1", "79")]
        assert firing["DigitalWorkerRolloutAborted"] == [{"strategy": "Canary"}]
        # The annotations only draw when something happened: here, the aborted canary.
        rollout_annotation = next(a for a in board["annotations"]["list"] if a.get("name") == "Rollouts")
        answer = await asyncio.to_thread(instant_query, prometheus.url, rollout_annotation["expr"])
        assert {r["metric"]["result"] for r in answer["data"]["result"]} == {"Aborted"}
    finally:
        httpd.shutdown()
        httpd.server_close()
        autoscaler.close()
        agent.stop()
        await server.stop()
