"""kopf handlers: thin. They take the kwargs they need and hand over to `controller.Reconciler`.

Every path into a reconcile (create, update, resume, the resync timer, and events on the children)
ends in the same level-triggered pass, serialized per DigitalWorker.
"""
from __future__ import annotations

import kopf

from digital_worker.operator import schema as api
from digital_worker.operator.controller import Reconciler, RetryLater, plain, settings_from_env

DW = (api.GROUP, api.VERSION, api.PLURAL)
CHILD_LABELS = {api.LABEL_NAME: api.APP_NAME}
SETTINGS = settings_from_env()


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_) -> None:
    # Progress and diff-base live in annotations, so status stays ours and readable.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=api.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=api.GROUP, key="last-handled")
    settings.posting.level = 20  # INFO and up become Kubernetes Events
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 60
    settings.batching.worker_limit = SETTINGS.worker_limit
    settings.execution.max_workers = SETTINGS.threads
    memo.reconciler = Reconciler.from_settings(SETTINGS)


@kopf.index(*DW)
def digitalworkers(namespace: str, name: str, body: kopf.Body, **_) -> dict:
    return {(namespace, name): plain(body)}


@kopf.on.resume(*DW)
@kopf.on.create(*DW)
@kopf.on.update(*DW)
async def reconcile_worker(body: kopf.Body, memo: kopf.Memo, **_) -> None:
    try:
        await memo.reconciler.run(plain(body))
    except RetryLater as exc:
        raise kopf.TemporaryError(str(exc), delay=exc.delay) from None


@kopf.timer(*DW, interval=SETTINGS.resync_seconds, initial_delay=SETTINGS.resync_seconds, sharp=False)
async def resync_worker(body: kopf.Body, memo: kopf.Memo, **_) -> None:
    """Periodic drift check: a child someone edited or deleted comes back."""
    try:
        await memo.reconciler.run(plain(body))
    except RetryLater as exc:
        raise kopf.TemporaryError(str(exc), delay=exc.delay) from None


@kopf.on.event("apps", "v1", "deployments", labels=CHILD_LABELS)
@kopf.on.event("v1", "services", labels=CHILD_LABELS)
@kopf.on.event("v1", "configmaps", labels=CHILD_LABELS)
@kopf.on.event("policy", "v1", "poddisruptionbudgets", labels=CHILD_LABELS)
async def child_changed(event: kopf.RawEvent, namespace: str, labels: kopf.Labels, memo: kopf.Memo,
                        digitalworkers: kopf.Index, **_) -> None:
    """A child's status or existence changed: re-reconcile its DigitalWorker now, not at the next resync."""
    owner = labels.get(api.LABEL_INSTANCE)
    if not owner or event.get("type") is None:  # the initial listing: resume handlers cover it
        return
    for body in digitalworkers.get((namespace, owner), []):
        memo.reconciler.schedule(body)
