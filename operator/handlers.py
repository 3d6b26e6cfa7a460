"""kopf handlers: thin. They take the kwargs they need and hand over to `controller.Reconciler`.

Every path into a reconcile (the worker's own watch events, the resync loop, and events on the
children) ends in the same level-triggered pass, serialized per DigitalWorker.

Only watch-event handlers, indices and one timer, no kopf create/update/resume handlers: those keep
a diff-base and progress in annotations, which is one more write (and its echo event) per change.
The reconcile is level-triggered and retries on its own, so kopf's bookkeeping bought nothing.
The timer ticks autoscaling, per DigitalWorker with autoscaling on.
Indexers are `async def`: kopf runs plain functions in its thread pool, a thread hop per event.
"""
from __future__ import annotations

import asyncio
import logging
import random

import kopf

from digital_worker.operator import schema as api
from digital_worker.operator.periodic import run_periodic, worker_autoscaling
from digital_worker.operator.controller import Reconciler, copy_json, raw_body, settings_from_env

DW = (api.GROUP, api.VERSION, api.PLURAL)
CHILD_LABELS = {api.LABEL_NAME: api.APP_NAME}
# The autoscaling timer's grid: the CRD's smallest `spec.autoscaling.intervalSeconds`. Each worker
# ticks on the first firing its own interval allows (kopf fixes a timer's interval when decorated).
AUTOSCALING_TIMER_SECONDS = 5.0
AUTOSCALING_TIMER_ID = "autoscaling"
# kopf's timers hold a finalizer while they run: ours, named for what it guards.
FINALIZER = f"{api.GROUP}/autoscaling-timer"

@kopf.on.login()
def login(memo: kopf.Memo, **kwargs):
    # The kubeconfig this operator was started with (read once, at start), never the environment at
    # re-login time: with several operators in one process (tests, dev) that could be another's.
    settings = getattr(memo, "settings", None) or settings_from_env()
    if not settings.kubeconfig:
        return kopf.login_via_client(memo=memo, **kwargs)
    from kubernetes import client, config

    configuration = client.Configuration()
    config.load_kube_config(config_file=settings.kubeconfig, client_configuration=configuration)
    token = (configuration.api_key or {}).get("authorization", "").removeprefix("Bearer ").strip() or None
    return kopf.ConnectionInfo(
        server=configuration.host, token=token, scheme="Bearer" if token else None,
        ca_path=configuration.ssl_ca_cert, insecure=not configuration.verify_ssl,
        certificate_path=configuration.cert_file, private_key_path=configuration.key_file,
        default_namespace=None,
    )


class NoDiffBase(kopf.DiffBaseStorage):
    """No change-detecting handlers here, so no diff-base: kopf would otherwise deep-copy every
    watched object (children included) on every event to compute a diff nobody reads."""

    def build(self, *, body: kopf.Body, extra_fields=None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_) -> None:
    # Progress (retries) would live in annotations, so status stays ours and readable; no handler uses it.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=api.GROUP)
    settings.persistence.diffbase_storage = NoDiffBase()
    settings.persistence.finalizer = FINALIZER
    settings.posting.level = 20  # INFO and up become Kubernetes Events
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 60
    settings.queueing.worker_limit = settings_from_env().worker_limit
    settings.execution.max_workers = settings_from_env().threads
    memo.settings = settings_from_env()  # read at start, not at import: the env may differ per run
    memo.reconciler = Reconciler.from_settings(memo.settings)
    # One resync loop for all workers, instead of a kopf timer each: timers put a finalizer on every
    # object (two more API calls per worker and a blocked delete when the operator is down).
    memo.resync = asyncio.create_task(memo.reconciler.resync_forever(memo.settings.resync_seconds))
    # GPU health checks and clock-driven rollout passes for all workers (operator/periodic.py).
    memo.periodic = asyncio.create_task(run_periodic(memo.reconciler, memo.settings.prometheus_url))
    # The autoscalers' state (fits, learned capacities, schedules), ticked by the timer below.
    memo.autoscaling = worker_autoscaling(memo.reconciler, memo.settings.prometheus_url)


@kopf.on.cleanup()
async def stop_loops(memo: kopf.Memo, **_) -> None:
    memo.resync.cancel()
    memo.periodic.cancel()
    memo.autoscaling.autoscaler.close()


class _QuietTimerSuccess(logging.Filter):
    """kopf logs every successful timer call at INFO, and posts INFO as a Kubernetes Event: one
    Event per worker every few seconds. The autoscaler posts its own Events for what it does."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg == f"Timer {AUTOSCALING_TIMER_ID!r} succeeded.")


if not any(isinstance(f, _QuietTimerSuccess) for f in logging.getLogger("kopf.objects").filters):
    logging.getLogger("kopf.objects").addFilter(_QuietTimerSuccess())


def _autoscaling_on(spec: kopf.Spec, **_) -> bool:
    # Workers with autoscaling Off get no timer, and so carry no finalizer.
    return (spec.get("autoscaling") or {}).get("mode", "Off") != "Off"


def _first_tick_delay(spec: kopf.Spec, **_) -> float:
    # Workers created (or found at start) together would tick in the same instant every interval:
    # a random start within their interval spreads the ticks, and the API calls they make.
    return random.uniform(0.0, float((spec.get("autoscaling") or {}).get("intervalSeconds", 20)))


@kopf.timer(*DW, id=AUTOSCALING_TIMER_ID, interval=AUTOSCALING_TIMER_SECONDS, sharp=True,
            initial_delay=_first_tick_delay, when=_autoscaling_on)
async def autoscale(body: kopf.Body, spec: kopf.Spec, memo: kopf.Memo, **_) -> None:
    """This worker's autoscaling tick, when its `spec.autoscaling.intervalSeconds` is due."""
    try:
        await memo.autoscaling.tick_if_due(raw_body(body))
    except Exception as exc:  # the API or the metrics source away: try again in one interval
        raise kopf.TemporaryError(f"autoscaling tick failed: {exc}",
                                  delay=float((spec.get("autoscaling") or {}).get("intervalSeconds", 20))) from exc


@kopf.index(*DW)
async def digitalworkers(namespace: str, name: str, body: kopf.Body, **_) -> dict:
    # A copy: passes record the status they wrote into it, and kopf's own body must stay as received.
    return {(namespace, name): copy_json(raw_body(body))}


# The children, kept in memory from the watch streams: a reconcile reads them here instead of
# listing them from the API (four lists per pass were most of the API traffic at scale).
def _child_index(namespace: str, labels: kopf.Labels, body: kopf.Body) -> dict:
    owner = labels.get(api.LABEL_INSTANCE)
    return {(namespace, owner): raw_body(body)} if owner else {}


@kopf.index("apps", "v1", "deployments", labels=CHILD_LABELS)
async def child_deployments(namespace: str, labels: kopf.Labels, body: kopf.Body, **_) -> dict:
    return _child_index(namespace, labels, body)


@kopf.index("v1", "services", labels=CHILD_LABELS)
async def child_services(namespace: str, labels: kopf.Labels, body: kopf.Body, **_) -> dict:
    return _child_index(namespace, labels, body)


@kopf.index("v1", "configmaps", labels=CHILD_LABELS)
async def child_configmaps(namespace: str, labels: kopf.Labels, body: kopf.Body, **_) -> dict:
    return _child_index(namespace, labels, body)


@kopf.index("policy", "v1", "poddisruptionbudgets", labels=CHILD_LABELS)
async def child_pdbs(namespace: str, labels: kopf.Labels, body: kopf.Body, **_) -> dict:
    return _child_index(namespace, labels, body)


def _remember_indices(memo: kopf.Memo, kwargs: dict) -> None:
    if memo.reconciler.children is None:
        memo.reconciler.workers = kwargs["digitalworkers"]
        memo.reconciler.children = {
            "deployments": kwargs["child_deployments"], "services": kwargs["child_services"],
            "configmaps": kwargs["child_configmaps"], "poddisruptionbudgets": kwargs["child_pdbs"],
        }


def _worker_needs_pass(event: kopf.RawEvent, memo: kopf.Memo, **_) -> bool:
    # As a filter, kopf skips the handler call: most events are echoes of our own status writes.
    return memo.reconciler.wants_pass(event)


@kopf.on.event(*DW, when=_worker_needs_pass)
async def reconcile_worker(event: kopf.RawEvent, namespace: str, name: str, memo: kopf.Memo,
                           digitalworkers: kopf.Index, **kwargs) -> None:
    """Listed at start (resume), created, changed or deleted: a pass (fire and forget; it retries itself)."""
    _remember_indices(memo, {**kwargs, "digitalworkers": digitalworkers})
    if event.get("type") == "DELETED":
        memo.reconciler.worker_event("DELETED", copy_json(event["object"]))
        memo.autoscaling.forget(f"{namespace}/{name}")
        return
    for body in digitalworkers.get((namespace, name), []):  # this event's body, as just indexed
        memo.reconciler.worker_event(event.get("type"), body)


def _changed_or_deleted(event: kopf.RawEvent, **_) -> bool:
    # The initial listing is covered by the resume handlers, and ADDED is (nearly always) our own
    # creation: only changes and deletions can need a new pass. As a filter, kopf skips the call.
    return event.get("type") not in (None, "ADDED")


@kopf.on.event("apps", "v1", "deployments", labels=CHILD_LABELS, when=_changed_or_deleted)
@kopf.on.event("v1", "services", labels=CHILD_LABELS, when=_changed_or_deleted)
@kopf.on.event("v1", "configmaps", labels=CHILD_LABELS, when=_changed_or_deleted)
@kopf.on.event("policy", "v1", "poddisruptionbudgets", labels=CHILD_LABELS, when=_changed_or_deleted)
async def child_changed(namespace: str, labels: kopf.Labels, memo: kopf.Memo,
                        digitalworkers: kopf.Index, **kwargs) -> None:
    """A child's status or existence changed: re-reconcile its DigitalWorker now, not at the next resync."""
    owner = labels.get(api.LABEL_INSTANCE)
    if not owner:
        return
    _remember_indices(memo, kwargs)
    for body in digitalworkers.get((namespace, owner), []):
        memo.reconciler.schedule(body)
