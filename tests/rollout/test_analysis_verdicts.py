"""Pure, tick-by-tick tests of the analysis: spec parsing, check and run verdicts, state transitions."""
from __future__ import annotations

import json
import math

import pytest

from digital_worker.operator.analysis import (
    EARLY_LOOKS_PER_INTERVAL,
    early_look_seconds,
    REASON_FAILED,
    REASON_INCONCLUSIVE,
    REASON_METRICS_UNAVAILABLE,
    REASON_PASSED,
    Action,
    AnalysisSpec,
    AnalysisState,
    CheckDefinition,
    Phase,
    RunMeasurements,
    Verdict,
    evaluate,
    is_due,
    judge_absolute,
    judge_relative,
    judge_run,
    next_run_at,
    resume,
    run_queries,
)
from digital_worker.operator.metric_providers import (
    E2E_P95,
    ERROR_RATE,
    HTTP_ERROR_RATE,
    ITL_P95,
    QUEUE_LENGTH,
    REQUEST_COUNT,
    TTFT_P95,
    Measurement,
    MetricQuery,
)

QUERY = MetricQuery("q", "vector(1)")


def good(**overrides) -> dict:
    values = {REQUEST_COUNT: 100.0, ERROR_RATE: 0.0, TTFT_P95: 0.4, ITL_P95: 0.02, E2E_P95: 3.0, QUEUE_LENGTH: 1.0}
    values.update(overrides)
    return values


def stable(**overrides) -> dict:
    return good(**overrides)


# ---------------------------------------------------------------- spec


def test_spec_defaults_and_camel_case_keys():
    spec = AnalysisSpec.from_dict({})
    assert spec == AnalysisSpec()
    assert [check.key for check in spec.checks()] == ["maxErrorRate", "maxTTFTP95Ratio", "maxITLP95Ratio"]
    spec = AnalysisSpec.from_dict({
        "maxErrorRate": 0.01, "maxTTFTP95Seconds": 2, "maxITLP95Seconds": 0.05, "maxE2EP95Seconds": 30,
        "maxQueueLength": 8, "maxTTFTP95Ratio": 1.2, "maxITLP95Ratio": None, "maxErrorRateRatio": 2,
        "minRequests": 50, "windowSeconds": 120, "intervalSeconds": 60, "failureLimit": 2,
        "inconclusiveLimit": 3, "successfulRuns": 2,
    })
    assert spec.max_ttft_p95_seconds == 2.0 and spec.max_itl_p95_ratio is None
    assert spec.min_requests == 50 and spec.failure_limit == 2 and spec.first_run_delay() == 60
    keys = [check.key for check in spec.checks()]
    assert keys == ["maxErrorRate", "maxTTFTP95Seconds", "maxITLP95Seconds", "maxE2EP95Seconds",
                    "maxQueueLength", "maxTTFTP95Ratio", "maxErrorRateRatio"]
    assert AnalysisSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"maxErrorRat": 0.1}, "analysis.maxErrorRat"),
        ({"maxErrorRate": "5%"}, "analysis.maxErrorRate"),
        ({"maxErrorRate": -0.1}, "analysis.maxErrorRate"),
        ({"maxErrorRate": math.nan}, "analysis.maxErrorRate"),
        ({"minRequests": 2.5}, "analysis.minRequests"),
        ({"failureLimit": 0}, "analysis.failureLimit"),
        ({"failureLimit": True}, "analysis.failureLimit"),
        ({"windowSeconds": None}, "analysis.windowSeconds"),
        ({"windowSeconds": 0.5}, "analysis.windowSeconds"),
        ({"maxTTFTP95Ratio": 0}, "analysis.maxTTFTP95Ratio"),
    ],
)
def test_spec_rejects_bad_fields_naming_them(data, field):
    with pytest.raises(ValueError) as error:
        AnalysisSpec.from_dict(data)
    assert str(error.value).startswith(field + ":")
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------- check verdicts


ERROR_CHECK = CheckDefinition("maxErrorRate", ERROR_RATE, 0.02, relative=False)
TTFT_RATIO = CheckDefinition("maxTTFTP95Ratio", TTFT_P95, 1.2, relative=True)


@pytest.mark.parametrize(
    ("measurement", "verdict"),
    [
        (0.0, Verdict.SUCCESSFUL),
        (0.02, Verdict.SUCCESSFUL),  # at the threshold passes
        (0.0201, Verdict.FAILED),
        (Measurement(QUERY, 0.5, 1), Verdict.FAILED),
        (Measurement(QUERY, 0.01, 1), Verdict.SUCCESSFUL),
        (None, Verdict.INCONCLUSIVE),
        (math.nan, Verdict.INCONCLUSIVE),
        (math.inf, Verdict.INCONCLUSIVE),
        (Measurement(QUERY, None, 0), Verdict.INCONCLUSIVE),  # empty result
        (Measurement(QUERY, None, 1), Verdict.INCONCLUSIVE),  # NaN from Prometheus
        (Measurement(QUERY, 0.0, 1, "ConnectionError: refused"), Verdict.INCONCLUSIVE),
    ],
)
def test_absolute_check_verdicts(measurement, verdict):
    result = judge_absolute(ERROR_CHECK, measurement)
    assert result.verdict is verdict
    assert result.name == "maxErrorRate" and result.threshold == 0.02
    if verdict is Verdict.INCONCLUSIVE:
        assert result.value is None and result.message


def test_absolute_check_messages_say_why():
    assert "no data" in judge_absolute(ERROR_CHECK, Measurement(QUERY, None, 0)).message
    assert "NaN" in judge_absolute(ERROR_CHECK, Measurement(QUERY, None, 1)).message
    assert "refused" in judge_absolute(ERROR_CHECK, Measurement(QUERY, None, 0, "refused")).message
    assert judge_absolute(ERROR_CHECK, 0.05).message == "error_rate 0.05 > 0.02"


@pytest.mark.parametrize(
    ("canary", "baseline", "verdict"),
    [
        (0.48, 0.4, Verdict.SUCCESSFUL),  # 1.2x exactly
        (0.49, 0.4, Verdict.FAILED),
        (0.8, 0.4, Verdict.FAILED),  # the 2x TTFT canary
        (0.2, 0.4, Verdict.SUCCESSFUL),  # faster is fine
        (None, 0.4, Verdict.INCONCLUSIVE),
        (0.4, None, Verdict.INCONCLUSIVE),
        (0.4, math.nan, Verdict.INCONCLUSIVE),
        (0.0005, 0.0, Verdict.SUCCESSFUL),  # a zero baseline is floored, not divided by
        (0.01, 0.0, Verdict.FAILED),
    ],
)
def test_relative_check_verdicts(canary, baseline, verdict):
    result = judge_relative(TTFT_RATIO, canary, baseline)
    assert result.verdict is verdict
    if verdict is not Verdict.INCONCLUSIVE:
        assert result.value == canary and result.baseline == baseline


def test_relative_error_rate_floor_tolerates_a_stray_error_against_a_clean_stable():
    check = CheckDefinition("maxErrorRateRatio", ERROR_RATE, 2.0, relative=True)
    assert judge_relative(check, 0.0, 0.0).verdict is Verdict.SUCCESSFUL
    assert judge_relative(check, 0.002, 0.0).verdict is Verdict.SUCCESSFUL  # <= 2 x 0.1% floor
    assert judge_relative(check, 0.05, 0.0).verdict is Verdict.FAILED
    assert judge_relative(check, 0.05, 0.03).verdict is Verdict.SUCCESSFUL


# ---------------------------------------------------------------- run verdicts


def test_run_all_good_is_successful():
    spec = AnalysisSpec.from_dict({"maxTTFTP95Seconds": 1})
    run = judge_run(spec, RunMeasurements(good(), stable()))
    assert run.verdict is Verdict.SUCCESSFUL
    assert {check.verdict for check in run.checks} == {Verdict.SUCCESSFUL}
    assert not run.metrics_unavailable


def test_run_any_failure_fails_even_with_other_checks_inconclusive():
    spec = AnalysisSpec()
    run = judge_run(spec, RunMeasurements(good(**{ERROR_RATE: 0.05, ITL_P95: None}), stable()))
    assert run.verdict is Verdict.FAILED
    assert "error_rate 0.05 > 0.02" in run.message


def test_run_below_min_requests_is_inconclusive_even_if_numbers_look_bad():
    spec = AnalysisSpec(min_requests=20)
    run = judge_run(spec, RunMeasurements(good(**{REQUEST_COUNT: 19.4, ERROR_RATE: 0.5}), stable()))
    assert run.verdict is Verdict.INCONCLUSIVE
    assert all(check.verdict is Verdict.INCONCLUSIVE for check in run.checks)
    assert "minRequests 20" in run.message


@pytest.mark.parametrize("count", [None, Measurement(QUERY, None, 0), Measurement(QUERY, None, 0, "timeout")])
def test_run_without_a_request_count_is_inconclusive(count):
    canary = good()
    canary[REQUEST_COUNT] = count
    run = judge_run(AnalysisSpec(), RunMeasurements(canary, stable()))
    assert run.verdict is Verdict.INCONCLUSIVE


def test_min_requests_zero_skips_the_traffic_gate():
    canary = good()
    del canary[REQUEST_COUNT]
    run = judge_run(AnalysisSpec(min_requests=0), RunMeasurements(canary, stable()))
    assert run.verdict is Verdict.SUCCESSFUL


def test_relative_checks_are_inconclusive_when_the_stable_lacks_traffic():
    spec = AnalysisSpec()
    run = judge_run(spec, RunMeasurements(good(), stable(**{REQUEST_COUNT: 3})))
    by_name = {check.name: check for check in run.checks}
    assert by_name["maxErrorRate"].verdict is Verdict.SUCCESSFUL
    assert by_name["maxTTFTP95Ratio"].verdict is Verdict.INCONCLUSIVE
    assert "stable" in by_name["maxTTFTP95Ratio"].message
    assert run.verdict is Verdict.INCONCLUSIVE
    # With no stable measured at all, likewise.
    assert judge_run(spec, RunMeasurements(good(), None)).verdict is Verdict.INCONCLUSIVE


def test_run_with_no_enabled_checks_is_never_a_pass():
    spec = AnalysisSpec(max_error_rate=None, max_ttft_p95_ratio=None, max_itl_p95_ratio=None)
    run = judge_run(spec, RunMeasurements(good(), stable()))
    assert run.checks == () and run.verdict is Verdict.INCONCLUSIVE


def test_http_error_rate_check_uses_its_own_measurement():
    spec = AnalysisSpec(max_http_error_rate=0.01)
    assert judge_run(spec, RunMeasurements(good(**{HTTP_ERROR_RATE: 0.2}), stable())).verdict is Verdict.FAILED
    assert judge_run(spec, RunMeasurements(good(**{HTTP_ERROR_RATE: 0.0}), stable())).verdict is Verdict.SUCCESSFUL


# ---------------------------------------------------------------- state transitions, tick by tick


def run_ticks(spec: AnalysisSpec, runs: list[RunMeasurements], start: float = 1000.0):
    """Feed runs at their due times; return (actions, final state)."""
    state = AnalysisState.start(start)
    actions = []
    for run in runs:
        due = next_run_at(state, spec)
        assert due is not None
        assert not is_due(state, spec, due - 0.001) and is_due(state, spec, due)
        result, state = evaluate(state, run, due, spec)
        actions.append(result.action)
        # The state survives a restart: through JSON and back, identical.
        assert AnalysisState.from_dict(json.loads(json.dumps(state.to_dict()))) == state
    return actions, state


GOOD = RunMeasurements(good(), stable())
FAILING = RunMeasurements(good(**{ERROR_RATE: 0.05}), stable())
SLOW = RunMeasurements(good(**{TTFT_P95: 0.8}), stable())
IDLE = RunMeasurements(good(**{REQUEST_COUNT: 0.0, TTFT_P95: None}), stable())
DOWN = RunMeasurements(
    {name: Measurement(QUERY, None, 0, "ConnectionError: refused") for name in good()},
    {name: Measurement(QUERY, None, 0, "ConnectionError: refused") for name in good()},
)


def test_first_run_waits_one_interval_then_runs_every_interval():
    spec = AnalysisSpec(interval_seconds=30, successful_runs=3)
    state = AnalysisState.start(100.0)
    assert next_run_at(state, spec) == 130.0
    _, state = evaluate(state, GOOD, 131.0, spec)
    assert next_run_at(state, spec) == 161.0
    spec_with_delay = AnalysisSpec(interval_seconds=30, initial_delay_seconds=0)
    assert is_due(AnalysisState.start(100.0), spec_with_delay, 100.0)


def test_enough_successful_runs_pass():
    spec = AnalysisSpec(successful_runs=3)
    actions, state = run_ticks(spec, [GOOD, GOOD, GOOD])
    assert actions == [Action.CONTINUE, Action.CONTINUE, Action.PASS]
    assert state.phase is Phase.SUCCESSFUL and state.reason == REASON_PASSED
    assert state.successful_runs == 3 and state.runs == 3


def test_successes_need_not_be_consecutive_but_inconclusive_runs_do_not_count():
    spec = AnalysisSpec(successful_runs=2, inconclusive_limit=3)
    actions, state = run_ticks(spec, [GOOD, IDLE, IDLE, GOOD])
    assert actions == [Action.CONTINUE, Action.CONTINUE, Action.CONTINUE, Action.PASS]
    assert state.consecutive_inconclusive == 0


def test_failure_limit_consecutive_failures_abort():
    spec = AnalysisSpec(failure_limit=2, successful_runs=5)
    actions, state = run_ticks(spec, [FAILING, GOOD, FAILING, FAILING])
    assert actions == [Action.CONTINUE, Action.CONTINUE, Action.CONTINUE, Action.ABORT]
    assert state.phase is Phase.FAILED and state.reason == REASON_FAILED
    assert "2 consecutive failed run(s)" in state.message and "error_rate" in state.message


def test_default_spec_aborts_a_5_percent_error_canary_at_the_first_run():
    actions, state = run_ticks(AnalysisSpec(), [FAILING])
    assert actions == [Action.ABORT]


def test_default_spec_aborts_a_2x_ttft_canary_on_the_relative_check():
    actions, state = run_ticks(AnalysisSpec(), [SLOW])
    assert actions == [Action.ABORT]
    failed = [check for check in state.checks if check.verdict is Verdict.FAILED]
    assert [check.name for check in failed] == ["maxTTFTP95Ratio"]
    assert failed[0].value == 0.8 and failed[0].baseline == 0.4


def test_inconclusive_does_not_reset_a_failure_streak():
    spec = AnalysisSpec(failure_limit=2, inconclusive_limit=5, successful_runs=5)
    actions, _ = run_ticks(spec, [FAILING, IDLE, FAILING])
    assert actions == [Action.CONTINUE, Action.CONTINUE, Action.ABORT]


def test_no_traffic_pauses_never_promotes():
    spec = AnalysisSpec(inconclusive_limit=3)
    early = EARLY_LOOKS_PER_INTERVAL - 1
    actions, state = run_ticks(spec, [IDLE] * (early + 3))
    assert actions == [Action.CONTINUE] * (early + 2) + [Action.PAUSE]
    assert state.phase is Phase.PAUSED and state.reason == REASON_INCONCLUSIVE
    assert "minRequests" in state.message and state.successful_runs == 0
    # The early looks filled less than one interval: the pause comes at most one interval later.
    assert state.last_run_at - state.started_at <= spec.first_run_delay() + 3 * spec.interval_seconds


def test_a_bad_canary_is_judged_as_soon_as_its_requests_allow():
    """Too few requests at the first run: look again every interval/5 (not counted as runs), and
    abort at the first look whose window holds minRequests."""
    spec = AnalysisSpec(interval_seconds=30)
    actions, state = run_ticks(spec, [IDLE, IDLE, FAILING])
    assert actions == [Action.CONTINUE, Action.CONTINUE, Action.ABORT]
    assert state.last_run_at - state.started_at == spec.first_run_delay() + 2 * early_look_seconds(spec) == 42
    assert state.consecutive_failures == 1 and state.consecutive_inconclusive == 0


def test_early_looks_stop_once_a_run_was_conclusive():
    spec = AnalysisSpec(successful_runs=2, interval_seconds=30)
    _, state = run_ticks(spec, [IDLE, GOOD])
    assert next_run_at(state, spec) == state.last_run_at + 30
    _, state = run_ticks(spec, [GOOD, IDLE])  # traffic dropped after a verdict: a counted run
    assert state.consecutive_inconclusive == 1 and next_run_at(state, spec) == state.last_run_at + 30


def test_prometheus_unreachable_pauses_with_metrics_unavailable():
    spec = AnalysisSpec(inconclusive_limit=2)
    actions, state = run_ticks(spec, [DOWN, DOWN])
    assert actions == [Action.CONTINUE, Action.PAUSE]
    assert state.reason == REASON_METRICS_UNAVAILABLE and "refused" in state.message
    # Checks are recorded as Inconclusive with no value, readable in status.
    assert all(check["verdict"] == "Inconclusive" and check["value"] is None for check in state.to_dict()["checks"])


def test_settled_analysis_ignores_further_runs():
    spec = AnalysisSpec()
    _, aborted = run_ticks(spec, [FAILING])
    result, again = evaluate(aborted, GOOD, 99999.0, spec)
    assert again == aborted and result.action is Action.ABORT and result.next_run_at is None
    _, passed = run_ticks(spec, [GOOD])
    result, again = evaluate(passed, FAILING, 99999.0, spec)
    assert again == passed and result.action is Action.PASS


def test_resume_after_pause_measures_again():
    spec = AnalysisSpec(inconclusive_limit=1, interval_seconds=30)
    _, paused = run_ticks(spec, [DOWN])
    result, same = evaluate(paused, GOOD, 5000.0, spec)
    assert result.action is Action.PAUSE and same == paused and not is_due(paused, spec, 10**9)
    resumed = resume(paused, 5000.0)
    assert resumed.phase is Phase.RUNNING and resumed.consecutive_inconclusive == 0
    assert next_run_at(resumed, spec) == 5030.0
    result, state = evaluate(resumed, GOOD, 5030.0, spec)
    assert result.action is Action.PASS and state.runs == 2
    assert resume(state, 6000.0) is state  # only a paused analysis resumes


def test_status_dict_is_plain_json_and_tolerant_when_read_back():
    spec = AnalysisSpec()
    nan_run = RunMeasurements(good(**{ITL_P95: math.nan}), stable())
    _, state = evaluate(AnalysisState.start(0), nan_run, 30, spec)
    status = state.to_dict()
    json.dumps(status, allow_nan=False)  # raises on a NaN number: Kubernetes status cannot hold one
    assert status["lastVerdict"] == "Inconclusive" and status["phase"] == "Running"
    # An empty or partial status (new rollout, older operator) reads back as a fresh state.
    assert AnalysisState.from_dict({}) == AnalysisState()
    assert AnalysisState.from_dict(None) == AnalysisState()
    partial = AnalysisState.from_dict({"phase": "Bogus", "consecutiveFailures": 2, "lastVerdict": "Nope"})
    assert partial.phase is Phase.RUNNING and partial.consecutive_failures == 2 and partial.last_verdict is None
    mangled = AnalysisState.from_dict({"startedAt": "yesterday", "runs": "many", "consecutiveInconclusive": -3,
                                       "checks": [{"name": "maxErrorRate", "threshold": "x", "value": "NaN"}]})
    assert (mangled.started_at, mangled.runs, mangled.consecutive_inconclusive) == (0.0, 0, 0)
    assert mangled.checks[0].value is None and mangled.checks[0].verdict is Verdict.INCONCLUSIVE


def test_state_restored_mid_analysis_decides_like_the_original():
    spec = AnalysisSpec(failure_limit=2, successful_runs=3)
    state = AnalysisState.start(0)
    _, state = evaluate(state, FAILING, 30, spec)
    restored = AnalysisState.from_dict(json.loads(json.dumps(state.to_dict())))
    original_result, original_next = evaluate(state, FAILING, 60, spec)
    restored_result, restored_next = evaluate(restored, FAILING, 60, spec)
    assert original_result == restored_result and original_next == restored_next
    assert restored_result.action is Action.ABORT


def test_run_queries_ask_only_for_what_enabled_checks_need():
    spec = AnalysisSpec.from_dict({"maxTTFTP95Ratio": 1.2, "maxITLP95Ratio": None, "windowSeconds": 120})
    canary, stable_queries = run_queries(
        spec, {"digitalworker_io_revision": "new"}, {"digitalworker_io_revision": "old"})
    assert set(canary) == {REQUEST_COUNT, ERROR_RATE, TTFT_P95}
    assert set(stable_queries) == {REQUEST_COUNT, TTFT_P95}
    assert all('digitalworker_io_revision="new"' in q.promql and "[120s]" in q.promql for q in canary.values())
    assert all('digitalworker_io_revision="old"' in q.promql for q in stable_queries.values())
    only_absolute = AnalysisSpec(max_ttft_p95_ratio=None, max_itl_p95_ratio=None)
    assert run_queries(only_absolute, {"r": "new"}, {"r": "old"})[1] == {}


def test_check_rows_for_the_status_table():
    from digital_worker.operator.analysis import check_rows, format_metric_value

    spec = AnalysisSpec(max_ttft_p95_seconds=2.0, max_queue_length=8)
    run = judge_run(spec, RunMeasurements(good(**{ERROR_RATE: 0.043, TTFT_P95: 0.8, QUEUE_LENGTH: 3.0}), stable()))
    rows = {row["check"]: row for row in check_rows(run.checks)}
    assert rows["maxErrorRate"] == {"check": "maxErrorRate", "canary": "4.30%", "stable": "", "limit": "<= 2.00%",
                                    "verdict": "Failed"}
    assert rows["maxTTFTP95Seconds"]["canary"] == "800ms" and rows["maxTTFTP95Seconds"]["limit"] == "<= 2.00s"
    assert rows["maxTTFTP95Ratio"]["stable"] == "400ms" and rows["maxTTFTP95Ratio"]["limit"] == "<= 1.5x stable"
    assert rows["maxQueueLength"]["canary"] == "3"
    assert format_metric_value(TTFT_P95, None) == "-" and format_metric_value(TTFT_P95, math.nan) == "-"
    # Rows come from a state read back from status just as well.
    _, state = evaluate(AnalysisState.start(0), RunMeasurements(good(), stable()), 30, spec)
    restored = AnalysisState.from_dict(json.loads(json.dumps(state.to_dict())))
    assert check_rows(restored.checks) == check_rows(state.checks)


def test_a_canary_failing_every_request_aborts_although_it_has_no_latencies():
    broken = RunMeasurements(good(**{ERROR_RATE: 1.0, TTFT_P95: None, ITL_P95: None, E2E_P95: None}), stable())
    actions, state = run_ticks(AnalysisSpec(), [broken])
    assert actions == [Action.ABORT]
    verdicts = {check.name: check.verdict for check in state.checks}
    assert verdicts == {"maxErrorRate": Verdict.FAILED, "maxTTFTP95Ratio": Verdict.INCONCLUSIVE,
                        "maxITLP95Ratio": Verdict.INCONCLUSIVE}


# ---------------------------------------------------------------- confidence-bounded error rate


def test_wilson_bounds():
    from digital_worker.operator.analysis import wilson_bounds

    low, high = wilson_bounds(0.0, 12, 0.9)
    assert low == 0.0 and 0.1 < high < 0.13  # 12 clean requests prove little
    low, high = wilson_bounds(0.0, 200, 0.9)
    assert high < 0.01
    low, high = wilson_bounds(0.05, 200, 0.9)
    assert 0.03 < low < 0.05 < high < 0.08
    assert wilson_bounds(0.5, 0, 0.9) == (0.0, 1.0)
    # Higher confidence, wider bounds.
    assert wilson_bounds(0.05, 100, 0.99)[0] < wilson_bounds(0.05, 100, 0.9)[0]


@pytest.mark.parametrize(
    ("rate", "requests", "verdict"),
    [
        (0.0, 12, Verdict.INCONCLUSIVE),  # a point estimate would call this a pass
        (0.0, 150, Verdict.SUCCESSFUL),
        (0.05, 20, Verdict.INCONCLUSIVE),  # 1 error in 20: could be bad luck
        (0.05, 200, Verdict.FAILED),
        (0.5, 20, Verdict.FAILED),
        (0.01, 2000, Verdict.SUCCESSFUL),
    ],
)
def test_error_rate_with_confidence(rate, requests, verdict):
    spec = AnalysisSpec(error_rate_confidence=0.9, min_requests=10, max_ttft_p95_ratio=None, max_itl_p95_ratio=None)
    run = judge_run(spec, RunMeasurements(good(**{ERROR_RATE: rate, REQUEST_COUNT: requests}), stable()))
    (check,) = run.checks
    assert check.verdict is verdict and "bounds" in check.message
    assert run.verdict is verdict


def test_error_rate_confidence_spec_key():
    assert AnalysisSpec.from_dict({"errorRateConfidence": 0.95}).error_rate_confidence == 0.95
    for bad in (1.0, 0.2, "high"):
        with pytest.raises(ValueError, match="analysis.errorRateConfidence"):
            AnalysisSpec.from_dict({"errorRateConfidence": bad})


# ---------------------------------------------------------------- baseline before the step


def test_relative_checks_use_the_baseline_when_the_stable_has_no_traffic():
    spec = AnalysisSpec()
    no_stable_traffic = stable(**{REQUEST_COUNT: 0.0, TTFT_P95: None, ITL_P95: None})
    baseline = {REQUEST_COUNT: Measurement(QUERY, 500.0, 1), TTFT_P95: Measurement(QUERY, 0.4, 1),
                ITL_P95: Measurement(QUERY, 0.02, 1), ERROR_RATE: Measurement(QUERY, None, 0)}
    state = AnalysisState.start(0.0, baseline=baseline)
    assert dict(state.baseline) == {REQUEST_COUNT: 500.0, TTFT_P95: 0.4, ITL_P95: 0.02}  # unusable ones dropped
    assert AnalysisState.from_dict(json.loads(json.dumps(state.to_dict()))) == state

    slow = RunMeasurements(good(**{TTFT_P95: 0.8}), no_stable_traffic)
    result, _ = evaluate(state, slow, 30.0, spec)
    ratio = {check.name: check for check in result.checks}["maxTTFTP95Ratio"]
    assert ratio.verdict is Verdict.FAILED and ratio.baseline == 0.4
    assert "stable before the step" in ratio.message
    result, _ = evaluate(state, RunMeasurements(good(), no_stable_traffic), 30.0, spec)
    assert result.action is Action.PASS

    # Without a baseline, or with one too thin to trust, the relative checks stay Inconclusive.
    result, _ = evaluate(AnalysisState.start(0.0), slow, 30.0, spec)
    assert result.verdict is Verdict.INCONCLUSIVE
    thin = AnalysisState.start(0.0, baseline={REQUEST_COUNT: 3.0, TTFT_P95: 0.4, ITL_P95: 0.02})
    assert evaluate(thin, slow, 30.0, spec)[0].verdict is Verdict.INCONCLUSIVE


def test_live_stable_traffic_wins_over_the_baseline():
    state = AnalysisState.start(0.0, baseline={REQUEST_COUNT: 500.0, TTFT_P95: 10.0, ITL_P95: 1.0})
    result, _ = evaluate(state, SLOW, 30.0, AnalysisSpec())
    ratio = {check.name: check for check in result.checks}["maxTTFTP95Ratio"]
    assert ratio.baseline == 0.4 and ratio.verdict is Verdict.FAILED
