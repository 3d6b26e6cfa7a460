"""The operator's periodic work: each worker's autoscaling tick (called by its kopf timer), and across
all DigitalWorkers GPU health checks, clock-driven rollout and fallback passes and (without Prometheus)
scraping the revisions of rollouts in progress for their analysis.

Glue only: the decisions are made by `autoscaling.controller.Autoscaler` (forecast policy) and
`gpu_health.decide` (pure); this module reads the inputs, applies the outcomes through the API
(the scale subresource, pod deletions, node taints) and records them in status and Events.
Blocking API calls run in the reconciler's thread pool, never on the event loop.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

from digital_worker.operator import fallback
from digital_worker.operator import pods as pods_module
from digital_worker.operator import schema as api
from digital_worker.operator.kube import KubeClient, NotFound
from digital_worker.operator.reconcile import Event

logger = logging.getLogger("digital_worker.operator")

INSTANCE_LABEL = api.LABEL_INSTANCE


def prometheus_selector(namespace: str, name: str) -> str:
    """PromQL matcher of a worker's replicas: pods carry `digitalworker.io/instance`, which the
    scrape configs (`kubernetes-pods` labelmap, PodMonitor podTargetLabels) expose as below.

    Every revision counts (during a rollout the autoscaler sizes the total), but not the fallback
    model's pods: they carry the worker's instance label too, and their load, queue and latency
    are another model's, which must not size the primary."""
    return (f'namespace="{namespace}",digitalworker_io_instance="{name}",'
            f'digitalworker_io_revision!="{fallback.FALLBACK}"')


class WorkerAutoscaling:
    """The operator's autoscaling for every worker: each worker's kopf timer (handlers.py) calls
    `tick_if_due`, which ticks it when its own `spec.autoscaling.intervalSeconds` has passed."""

    # kopf timers run on a grid and drift by the handler's own duration: a tick this early still counts.
    DUE_TOLERANCE_SECONDS = 1.0

    def __init__(self, client: KubeClient, run_sync: Callable, post_event: Callable,
                 prometheus_url: str | None) -> None:
        from digital_worker.operator.autoscaling.controller import Autoscaler
        from digital_worker.operator.autoscaling.metrics import (InMemoryMetricsSource, InProcessScraper,
                                                                 PrometheusMetricsSource)

        self.client = client
        self.run_sync = run_sync
        self.post_event = post_event
        from digital_worker.operator.metrics import operator_metrics

        self.autoscaler = Autoscaler(metrics=operator_metrics().autoscaler)
        self.prometheus = PrometheusMetricsSource(prometheus_url) if prometheus_url else None
        self.memory = InMemoryMetricsSource()
        self.scraper = InProcessScraper(self.memory)
        self._next_tick: dict[str, float] = {}
        self._last: dict[str, tuple[str, str | None]] = {}
        # Ticks share the reconciler's thread pool: a burst of due timers must not queue its API
        # calls ahead of reconcile passes (measured: create -> first Deployment p99 x3 at 1,000 workers).
        self._ticks_at_once = asyncio.Semaphore(self.CONCURRENT_TICKS)

    CONCURRENT_TICKS = 2

    def due(self, key: str, interval_seconds: float, now: float) -> bool:
        """Whether `key` should tick now; if so, books its next tick."""
        if now < self._next_tick.get(key, 0.0) - self.DUE_TOLERANCE_SECONDS:
            return False
        self._next_tick[key] = now + interval_seconds
        return True

    async def tick_if_due(self, body: dict[str, Any], now: float | None = None) -> bool:
        """One worker's timer fired: tick it if its interval is due (Off and deleting workers never)."""
        now = time.time() if now is None else now
        autoscaling = (body.get("spec") or {}).get("autoscaling") or {}
        meta = body["metadata"]
        key = f"{meta['namespace']}/{meta['name']}"
        if autoscaling.get("mode", "Off") == "Off" or meta.get("deletionTimestamp"):
            self._next_tick.pop(key, None)
            return False
        if not (body.get("status") or {}).get("currentRevision"):
            return False  # not reconciled yet: no Deployment to size, and no replica has metrics
        if not self.due(key, float(autoscaling.get("intervalSeconds", 20)), now):
            return False
        async with self._ticks_at_once:
            await self.tick(body, now)
        return True

    def forget(self, key: str) -> None:
        """A deleted worker: drop its schedule, its last decision and the autoscaler's state."""
        self._next_tick.pop(key, None)
        self._last.pop(key, None)
        self.autoscaler.forget(key)

    async def tick(self, body: dict[str, Any], now: float) -> None:
        meta, spec, status = body["metadata"], body.get("spec") or {}, body.get("status") or {}
        key = f"{meta['namespace']}/{meta['name']}"
        replicas = int(spec.get("replicas", 1))
        pods = await self.run_sync(self.client.list, "v1", "pods", meta["namespace"],
                                   f"{INSTANCE_LABEL}={meta['name']}")
        # The node agents label GPU series by pod: the autoscaler reads its pods' GPUs when present.
        gpu_pods = (meta["namespace"], tuple(sorted(p["metadata"]["name"] for p in pods)))
        if self.prometheus is not None:
            source, selector = self.prometheus, prometheus_selector(meta["namespace"], meta["name"])
        else:  # the embedded default: scrape the replicas ourselves
            addresses = [a for a in (pods_module.metrics_url(p) for p in pods) if a]
            await self.run_sync(self.scraper.scrape, key, addresses, now)
            source, selector = self.memory, key
        decision, autoscaling_status = await self.autoscaler.tick(
            key, spec.get("autoscaling"), replicas, int(status.get("readyReplicas", 0)), now, source,
            selector=selector, gpu_pods=gpu_pods)
        mode = autoscaling_status.get("mode")
        if mode == "Auto" and decision.desired_replicas != replicas:
            await self.run_sync(self.client.patch, api.API_VERSION, api.PLURAL, meta["namespace"], meta["name"],
                                {"spec": {"replicas": decision.desired_replicas}}, "scale")
            await self.run_sync(self.post_event, body, Event(
                "Normal", "Scaled", f"replicas {replicas} -> {decision.desired_replicas}: {decision.reason}"))
        elif mode == "DryRun" and decision.desired_replicas != replicas and \
                self._last.get(key, ("", None))[0] != f"{decision.action}:{decision.desired_replicas}":
            await self.run_sync(self.post_event, body, Event(
                "Normal", "WouldScale", f"DryRun: would scale {replicas} -> {decision.desired_replicas}: "
                                        f"{decision.reason}"))
        previous_hold = self._last.get(key, ("", None))[1]
        if decision.hold_condition and decision.hold_condition != previous_hold:
            await self.run_sync(self.post_event, body, Event("Warning", decision.hold_condition, decision.reason))
        self._last[key] = (f"{decision.action}:{decision.desired_replicas}", decision.hold_condition)
        try:
            await self.run_sync(self.client.patch, api.API_VERSION, api.PLURAL, meta["namespace"], meta["name"],
                                {"status": {"autoscaling": autoscaling_status}}, "status")
        except NotFound:
            self.autoscaler.forget(key)


class GpuHealthLoop:
    """Replaces replicas on faulty GPUs and taints their nodes, from the node agents' metrics: through
    Prometheus, or without it from the agents' own /metrics (those announced on their Node)."""

    def __init__(self, client: KubeClient, prometheus_url: str | None, max_unavailable_share: float = 0.25) -> None:
        self.client = client
        self.prometheus_url = prometheus_url
        self.max_unavailable_share = max_unavailable_share
        self._states: dict[str, Any] = {}

    def check_sync(self, bodies: list[dict[str, Any]]) -> None:
        from kubernetes import client as k8s

        from digital_worker.operator import gpu_health

        try:
            if self.prometheus_url:
                samples = tuple(gpu_health.fetch_gpu_health(self.prometheus_url))
            else:
                endpoints = gpu_health.agent_endpoints(self.client.list("v1", "nodes"))
                samples = tuple(gpu_health.fetch_gpu_health_from_agents(endpoints))
        except gpu_health.GpuHealthUnavailable as exc:
            logger.info("GPU health unknown this round: %s", exc)
            return
        if not any(sample.fault() for sample in samples):
            return
        nodes = self.client.list("v1", "nodes")
        tainted = frozenset(n["metadata"]["name"] for n in nodes
                            if any(t.get("key") == gpu_health.TAINT_KEY for t in (n.get("spec") or {}).get("taints") or []))
        core = k8s.CoreV1Api(self.client.api_client)
        for body in bodies:
            meta = body["metadata"]
            key = f"{meta['namespace']}/{meta['name']}"
            pods = self.client.list("v1", "pods", meta["namespace"], f"{INSTANCE_LABEL}={meta['name']}")
            infos = tuple(gpu_health.PodInfo(
                p["metadata"]["name"], (p.get("spec") or {}).get("nodeName", ""),
                pods_module.is_ready(p),
                bool(p["metadata"].get("deletionTimestamp"))) for p in pods)
            names = {info.name for info in infos}
            relevant = tuple(s for s in samples if s.pod in names or (s.pod is None and s.namespace is None))
            if not any(s.fault() for s in relevant):
                continue
            context = gpu_health.GpuHealthContext(
                namespace=meta["namespace"], pods=infos, samples=relevant, tainted_nodes=tainted,
                replicas=int((body.get("spec") or {}).get("replicas", 1)),
                max_unavailable_share=self.max_unavailable_share,
                **({"state": self._states[key]} if key in self._states else {}))
            decision, self._states[key] = gpu_health.decide(context)
            gpu_health.apply_gpu_health_decision(core, meta["namespace"], decision)
            if decision.delete_pods or decision.taint_nodes or decision.held_back:
                self.client.patch(api.API_VERSION, api.PLURAL, meta["namespace"], meta["name"], {"status": {
                    "gpuHealth": {
                        "replacedPods": sorted(self._states[key].replaced_pods),
                        "taintedNodes": sorted({t.node for t in decision.taint_nodes} | set(tainted)),
                        "heldBack": len(decision.held_back),
                        "lastCheck": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    }}}, "status")


def thread_pool_runner(reconciler: Any) -> Callable:
    """`await run_sync(fn, *args)`: a blocking call in the reconciler's thread pool, off the event loop."""
    async def run_sync(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(reconciler.executor, fn, *args)
    return run_sync


def worker_autoscaling(reconciler: Any, prometheus_url: str | None) -> WorkerAutoscaling:
    """Without a Prometheus URL the autoscaler scrapes each worker's replicas itself."""
    return WorkerAutoscaling(reconciler.client, thread_pool_runner(reconciler), reconciler.post_event,
                             prometheus_url)


async def run_periodic(reconciler: Any, prometheus_url: str | None, *, tick_seconds: float = 1.0,
                       gpu_interval: float = 15.0) -> None:
    """The loops across all workers, until cancelled; workers come from the kopf index the handlers
    hand over.

    Without a Prometheus URL the operator measures for itself: rollout analysis reads
    `RolloutScraper`'s scrapes of rollouts in progress (set as the reconciler's
    `analysis_provider`), and GPU health reads the node agents' pages directly."""
    run_sync = thread_pool_runner(reconciler)
    gpu = GpuHealthLoop(reconciler.client, prometheus_url)
    analysis_scraper = None
    if prometheus_url is None:
        from digital_worker.operator.inprocess_analysis import RolloutScraper

        analysis_scraper = RolloutScraper()
        reconciler.analysis_provider = analysis_scraper.provider

    def list_worker_pods(namespace: str, name: str) -> list[dict[str, Any]]:
        return reconciler.client.list("v1", "pods", namespace, f"{INSTANCE_LABEL}={name}")

    next_gpu_check = 0.0
    fallback_evaluated: dict[tuple[str, str], float] = {}  # fallback breakers tick on the clock (fallback.py)
    while True:
        await asyncio.sleep(tick_seconds)
        bodies = [body for store in list((reconciler.workers or {}).values()) for body in store]
        if analysis_scraper is not None:
            await analysis_scraper.tick_all(bodies, list_worker_pods, run_sync)
        for body in bodies:  # canary pauses and analyses run on the clock, not only on events
            if ((body.get("status") or {}).get("rollout") or {}).get("phase") == "Progressing" or \
                    fallback.evaluation_due(body, fallback_evaluated, time.monotonic()):
                reconciler.schedule(body)
        if time.monotonic() >= next_gpu_check:
            next_gpu_check = time.monotonic() + gpu_interval
            try:
                await run_sync(gpu.check_sync, bodies)
            except Exception:
                logger.exception("GPU health check failed")
