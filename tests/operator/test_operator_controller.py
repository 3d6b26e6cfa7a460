"""Fast tests of the controller glue: pass priorities, the worker-event filter, the JSON copy, and the
raw KubeClient against the emulated API (no kopf)."""
from __future__ import annotations

import asyncio

import pytest

from digital_worker.operator import schema as api
from digital_worker.operator.controller import (ROUTINE, URGENT, PriorityGate, Reconciler, copy_json,
                                                pass_priority)
from digital_worker.operator.kube import Conflict, KubeClient, NotFound


def worker(name: str = "w", generation: int = 1, observed: int | None = None, **meta) -> dict:
    body = {"apiVersion": api.API_VERSION, "kind": api.KIND,
            "metadata": {"name": name, "namespace": "ns", "generation": generation, "resourceVersion": "7", **meta},
            "spec": {"replicas": 1}}
    if observed is not None:
        body["status"] = {"observedGeneration": observed, "phase": "Ready"}
    return body


def test_a_spec_not_yet_reconciled_is_urgent():
    assert pass_priority(worker()) == URGENT  # new: no status yet
    assert pass_priority(worker(generation=2, observed=1)) == URGENT  # spec changed since the last pass
    assert pass_priority(worker(generation=2, observed=2)) == ROUTINE


def test_gate_lets_urgent_waiters_in_first_then_in_arrival_order():
    async def scenario() -> list[str]:
        gate = PriorityGate(1)
        order: list[str] = []
        await gate.acquire(ROUTINE)  # the one slot is taken

        async def waiter(label: str, priority: int) -> None:
            await gate.acquire(priority)
            order.append(label)
            gate.release()

        tasks = [asyncio.create_task(waiter(label, priority)) for label, priority in
                 [("routine-1", ROUTINE), ("routine-2", ROUTINE), ("urgent-1", URGENT), ("urgent-2", URGENT)]]
        await asyncio.sleep(0)
        assert gate.waiting == 4
        gate.release()
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(scenario()) == ["urgent-1", "urgent-2", "routine-1", "routine-2"]


def test_gate_cancelled_waiters_leak_no_slot():
    async def scenario() -> None:
        gate = PriorityGate(2)
        await gate.acquire(ROUTINE)
        await gate.acquire(ROUTINE)
        cancelled = asyncio.create_task(gate.acquire(URGENT))
        granted_then_cancelled = asyncio.create_task(gate.acquire(URGENT))
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.sleep(0)
        gate.release()  # goes to the second waiter (the first is cancelled) ...
        granted_then_cancelled.cancel()  # ... which is cancelled before it runs: it passes the slot on
        with pytest.raises(asyncio.CancelledError):
            await granted_then_cancelled
        gate.release()
        # Both slots are free again: two acquisitions do not wait.
        await asyncio.wait_for(gate.acquire(ROUTINE), 1)
        await asyncio.wait_for(gate.acquire(ROUTINE), 1)
        assert gate.waiting == 0

    asyncio.run(scenario())


def test_only_changes_to_what_a_pass_reads_call_for_a_pass():
    reconciler = Reconciler.__new__(Reconciler)  # no client, no threads: only the event filter
    reconciler._essences, reconciler._latest, reconciler._running, reconciler._follow_up = {}, {}, set(), {}
    reconciler.schedule = lambda body: None
    body = worker(annotations={"a": "1"})
    assert reconciler.wants_pass({"type": None, "object": body})  # listed at start
    assert reconciler.wants_pass({"type": "ADDED", "object": body})
    reconciler.worker_event("ADDED", copy_json(body))

    echo = copy_json(body)
    echo["status"] = {"observedGeneration": 1, "phase": "Ready"}  # our own status write, echoed back
    echo["metadata"]["resourceVersion"] = "8"
    assert not reconciler.wants_pass({"type": "MODIFIED", "object": echo})

    for change in (lambda b: b["spec"].update(replicas=2), lambda b: b["metadata"]["annotations"].pop("a"),
                   lambda b: b["metadata"].update(labels={"team": "x"}),
                   lambda b: b["metadata"].update(deletionTimestamp="2026-11-22T00:00:00Z")):
        changed = copy_json(echo)
        change(changed)
        assert reconciler.wants_pass({"type": "MODIFIED", "object": changed})
    assert reconciler.wants_pass({"type": "DELETED", "object": echo})
    reconciler.worker_event("DELETED", echo)
    assert reconciler._essences == {} and reconciler._latest == {}


def test_copy_json_is_deep():
    value = {"a": [{"b": 1}, 2, "x"], "c": {"d": None, "e": True}}
    copied = copy_json(value)
    assert copied == value
    copied["a"][0]["b"] = 9
    copied["c"]["d"] = 1
    assert value == {"a": [{"b": 1}, 2, "x"], "c": {"d": None, "e": True}}


def test_kube_client_speaks_raw_json_to_the_api():
    from digital_worker.operator.emulator import EmulatedCluster

    with EmulatedCluster(nodes=[], pod_simulator=False) as cluster:
        kube = KubeClient.from_kubeconfig(str(cluster.kubeconfig_path))
        kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "raw"}})
        config = {"apiVersion": "v1", "kind": "ConfigMap",
                  "metadata": {"name": "c1", "namespace": "raw", "labels": {"app": "x"}}, "data": {"k": "v"}}
        created = kube.create(config)
        assert created["metadata"]["name"] == "c1" and created["data"] == {"k": "v"}
        with pytest.raises(Conflict):
            kube.create(config)
        kube.patch("v1", "configmaps", "raw", "c1", {"data": {"k": None, "k2": "v2"}})  # merge patch
        assert kube.get("v1", "configmaps", "raw", "c1")["data"] == {"k2": "v2"}
        kube.create({**config, "metadata": {"name": "c2", "namespace": "raw", "labels": {"app": "other"}}})
        # The label selector goes in the query string.
        assert [c["metadata"]["name"] for c in kube.list("v1", "configmaps", "raw", "app=x")] == ["c1"]
        assert kube.get("v1", "configmaps", "raw", "missing") is None
        with pytest.raises(NotFound):
            kube.patch("v1", "configmaps", "raw", "missing", {"data": {}})
        kube.delete("v1", "configmaps", "raw", "c1")
        kube.delete("v1", "configmaps", "raw", "c1")  # already gone: fine
        assert kube.get("v1", "configmaps", "raw", "c1") is None
        assert kube.requests >= 10


def test_triggers_fold_into_a_waiting_pass_and_one_more_pass_follows_a_running_one():
    async def scenario() -> list[tuple[str, str]]:
        reconciler = Reconciler(client=None, threads=1)
        seen: list[tuple[str, str]] = []
        release_first = asyncio.Event()
        loop = asyncio.get_running_loop()

        def fake_pass(body, first_pass=False):  # stands in for reconcile_sync: records which body each pass got
            seen.append((body["metadata"]["name"], body["metadata"]["resourceVersion"]))
            if body["metadata"]["name"] == "busy" and len(seen) == 1:
                asyncio.run_coroutine_threadsafe(release_first.wait(), loop).result(5)

        reconciler.reconcile_sync = fake_pass
        busy = asyncio.create_task(reconciler.run(worker("busy")))  # holds the only slot
        await asyncio.sleep(0.1)
        # Three triggers for "new" while it waits at the gate: one pass, on the newest body.
        runs = [asyncio.create_task(reconciler.run(worker("new", resourceVersion=str(v)))) for v in (10, 12, 11)]
        # A trigger for "busy" while its pass is under way: exactly one more pass afterwards.
        again = asyncio.create_task(reconciler.run(worker("busy", resourceVersion="8")))
        await asyncio.sleep(0.1)
        release_first.set()
        await asyncio.gather(busy, again, *runs)
        reconciler.executor.shutdown()
        return seen

    seen = asyncio.run(scenario())
    assert seen[0] == ("busy", "7")
    assert sorted(seen[1:]) == [("busy", "8"), ("new", "12")]


def test_new_workers_first_get_their_revision_then_the_rest_at_routine_priority():
    """A burst of new workers: every first pass (ConfigMap + Deployment only) runs before any
    follow-up pass (Service, PDB, status, the deferred Events)."""
    from digital_worker.operator.reconcile import Event, Result

    async def scenario() -> list[tuple[str, bool]]:
        reconciler = Reconciler(client=None, threads=1)
        seen: list[tuple[str, bool]] = []
        posted: list[str] = []

        def fake_pass(body, first_pass=False):
            seen.append((body["metadata"]["name"], first_pass))
            if first_pass:
                return Result(status={}, events=[Event("Normal", "RevisionCreated", "x")], changes=2, partial=True)
            posted.extend(e.reason for e in reconciler._follow_up.pop(("ns", body["metadata"]["name"]), []))
            return Result(status={"phase": "Pending"}, events=[], changes=2)

        reconciler.reconcile_sync = fake_pass
        await asyncio.gather(*(reconciler.run(worker(name)) for name in ("a", "b", "c")))
        reconciler.executor.shutdown()
        assert posted == ["RevisionCreated"] * 3
        return seen

    seen = asyncio.run(scenario())
    assert [first for _, first in seen] == [True, True, True, False, False, False], seen
    assert sorted(name for name, _ in seen[:3]) == sorted(name for name, _ in seen[3:]) == ["a", "b", "c"]
