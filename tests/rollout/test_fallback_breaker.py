"""The fallback breaker's pure decisions, tick by tick on a fake clock (operator/fallback.py decide)."""
from __future__ import annotations

from dataclasses import replace

import pytest

from digital_worker.operator.fallback import (CLOSED, HALF_OPEN, MAX_OPEN_SECONDS, OPEN, RECOVERY_FLOOR_SECONDS,
                                              WINDOW_FLOOR_SECONDS, BreakerContext, BreakerSettings, BreakerState,
                                              Health, Observation, Route, decide)

SETTINGS = BreakerSettings(error_rate_threshold=0.5, unhealthy_seconds=60)
TICK = 5.0


def obs(error_rate: float | None = 0.0, *, requests: float | None = 100, ready: int | None = 2, desired: int = 2,
        fallback_ready: int = 1, window: float = 60) -> Observation:
    return Observation(error_rate=error_rate, requests=requests, primary_ready=ready, primary_desired=desired,
                       fallback_ready=fallback_ready, window_seconds=window)


GOOD, BAD, MISSING = obs(0.01), obs(0.9), obs(None)


class Breaker:
    """Feeds observations through decide() as the reconcile would, keeping the state between ticks."""

    def __init__(self, settings: BreakerSettings = SETTINGS, state: BreakerState | None = None) -> None:
        self.settings = settings
        self.state = state or BreakerState()
        self.now = 0.0
        self.decisions = []

    def tick(self, observation: Observation, at: float | None = None):
        self.now = self.now + TICK if at is None else at
        decision, self.state = decide(BreakerContext(self.now, observation, self.settings, self.state))
        self.decisions.append(decision)
        return decision

    def run(self, observation: Observation, seconds: float):
        end = self.now + seconds
        while self.now + TICK <= end + 1e-9:
            self.tick(observation)
        return self.decisions[-1]

    def events(self) -> list[str]:
        return [d.event[1] for d in self.decisions if d.event]

    def route_changes(self) -> int:
        routes = [d.route for d in self.decisions]
        return sum(1 for a, b in zip(routes, routes[1:]) if a != b)


def trip(breaker: Breaker) -> None:
    breaker.tick(BAD)
    breaker.run(BAD, SETTINGS.unhealthy_seconds)
    assert breaker.state.phase == OPEN


def test_trips_after_unhealthy_seconds_not_before():
    breaker = Breaker()
    first = breaker.tick(BAD, at=100.0)  # the first bad observation starts the clock
    assert first.route is Route.PRIMARY and first.health is Health.BAD and breaker.state.bad_since == 100.0
    for at in range(105, 160, 5):  # 55 s of bad: still the primary
        assert breaker.tick(BAD, at=float(at)).route is Route.PRIMARY
    assert breaker.state.phase == CLOSED and breaker.events() == []
    tripped = breaker.tick(BAD, at=160.0)
    assert tripped.route is Route.FALLBACK
    assert tripped.event[:2] == ("Warning", "FallbackActivated")
    assert "error rate 90.0% over 50.0%" in tripped.event[2] and "for 60s" in tripped.event[2]
    assert breaker.state.phase == OPEN and breaker.state.since == 160.0
    assert breaker.state.open_seconds == SETTINGS.recovery_seconds


def test_a_good_observation_restarts_the_unhealthy_clock():
    breaker = Breaker()
    breaker.run(BAD, 50)
    breaker.tick(GOOD)
    assert breaker.state.bad_since is None
    breaker.run(BAD, 55)  # bad again, but only 55 s since the good one
    assert breaker.state.phase == CLOSED
    breaker.run(BAD, 10)
    assert breaker.state.phase == OPEN


def test_no_ready_primary_replica_is_bad_even_without_metrics():
    breaker = Breaker()
    down = obs(None, ready=0)
    breaker.tick(down)
    breaker.run(down, 55)
    assert breaker.state.phase == CLOSED and breaker.decisions[-1].health is Health.BAD
    decision = breaker.tick(down)
    assert decision.route is Route.FALLBACK and "no ready replica" in decision.event[2]


def test_primary_scaled_to_zero_on_purpose_is_not_a_fault():
    breaker = Breaker()
    breaker.run(obs(None, ready=0, desired=0), 300)
    assert breaker.state.phase == CLOSED and breaker.events() == []


@pytest.mark.parametrize("observation", [
    obs(None),                         # no metrics at all (Prometheus down, no provider)
    obs(0.9, requests=2),              # too few requests to judge a rate
    obs(float("nan")),                 # 0/0
    obs(0.9, ready=None),              # no stable revision yet (the first rollout)
])
def test_missing_data_never_trips(observation):
    breaker = Breaker()
    breaker.run(observation, 600)
    assert breaker.state.phase == CLOSED and breaker.events() == []
    assert all(d.route is Route.PRIMARY and d.health is Health.UNKNOWN for d in breaker.decisions)


def test_missing_data_holds_a_bad_run_without_tripping_on_it():
    breaker = Breaker()
    breaker.run(BAD, 30)
    bad_since = breaker.state.bad_since
    breaker.run(MISSING, 120)  # long past unhealthySeconds, but nothing was measured
    assert breaker.state.phase == CLOSED and breaker.state.bad_since == bad_since
    assert breaker.tick(BAD).route is Route.FALLBACK  # the next bad measurement, with no good one between


def test_does_not_trip_onto_a_fallback_that_is_not_ready():
    breaker = Breaker()
    not_ready = obs(0.9, fallback_ready=0)
    breaker.run(not_ready, 120)
    assert breaker.state.phase == CLOSED
    assert "fallback is not ready" in breaker.state.reason
    assert breaker.tick(BAD).route is Route.FALLBACK  # as soon as it is


def test_missing_data_never_untrips():
    breaker = Breaker()
    trip(breaker)
    breaker.run(obs(None), SETTINGS.recovery_seconds)  # open period over: on trial
    assert breaker.state.phase == HALF_OPEN
    breaker.run(obs(None), 600)
    assert breaker.state.phase == HALF_OPEN
    assert all(d.route is Route.BOTH for d in breaker.decisions[-10:])


def test_recovery_goes_through_a_trial_and_needs_the_recovery_period():
    breaker = Breaker()
    trip(breaker)
    tripped_at = breaker.now
    # Open: the primary gets no traffic, so the breaker waits the open period, whatever is observed.
    breaker.run(GOOD, SETTINGS.recovery_seconds - TICK)
    assert breaker.state.phase == OPEN and breaker.decisions[-1].route is Route.FALLBACK
    trial = breaker.tick(GOOD)
    assert trial.route is Route.BOTH and trial.event[:2] == ("Normal", "FallbackTrial")
    assert breaker.now - tripped_at == SETTINGS.recovery_seconds
    trial_start = breaker.now
    # The first window still reaches back before the trial: no evidence yet.
    early = breaker.tick(obs(0.0, window=WINDOW_FLOOR_SECONDS))
    assert early.health is Health.UNKNOWN and breaker.state.good_since is None
    # Good on trial-only windows, for less than the recovery period: still sharing.
    breaker.run(obs(0.0, window=WINDOW_FLOOR_SECONDS), SETTINGS.recovery_seconds)
    assert breaker.state.phase == HALF_OPEN and breaker.state.good_since == trial_start + WINDOW_FLOOR_SECONDS
    recovered = breaker.tick(obs(0.0, window=WINDOW_FLOOR_SECONDS))
    assert recovered.route is Route.PRIMARY and recovered.event[:2] == ("Normal", "FallbackRecovered")
    assert breaker.state.phase == CLOSED
    assert breaker.now - trial_start == WINDOW_FLOOR_SECONDS + SETTINGS.recovery_seconds
    assert breaker.events() == ["FallbackActivated", "FallbackTrial", "FallbackRecovered"]


def test_trial_ignores_windows_reaching_back_before_it():
    breaker = Breaker()
    trip(breaker)
    breaker.run(GOOD, SETTINGS.recovery_seconds)
    assert breaker.state.phase == HALF_OPEN
    # A 60 s window now still holds the requests that tripped the breaker: not evidence either way.
    reaching_back = breaker.tick(obs(0.9, window=60))
    assert reaching_back.health is Health.UNKNOWN and breaker.state.phase == HALF_OPEN


def test_trial_without_ready_primary_is_not_started_and_fails_at_once():
    breaker = Breaker()
    trip(breaker)
    breaker.run(obs(None, ready=0), 300)  # open period long over, but nothing of the primary is ready
    assert breaker.state.phase == OPEN
    breaker.tick(GOOD)
    assert breaker.state.phase == HALF_OPEN
    failed = breaker.tick(obs(None, ready=0, window=WINDOW_FLOOR_SECONDS))  # inside the first window: still bad
    assert failed.route is Route.FALLBACK and failed.event[1] == "FallbackTrialFailed"


def test_failed_trials_back_off_up_to_a_cap():
    breaker = Breaker()
    trip(breaker)
    open_periods = [breaker.state.open_seconds]
    for _ in range(8):
        while breaker.state.phase == OPEN:
            breaker.tick(BAD)
        assert breaker.state.phase == HALF_OPEN
        breaker.run(obs(0.9, window=TICK), TICK)  # wait past the first trial window
        while breaker.state.phase == HALF_OPEN:
            breaker.tick(obs(0.9, window=WINDOW_FLOOR_SECONDS))
        open_periods.append(breaker.state.open_seconds)
    assert open_periods[:5] == [60, 120, 240, 480, MAX_OPEN_SECONDS]
    assert open_periods[-1] == MAX_OPEN_SECONDS
    assert breaker.events().count("FallbackTrialFailed") == 8 and "FallbackRecovered" not in breaker.events()


def test_flapping_primary_does_not_flap_the_route():
    breaker = Breaker()
    for i in range(200):  # over and under the threshold on alternate ticks for ~17 minutes
        breaker.tick(BAD if i % 2 else GOOD)
    assert breaker.state.phase == CLOSED and breaker.route_changes() == 0


def test_flapping_during_a_trial_reopens_and_backs_off():
    breaker = Breaker()
    trip(breaker)
    for i in range(400):  # ~33 minutes, alternating, trial windows full
        breaker.tick(obs(0.9, window=WINDOW_FLOOR_SECONDS) if i % 2 else obs(0.0, window=WINDOW_FLOOR_SECONDS))
    # Never good for a whole recovery period, so never closed; each failed trial doubles the wait.
    assert "FallbackRecovered" not in breaker.events()
    assert breaker.route_changes() <= 2 * 6


def test_fallback_lost_while_open_puts_the_ready_primary_back_beside_it():
    breaker = Breaker()
    trip(breaker)
    decision = breaker.tick(obs(None, fallback_ready=0))
    assert decision.route is Route.BOTH and breaker.state.phase == HALF_OPEN
    assert "fallback has no ready replica" in decision.event[2]


def test_small_unhealthy_seconds_keep_floors():
    settings = BreakerSettings(0.5, unhealthy_seconds=0)
    assert settings.recovery_seconds == RECOVERY_FLOOR_SECONDS and settings.window_seconds == WINDOW_FLOOR_SECONDS
    breaker = Breaker(settings)
    assert breaker.tick(BAD).route is Route.FALLBACK  # 0 s: the first bad measurement trips it


def test_state_survives_a_restart_through_status():
    breaker = Breaker()
    trip(breaker)
    restored = BreakerState.from_dict(breaker.state.to_dict())
    assert restored == breaker.state
    assert BreakerState.from_dict(None) == BreakerState()
    assert BreakerState.from_dict({"phase": "Bogus", "extra": 1}) == BreakerState()
    assert replace(restored, phase=HALF_OPEN).to_dict()["phase"] == HALF_OPEN
