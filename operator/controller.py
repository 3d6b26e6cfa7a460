"""The glue between kopf's handlers and the plain reconcile logic: serialization, threads, status, events.

- One reconcile at a time per DigitalWorker; triggers that arrive meanwhile coalesce into one more pass.
- The kubernetes client is synchronous, so passes run in a thread pool, never on the event loop.
- Passes that act on a spec not yet reconciled (a new worker, a spec change) go before the others
  (child events, resyncs): with a thousand workers pending, a new one still gets its Deployment soon.
- Only a change to what reconcile reads (spec, labels, annotations, deletion) triggers a pass from
  the worker's own watch events: the echo of our own status write is no reason for another pass.
- Status is patched once per pass and only when it changed; Events are posted for transitions.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import itertools
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


def copy_json(value: Any) -> Any:
    """A deep copy of parsed JSON (dicts, lists, scalars): several times faster than copy.deepcopy."""
    if type(value) is dict:
        return {key: copy_json(item) for key, item in value.items()}
    if type(value) is list:
        return [copy_json(item) for item in value]
    return value


def raw_body(body: Any) -> Any:
    """The raw dict under a kopf Body, without copying (for read-only use, e.g. child indices)."""
    source = getattr(body, "_src", None)
    return source if isinstance(source, dict) else plain(body)


# Pass priorities: lower goes first.
URGENT = 0  # the spec has not been reconciled yet (new worker, spec change)
ROUTINE = 1  # anything else: child events, resyncs, periodic rollout steps


def pass_priority(body: dict[str, Any]) -> int:
    status = body.get("status") or {}
    if status.get("observedGeneration") != body["metadata"].get("generation"):
        return URGENT
    return ROUTINE


def essence(body: dict[str, Any]) -> tuple:
    """What a reconcile pass reads of the worker itself, apart from its own status."""
    meta = body.get("metadata") or {}
    return (body.get("spec"), meta.get("labels"), meta.get("annotations"), meta.get("deletionTimestamp"),
            meta.get("generation"))


class PriorityGate:
    """At most `size` holders at once; waiters are let in by priority, then in arrival order.

    A plain executor queue is FIFO: a thousand routine passes queued ahead would delay a new
    worker's first pass by all of them. Holding back the passes here, on the event loop, keeps the
    executor's own queue empty, so priorities decide what runs next."""

    def __init__(self, size: int) -> None:
        self._free = size
        self._waiting: list[tuple[int, int, asyncio.Future]] = []
        self._order = itertools.count()

    async def acquire(self, priority: int) -> None:
        if self._free > 0 and not self._waiting:
            self._free -= 1
            return
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (priority, next(self._order), future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # granted just as we were cancelled: pass it on
            raise

    def release(self) -> None:
        while self._waiting:
            _, _, future = heapq.heappop(self._waiting)
            if not future.done():
                future.set_result(None)
                return
        self._free += 1

    @property
    def waiting(self) -> int:
        return len(self._waiting)


class Reconciler:
    def __init__(self, client: KubeClient, threads: int = 16, prometheus_url: str | None = None) -> None:
        self.client = client
        self.prometheus_url = prometheus_url
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="reconcile")
        self.gate = PriorityGate(threads)
        self._latest: dict[tuple[str, str], dict[str, Any]] = {}
        # The essence of each worker as last handed to a pass (see `wants_pass`).
        self._essences: dict[tuple[str, str], tuple] = {}
        self._running: set[tuple[str, str]] = set()  # a pass is waiting at the gate or under way
        self._queued: set[tuple[str, str]] = set()  # a pass is waiting at the gate: it has not read its body yet
        # Workers whose first pass applied only their revision: a full pass follows at routine
        # priority, posting the Events the first pass deferred.
        self._follow_up: dict[tuple[str, str], list[reconcile_module.Event]] = {}
        self._pending: set[tuple[str, str]] = set()  # triggered while a pass was under way: one more pass
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

    def wants_pass(self, event: Mapping[str, Any]) -> bool:
        """Whether a watch event on a DigitalWorker calls for a pass (or, if deleted, for forgetting it)."""
        body = event.get("object") or {}
        if event.get("type") in (None, "ADDED", "DELETED"):
            return True
        meta = body.get("metadata") or {}
        return self._essences.get((meta.get("namespace"), meta.get("name"))) != essence(body)

    def worker_event(self, event_type: str | None, body: dict[str, Any]) -> None:
        """A DigitalWorker was listed, added, changed or deleted (its own watch events)."""
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        if event_type == "DELETED":
            self._essences.pop(key, None)
            self._follow_up.pop(key, None)
            if key not in self._running:
                self._latest.pop(key, None)
            return
        self._essences[key] = essence(body)
        self.schedule(body)

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
        if key in self._queued:  # the waiting pass will read the newest body: no second pass needed
            return
        if key in self._running:
            self._pending.add(key)
            return
        self._running.add(key)
        try:
            while True:
                self._pending.discard(key)
                await self._pass(key)
                if key not in self._pending:
                    break
        finally:
            self._running.discard(key)

    async def _pass(self, key: tuple[str, str]) -> None:
        loop = asyncio.get_running_loop()
        # The body is read once the gate lets the pass in: triggers that came while it waited (e.g. a
        # periodic tick right after a worker's creation) are folded into it instead of one more pass.
        self._queued.add(key)
        try:
            await self.gate.acquire(ROUTINE if key in self._follow_up else pass_priority(self._latest[key]))
        finally:
            self._queued.discard(key)
        body = self._latest[key]
        first_pass = key not in self._follow_up and not (body.get("status") or {}).get("observedGeneration") \
            and not body["metadata"].get("deletionTimestamp")
        started = time.perf_counter()
        try:
            result = await loop.run_in_executor(self.executor, self.reconcile_sync, body, first_pass)
            if getattr(result, "partial", False):  # the rest follows once the other new workers have their Deployments
                self._follow_up[key] = list(result.events)
                self._pending.add(key)
        except (TransientError, Conflict) as exc:
            operator_metrics().reconcile_errors.labels("transient").inc()
            raise RetryLater(str(exc)) from None
        except Exception:
            operator_metrics().reconcile_errors.labels("unexpected").inc()
            raise
        finally:
            self.gate.release()
            operator_metrics().reconcile_seconds.observe(time.perf_counter() - started)

    def reconcile_sync(self, body: dict[str, Any], first_pass: bool = False) -> reconcile_module.Result:
        result = reconcile_module.reconcile(body, self.client, self.observed(body), prometheus_url=self.prometheus_url,
                                           analysis_provider=self.analysis_provider, first_pass=first_pass)
        if result.partial:
            return result
        meta = body["metadata"]
        deferred = self._follow_up.pop((meta["namespace"], meta["name"]), [])
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
        for event in deferred + result.events:
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
