"""The glue between kopf's handlers and the plain reconcile logic: serialization, threads, status, events.

- One reconcile at a time per DigitalWorker; triggers that arrive meanwhile coalesce into one more pass.
- The kubernetes client is synchronous, so passes run in a thread pool, never on the event loop.
- Status is patched once per pass and only when it changed; Events are posted for transitions.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import time
import uuid
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any

from digital_worker.operator import reconcile as reconcile_module
from digital_worker.operator import schema as api
from digital_worker.operator.metrics import operator_metrics
from digital_worker.operator.kube import Conflict, KubeClient, NotFound, TransientError

logger = logging.getLogger("digital_worker.operator")


class RetryLater(Exception):
    """A transient failure (API 5xx/429/409, connection): the handler turns it into kopf.TemporaryError."""

    def __init__(self, message: str, delay: float = 5.0) -> None:
        super().__init__(message)
        self.delay = delay


@dataclass(frozen=True)
class OperatorSettings:
    resync_seconds: float = 60.0
    threads: int = 16
    worker_limit: int | None = None
    kubeconfig: str | None = None
    prometheus_url: str | None = None


def settings_from_env() -> OperatorSettings:
    """Settings come from the environment so that the same handlers serve `run`, `dev` and the tests."""
    return OperatorSettings(
        resync_seconds=float(os.environ.get("DW_RESYNC_SECONDS", "60")),
        threads=int(os.environ.get("DW_OPERATOR_THREADS", "8")),
        worker_limit=int(os.environ["DW_WORKER_LIMIT"]) if os.environ.get("DW_WORKER_LIMIT") else None,
        kubeconfig=os.environ.get("KUBECONFIG") or None,
        prometheus_url=os.environ.get("DW_PROMETHEUS_URL") or None,
    )


def plain(value: Any) -> Any:
    """A deep plain-dict copy of a kopf Body (a mapping view) that our pure code may keep and mutate."""
    if isinstance(value, Mapping):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value


def raw_body(body: Any) -> Any:
    """The raw dict under a kopf Body, without copying (for read-only use, e.g. child indices)."""
    source = getattr(body, "_src", None)
    return source if isinstance(source, dict) else plain(body)


class Reconciler:
    def __init__(self, client: KubeClient, threads: int = 16, prometheus_url: str | None = None) -> None:
        self.client = client
        self.prometheus_url = prometheus_url
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="reconcile")
        self._latest: dict[tuple[str, str], dict[str, Any]] = {}
        self._running: set[tuple[str, str]] = set()
        self._pending: set[tuple[str, str]] = set()
        self._tasks: set[asyncio.Task] = set()
        # kopf indices of the children by (namespace, owner name), set by the handlers; None: list from the API.
        self.children: dict[str, Any] | None = None
        self.workers: Any = None  # the kopf index of DigitalWorkers, for the resync loop
        # A MetricProvider for rollout analysis when no Prometheus is configured (dev mode's scraper).
        self.analysis_provider: Any = None

    @classmethod
    def from_settings(cls, settings: OperatorSettings) -> "Reconciler":
        return cls(KubeClient.from_kubeconfig(settings.kubeconfig), threads=settings.threads,
                   prometheus_url=settings.prometheus_url)

    def schedule(self, body: dict[str, Any]) -> None:
        """Fire-and-forget reconcile (child events); failures are logged and retried by the resync timer."""
        task = asyncio.create_task(self._run_logged(body))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_logged(self, body: dict[str, Any]) -> None:
        try:
            await self.run(body)
        except RetryLater as exc:
            logger.info("reconcile of %s/%s will be retried in %.0fs: %s", body["metadata"].get("namespace"),
                        body["metadata"].get("name"), exc.delay, exc)
            asyncio.get_running_loop().call_later(exc.delay, self.schedule, body)
        except Exception:
            logger.exception("reconcile failed")

    async def resync_forever(self, interval: float) -> None:
        """Re-check every worker each `interval` (drift repair, status refresh), spread over the interval."""
        while True:
            await asyncio.sleep(interval)
            bodies = [body for store in list((self.workers or {}).values()) for body in store]
            for body in bodies:
                self.schedule(body)
                await asyncio.sleep(min(interval / max(len(bodies), 1), 0.05))

    async def run(self, body: dict[str, Any]) -> None:
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        latest = self._latest.get(key)
        if latest is None or _newer(body, latest):
            self._latest[key] = body
        if key in self._running:
            self._pending.add(key)
            return
        self._running.add(key)
        try:
            while True:
                self._pending.discard(key)
                await self._pass(self._latest[key])
                if key not in self._pending:
                    break
        finally:
            self._running.discard(key)

    async def _pass(self, body: dict[str, Any]) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            await loop.run_in_executor(self.executor, self.reconcile_sync, body)
        except (TransientError, Conflict) as exc:
            operator_metrics().reconcile_errors.labels("transient").inc()
            raise RetryLater(str(exc)) from None
        except Exception:
            operator_metrics().reconcile_errors.labels("unexpected").inc()
            raise
        finally:
            operator_metrics().reconcile_seconds.observe(time.perf_counter() - started)

    def reconcile_sync(self, body: dict[str, Any]) -> reconcile_module.Result:
        result = reconcile_module.reconcile(body, self.client, self.observed(body), prometheus_url=self.prometheus_url,
                                           analysis_provider=self.analysis_provider)
        meta = body["metadata"]
        old_status = body.get("status") or {}
        if reconcile_module.status_changed(old_status, result.status):
            try:
                patched = self.client.patch(api.API_VERSION, api.PLURAL, meta["namespace"], meta["name"],
                                            {"status": result.status}, subresource="status")
            except NotFound:  # deleted while we worked: its children go with it
                return result
            # Later passes on this body must see the status we wrote (for transitions and events),
            # and an older copy from the watch (lower resourceVersion) must not replace it.
            body["status"] = (patched or {}).get("status", result.status)
            version = ((patched or {}).get("metadata") or {}).get("resourceVersion")
            if version:
                body["metadata"]["resourceVersion"] = version
        for event in result.events:
            self.post_event(body, event)
        return result

    def observed(self, body: dict[str, Any]) -> reconcile_module.Observed | None:
        if self.children is None:
            return None
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        return reconcile_module.Observed({plural: list(index.get(key, [])) for plural, index in self.children.items()})

    def post_event(self, body: dict[str, Any], event: reconcile_module.Event) -> None:
        meta = body["metadata"]
        now = reconcile_module.utc_now()
        try:
            self.client.create({
                "apiVersion": "v1", "kind": "Event",
                "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}", "namespace": meta["namespace"]},
                "involvedObject": {"apiVersion": api.API_VERSION, "kind": api.KIND, "name": meta["name"],
                                   "namespace": meta["namespace"], "uid": meta.get("uid")},
                "type": event.type, "reason": event.reason, "message": event.message[:1024],
                "source": {"component": "digital-worker-operator"},
                "firstTimestamp": now, "lastTimestamp": now, "count": 1,
                "reportingComponent": "digital-worker-operator",
            })
        except Exception as exc:  # an event lost is never worth failing a reconcile over
            logger.warning("could not post event %s for %s: %s", event.reason, meta["name"], exc)


def _newer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    try:
        return int(a["metadata"].get("resourceVersion", 0)) >= int(b["metadata"].get("resourceVersion", 0))
    except (TypeError, ValueError):
        return True
