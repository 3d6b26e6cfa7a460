"""What `digital-worker get` and `digital-worker logs` show about DigitalWorkers on a cluster.

`get` prints dev mode's tables (operator/dev.py `summary_tables`), optionally for one worker.
`logs NAME` merges the worker's recent Events (its own, its pods', and the GPU-health Events on the
nodes it had tainted) with the transitions its status records (conditions, rollout step, last
scaling decision, GPU health) into one timeline, newest last. `timeline` is pure: tested on plain
dicts, fed by `collect` from a cluster.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from digital_worker.operator import schema as api


@dataclass(frozen=True)
class Entry:
    time: str  # ISO 8601 UTC, or "" when the source carries no time (then it sorts last: it is the current state)
    source: str  # "event" or "status"
    type: str  # Normal/Warning for events; the status part (condition, rollout, autoscaling, gpuHealth)
    reason: str
    object: str
    message: str
    count: int = 1


def _iso(value: Any) -> str:
    """ISO 8601 UTC seconds from an API timestamp string or epoch seconds; "" for nothing usable."""
    if value in (None, ""):
        return ""
    if isinstance(value, (int, float)):
        return datetime.datetime.fromtimestamp(float(value), tz=datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    text = str(value)
    try:
        parsed = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return text
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.timezone.utc)
    return parsed.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def event_entry(event: dict[str, Any]) -> Entry:
    involved = event.get("involvedObject") or event.get("regarding") or {}
    when = (event.get("lastTimestamp") or event.get("eventTime") or event.get("firstTimestamp")
            or (event.get("metadata") or {}).get("creationTimestamp"))
    return Entry(_iso(when), "event", event.get("type", ""), event.get("reason", ""),
                 f"{involved.get('kind', '')}/{involved.get('name', '')}",
                 event.get("message") or event.get("note") or "", int(event.get("count") or 1))


def belongs_to(event: dict[str, Any], name: str, namespace: str, nodes: set[str]) -> bool:
    """The worker's own Events, its pods' (named <name>-<revision>-...), and its tainted nodes'."""
    involved = event.get("involvedObject") or event.get("regarding") or {}
    kind, obj = involved.get("kind"), involved.get("name", "")
    if kind == api.KIND:
        return obj == name and involved.get("namespace", namespace) == namespace
    if kind in ("Pod", "Deployment", "ConfigMap", "Service", "PodDisruptionBudget"):
        return (involved.get("namespace") or (event.get("metadata") or {}).get("namespace")) == namespace and \
            (obj == name or obj.startswith(f"{name}-"))
    return kind == "Node" and obj in nodes


def status_entries(body: dict[str, Any]) -> list[Entry]:
    """The transitions a worker's status records, each at the time it carries."""
    status = body.get("status") or {}
    obj = f"{api.KIND}/{body['metadata']['name']}"
    entries = []
    for condition in status.get("conditions") or []:
        entries.append(Entry(_iso(condition.get("lastTransitionTime")), "status", "condition",
                             f"{condition.get('type')}={condition.get('status')}", obj,
                             " ".join(filter(None, (condition.get("reason"), condition.get("message"))))))
    rollout = status.get("rollout")
    if rollout:
        text = (f"canary {rollout.get('revision', '?')} vs stable {rollout.get('stableRevision', '?')}: step "
                f"{rollout.get('step', 0)}, weight {rollout.get('weight', 0)}%")
        if rollout.get("message"):
            text += f": {rollout['message']}"
        if rollout.get("abortReason"):
            text += f" (abort: {rollout['abortReason']})"
        entries.append(Entry(_iso(rollout.get("stepStartedAt")), "status", "rollout", rollout.get("phase", ""),
                             obj, text))
    autoscaling = status.get("autoscaling")
    if autoscaling:
        text = (f"{autoscaling.get('mode', '')}: {autoscaling.get('currentReplicas', '?')} -> "
                f"{autoscaling.get('desiredReplicas', '?')} replicas: {autoscaling.get('reason', '')}")
        if autoscaling.get("holdCondition"):
            text += f" [hold: {autoscaling['holdCondition']}]"
        # lastScaleTime is when replicas last changed; a decision without one is the current state.
        entries.append(Entry(_iso(autoscaling.get("lastScaleTime")), "status", "autoscaling",
                             autoscaling.get("action", ""), obj, text))
    gpu = status.get("gpuHealth")
    if gpu:
        text = (f"replaced pods: {', '.join(gpu.get('replacedPods') or []) or '-'}; tainted nodes: "
                f"{', '.join(gpu.get('taintedNodes') or []) or '-'}; held back: {gpu.get('heldBack', 0)}")
        entries.append(Entry(_iso(gpu.get("lastCheck")), "status", "gpuHealth", "GpuHealth", obj, text))
    return entries


def timeline(body: dict[str, Any], events: list[dict[str, Any]], limit: int | None = 50) -> list[Entry]:
    """Events and status transitions of one worker, oldest first; entries without a time last (current state)."""
    meta = body["metadata"]
    nodes = set(((body.get("status") or {}).get("gpuHealth") or {}).get("taintedNodes") or [])
    entries = [event_entry(e) for e in events if belongs_to(e, meta["name"], meta.get("namespace", "default"), nodes)]
    entries += status_entries(body)
    # sorted() is stable: Events of the same second keep the API's (creation) order.
    entries = sorted(entries, key=lambda entry: (entry.time == "", entry.time))
    return entries[-limit:] if limit else entries


def collect(client, namespace: str, name: str, limit: int | None = 50) -> list[Entry] | None:
    """The timeline of namespace/name from a cluster; None when the worker does not exist."""
    body = client.get(api.API_VERSION, api.PLURAL, namespace, name)
    if body is None:
        return None
    events = client.list("v1", "events", namespace)
    nodes = ((body.get("status") or {}).get("gpuHealth") or {}).get("taintedNodes")
    if nodes and namespace != "default":  # GPU health records node Events in "default" (Nodes have no namespace)
        events += client.list("v1", "events", "default")
    return timeline(body, events, limit)


def timeline_table(entries: list[Entry], title: str):
    from rich.table import Table

    table = Table(title=title)
    for column in ("Time", "Source", "Type", "Reason", "Object", "Message"):
        table.add_column(column)
    for entry in entries:
        style = "red" if entry.type == "Warning" else None
        count = f" (x{entry.count})" if entry.count > 1 else ""
        table.add_row(entry.time or "now", entry.source, entry.type, entry.reason, entry.object,
                      entry.message + count, style=style)
    return table


class OneWorker:
    """A read-only view of a client that lists only one DigitalWorker, so dev mode's tables can show it alone."""

    def __init__(self, client, name: str) -> None:
        self.client = client
        self.name = name

    def list(self, api_version: str, plural: str, namespace: str | None = None,
             label_selector: str | None = None) -> list[dict[str, Any]]:
        items = self.client.list(api_version, plural, namespace, label_selector)
        if plural == api.PLURAL:
            items = [item for item in items if item["metadata"]["name"] == self.name]
        return items

    def __getattr__(self, attribute: str) -> Any:  # everything but list() as the client does it
        return getattr(self.client, attribute)
