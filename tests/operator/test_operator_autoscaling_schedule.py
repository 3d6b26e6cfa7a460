"""When a worker's autoscaling timer (a 5 s grid) ticks its autoscaler: fast, no cluster."""
from __future__ import annotations

import asyncio

from digital_worker.operator.handlers import AUTOSCALING_TIMER_SECONDS
from digital_worker.operator.periodic import WorkerAutoscaling


def firings(schedule: WorkerAutoscaling, interval: float, seconds: float, drift: float = 0.0) -> list[float]:
    """The timer's firings (every grid step, late by `drift` each) at which the worker ticked."""
    ticked, t = [], 0.0
    while t <= seconds:
        if schedule.due("ai/bot", interval, t):
            ticked.append(round(t, 3))
        t += AUTOSCALING_TIMER_SECONDS + drift
    return ticked


def schedule() -> WorkerAutoscaling:
    return WorkerAutoscaling(client=None, run_sync=None, post_event=None, prometheus_url=None)


def test_an_interval_on_the_grid_ticks_exactly_on_it_even_when_the_timer_drifts():
    assert firings(schedule(), 20, 60) == [0, 20, 40, 60]
    # kopf's sharp timer still fires a little late when the handler took a while.
    assert len(firings(schedule(), 20, 120, drift=0.05)) == 6


def test_an_interval_off_the_grid_waits_for_the_next_firing():
    assert firings(schedule(), 7, 30) == [0, 10, 20, 30]
    assert firings(schedule(), 5, 20) == [0, 5, 10, 15, 20]


def test_off_deleting_and_unreconciled_workers_never_tick_and_lose_their_schedule():
    autoscaling = schedule()
    off = {"metadata": {"namespace": "ai", "name": "bot"}, "spec": {"autoscaling": {"mode": "Off"}}}
    deleting = {"metadata": {"namespace": "ai", "name": "bot", "deletionTimestamp": "2026-11-22T00:00:00Z"},
                "spec": {"autoscaling": {"mode": "Auto"}}}
    assert autoscaling.due("ai/bot", 20, 0.0)
    assert asyncio.run(autoscaling.tick_if_due(off, now=100.0)) is False
    assert asyncio.run(autoscaling.tick_if_due(deleting, now=100.0)) is False
    # Before the operator's first pass there is no Deployment to size and no replica to measure.
    unreconciled = {"metadata": {"namespace": "ai", "name": "new"}, "spec": {"autoscaling": {"mode": "Auto"}}}
    assert asyncio.run(autoscaling.tick_if_due(unreconciled, now=100.0)) is False
    assert autoscaling.due("ai/new", 20, 100.0)  # and it booked nothing
    assert autoscaling.due("ai/bot", 20, 1.0)  # its schedule was dropped: due at once when it comes back
