"""Rollout analysis: is the new revision as good as the old one, by the numbers that matter for LLMs?

Shaped like Argo Rollouts' `analysis/analysis.go`, written for SGLang: checks on error rate,
time to first token, inter-token latency, end-to-end latency, queue length and KV usage, both
absolute (`maxTTFTP95Seconds: 2`) and relative to the stable revision over the same window
(`maxTTFTP95Ratio: 1.2`: canary p95 at most 1.2 x stable p95).

Everything here is pure except `measure_run` at the bottom:
- `judge_absolute` / `judge_relative` give one check's verdict (`judge_rate_with_confidence` and
  `judge_relative_with_confidence` when the spec asks for evidence either way),
- `judge_run` gives one analysis run's verdict from all checks,
- `evaluate(state, measurements, now, spec) -> (AnalysisResult, new_state)` folds a run into the
  `AnalysisState` (kept in `status.rollout.analysis`, so it survives an operator restart) and decides
  continue / pass / abort / pause.

Missing evidence is never a pass: fewer than `minRequests` finished requests in the window, NaN,
an empty result or a provider error make a check Inconclusive; `inconclusiveLimit` consecutive
Inconclusive runs pause the rollout for a human, `failureLimit` consecutive Failed runs abort it.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from enum import Enum
from statistics import NormalDist
from typing import Any, Mapping

from digital_worker.operator.metric_providers import (
    E2E_P95,
    ERROR_RATE,
    HTTP_ERROR_RATE,
    ITL_P95,
    KV_USAGE,
    LATENCY_QUANTILES,
    LOWER,
    QUEUE_LENGTH,
    REQUEST_COUNT,
    SGLANG_HTTP_RESPONSES,
    TTFT_P95,
    UPPER,
    HttpErrorSource,
    LabelMatchers,
    Measurement,
    MetricProvider,
    MetricQuery,
    bound_name,
    revision_queries,
)


class Verdict(str, Enum):
    SUCCESSFUL = "Successful"
    FAILED = "Failed"
    INCONCLUSIVE = "Inconclusive"


class Action(str, Enum):
    CONTINUE = "Continue"  # keep measuring
    PASS = "Pass"  # enough successful runs: the step may proceed
    ABORT = "Abort"  # failureLimit consecutive failures: roll back
    PAUSE = "Pause"  # inconclusiveLimit consecutive inconclusive runs: wait for a human


class Phase(str, Enum):
    RUNNING = "Running"
    SUCCESSFUL = "Successful"
    FAILED = "Failed"
    PAUSED = "Paused"


# Reasons (for status conditions and Events).
REASON_PASSED = "AnalysisPassed"
REASON_FAILED = "AnalysisFailed"
REASON_INCONCLUSIVE = "AnalysisInconclusive"
REASON_METRICS_UNAVAILABLE = "MetricsUnavailable"

# Relative checks divide by the stable value; these floors keep a near-zero baseline from turning
# one stray error or a sub-millisecond latency into an infinite ratio.
ERROR_RATE_BASELINE_FLOOR = 0.001
LATENCY_BASELINE_FLOOR_SECONDS = 0.001


# ---------------------------------------------------------------- the spec


@dataclass(frozen=True)
class AnalysisSpec:
    """`spec.rollout.analysis`, with defaults for what is not given. None disables a check."""

    max_error_rate: float | None = 0.02
    max_http_error_rate: float | None = None
    max_ttft_p95_seconds: float | None = None
    max_itl_p95_seconds: float | None = None
    max_e2e_p95_seconds: float | None = None
    max_queue_length: float | None = None
    max_kv_usage: float | None = None
    max_ttft_p95_ratio: float | None = 1.5
    max_itl_p95_ratio: float | None = 1.5
    max_e2e_p95_ratio: float | None = None
    max_error_rate_ratio: float | None = None
    min_requests: int = 20
    window_seconds: float = 60.0
    interval_seconds: float = 30.0
    # Delay before the first run, so the window holds the new revision's traffic; None: one interval.
    initial_delay_seconds: float | None = None
    failure_limit: int = 1
    inconclusive_limit: int = 2
    successful_runs: int = 1
    # Judge maxErrorRate by a one-sided Wilson confidence bound at this level instead of the
    # point estimate: Failed only when confidently above the limit, Successful only when
    # confidently below it, Inconclusive in between (too few requests to tell). None: off.
    error_rate_confidence: float | None = None
    # Judge the latency ratios (maxTTFTP95Ratio, maxITLP95Ratio, maxE2EP95Ratio) by confidence
    # bounds of both revisions' p95 at this level: Failed only when the canary's lower bound is
    # above the ratio times the stable's upper bound, Successful only when its upper bound is
    # within the ratio times the stable's lower bound, Inconclusive in between. None: off.
    latency_ratio_confidence: float | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "AnalysisSpec":
        """Parse camelCase keys; raise ValueError naming the first bad field."""
        data = dict(data or {})
        values: dict[str, Any] = {}
        for key, raw in data.items():
            attribute = _SPEC_KEYS.get(key)
            if attribute is None:
                raise ValueError(f"analysis.{key}: unknown field (known: {', '.join(sorted(_SPEC_KEYS))})")
            values[attribute] = _parse_spec_value(key, attribute, raw)
        spec = cls(**values)
        if spec.window_seconds < 1:
            raise ValueError("analysis.windowSeconds: must be at least 1")
        if spec.interval_seconds < 1:
            raise ValueError("analysis.intervalSeconds: must be at least 1")
        return spec

    def to_dict(self) -> dict[str, Any]:
        return {key: getattr(self, attribute) for key, attribute in _SPEC_KEYS.items()}

    def first_run_delay(self) -> float:
        return self.interval_seconds if self.initial_delay_seconds is None else self.initial_delay_seconds

    def checks(self) -> tuple["CheckDefinition", ...]:
        """The enabled checks, absolute first, in a fixed order."""
        definitions = []
        for key, metric in _ABSOLUTE_CHECKS:
            threshold = getattr(self, _SPEC_KEYS[key])
            if threshold is not None:
                definitions.append(CheckDefinition(key, metric, threshold, relative=False))
        for key, metric in _RELATIVE_CHECKS:
            threshold = getattr(self, _SPEC_KEYS[key])
            if threshold is not None:
                definitions.append(CheckDefinition(key, metric, threshold, relative=True))
        return tuple(definitions)

    def needs_stable(self) -> bool:
        return any(check.relative for check in self.checks())


_SPEC_KEYS: dict[str, str] = {
    "maxErrorRate": "max_error_rate",
    "maxHTTPErrorRate": "max_http_error_rate",
    "maxTTFTP95Seconds": "max_ttft_p95_seconds",
    "maxITLP95Seconds": "max_itl_p95_seconds",
    "maxE2EP95Seconds": "max_e2e_p95_seconds",
    "maxQueueLength": "max_queue_length",
    "maxKVUsage": "max_kv_usage",
    "maxTTFTP95Ratio": "max_ttft_p95_ratio",
    "maxITLP95Ratio": "max_itl_p95_ratio",
    "maxE2EP95Ratio": "max_e2e_p95_ratio",
    "maxErrorRateRatio": "max_error_rate_ratio",
    "minRequests": "min_requests",
    "windowSeconds": "window_seconds",
    "intervalSeconds": "interval_seconds",
    "initialDelaySeconds": "initial_delay_seconds",
    "failureLimit": "failure_limit",
    "inconclusiveLimit": "inconclusive_limit",
    "successfulRuns": "successful_runs",
    "errorRateConfidence": "error_rate_confidence",
    "latencyRatioConfidence": "latency_ratio_confidence",
}
_INTEGER_KEYS = {"minRequests", "failureLimit", "inconclusiveLimit", "successfulRuns"}
_AT_LEAST_ONE_KEYS = {"failureLimit", "inconclusiveLimit", "successfulRuns"}
_NOT_NULLABLE_KEYS = _INTEGER_KEYS | {"windowSeconds", "intervalSeconds"}

_ABSOLUTE_CHECKS = (
    ("maxErrorRate", ERROR_RATE),
    ("maxHTTPErrorRate", HTTP_ERROR_RATE),
    ("maxTTFTP95Seconds", TTFT_P95),
    ("maxITLP95Seconds", ITL_P95),
    ("maxE2EP95Seconds", E2E_P95),
    ("maxQueueLength", QUEUE_LENGTH),
    ("maxKVUsage", KV_USAGE),
)
_RELATIVE_CHECKS = (
    ("maxTTFTP95Ratio", TTFT_P95),
    ("maxITLP95Ratio", ITL_P95),
    ("maxE2EP95Ratio", E2E_P95),
    ("maxErrorRateRatio", ERROR_RATE),
)


def _parse_spec_value(key: str, attribute: str, raw: Any) -> Any:
    if raw is None:
        if key in _NOT_NULLABLE_KEYS:
            raise ValueError(f"analysis.{key}: must not be null")
        return None
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
        raise ValueError(f"analysis.{key}: must be a number, got {raw!r}")
    if raw < 0:
        raise ValueError(f"analysis.{key}: must not be negative, got {raw!r}")
    if key in _INTEGER_KEYS:
        if raw != int(raw):
            raise ValueError(f"analysis.{key}: must be a whole number, got {raw!r}")
        raw = int(raw)
        if key in _AT_LEAST_ONE_KEYS and raw < 1:
            raise ValueError(f"analysis.{key}: must be at least 1, got {raw!r}")
        return raw
    if key.endswith("Ratio") and raw <= 0:
        raise ValueError(f"analysis.{key}: must be greater than 0, got {raw!r}")
    if key in ("errorRateConfidence", "latencyRatioConfidence") and not 0.5 <= raw < 1:
        raise ValueError(f"analysis.{key}: must be in [0.5, 1), e.g. 0.9, got {raw!r}")
    return float(raw)


@dataclass(frozen=True)
class CheckDefinition:
    key: str  # the spec key, e.g. "maxTTFTP95Ratio"; also the check's name in status
    metric: str  # measurement name, e.g. "ttft_p95"
    threshold: float
    relative: bool


# ---------------------------------------------------------------- verdicts (pure)


@dataclass(frozen=True)
class CheckResult:
    name: str
    metric: str
    verdict: Verdict
    threshold: float
    value: float | None = None
    # Relative checks: the stable revision's value over the same window.
    baseline: float | None = None
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "metric": self.metric,
            "verdict": self.verdict.value,
            "threshold": self.threshold,
            "value": _finite_or_none(self.value),
            "baseline": _finite_or_none(self.baseline),
            "message": self.message,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CheckResult":
        return cls(
            name=str(data.get("name", "")),
            metric=str(data.get("metric", "")),
            verdict=_enum_or(Verdict, data.get("verdict"), Verdict.INCONCLUSIVE),
            threshold=_float_or_none(data.get("threshold")) or 0.0,
            value=_float_or_none(data.get("value")),
            baseline=_float_or_none(data.get("baseline")),
            message=str(data.get("message", "")),
        )


MeasurementLike = Measurement | float | int | None


def _as_value(measurement: MeasurementLike) -> tuple[float | None, str | None]:
    """(value, why it is unusable) for a Measurement or a bare number."""
    if measurement is None:
        return None, "not measured"
    if isinstance(measurement, Measurement):
        if measurement.error is not None:
            return None, f"metrics unavailable: {measurement.error}"
        if measurement.value is None:
            return None, "no data" if measurement.series_count == 0 else "no number (NaN)"
        value = measurement.value
    else:
        value = float(measurement)
    if not math.isfinite(value):
        return None, "no number (NaN)"
    return value, None


def judge_absolute(definition: CheckDefinition, measurement: MeasurementLike) -> CheckResult:
    """value <= threshold: Successful; above: Failed; no usable value: Inconclusive."""
    value, problem = _as_value(measurement)
    if problem is not None:
        return CheckResult(definition.key, definition.metric, Verdict.INCONCLUSIVE, definition.threshold,
                           message=f"{definition.metric}: {problem}")
    verdict = Verdict.SUCCESSFUL if value <= definition.threshold else Verdict.FAILED
    relation = "<=" if verdict is Verdict.SUCCESSFUL else ">"
    return CheckResult(definition.key, definition.metric, verdict, definition.threshold, value,
                       message=f"{definition.metric} {_fmt(value)} {relation} {_fmt(definition.threshold)}")


def wilson_bounds(rate: float, requests: float, confidence: float) -> tuple[float, float]:
    """One-sided Wilson score bounds (lower, upper) of a proportion seen as `rate` in `requests`
    trials, each holding with probability `confidence`. Well-behaved at 0 errors and small n."""
    if requests <= 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(confidence)
    p = min(max(rate, 0.0), 1.0)
    denominator = 1 + z * z / requests
    centre = (p + z * z / (2 * requests)) / denominator
    spread = z * math.sqrt(p * (1 - p) / requests + z * z / (4 * requests * requests)) / denominator
    return max(0.0, centre - spread), min(1.0, centre + spread)


def judge_rate_with_confidence(
    definition: CheckDefinition, measurement: MeasurementLike, requests: MeasurementLike, confidence: float
) -> CheckResult:
    """A proportion check that needs evidence either way: Failed when the lower bound exceeds the
    limit, Successful when the upper bound is within it, Inconclusive otherwise."""
    value, problem = _as_value(measurement)
    count, count_problem = _as_value(requests)
    if problem is not None or count_problem is not None:
        why = problem if problem is not None else f"request count: {count_problem}"
        return CheckResult(definition.key, definition.metric, Verdict.INCONCLUSIVE, definition.threshold,
                           value, message=f"{definition.metric}: {why}")
    low, high = wilson_bounds(value, count, confidence)
    bounds = f"{_fmt(value)} ({confidence:.0%} bounds {_fmt(low)}..{_fmt(high)} over {count:.0f} requests)"
    if low > definition.threshold:
        verdict, relation = Verdict.FAILED, ">"
    elif high <= definition.threshold:
        verdict, relation = Verdict.SUCCESSFUL, "<="
    else:
        verdict, relation = Verdict.INCONCLUSIVE, "not clearly within"
    return CheckResult(definition.key, definition.metric, verdict, definition.threshold, value,
                       message=f"{definition.metric} {bounds} {relation} {_fmt(definition.threshold)}")


def judge_relative(
    definition: CheckDefinition, canary: MeasurementLike, stable: MeasurementLike
) -> CheckResult:
    """canary <= ratio x max(stable, floor): Successful; above: Failed; either missing: Inconclusive."""
    canary_value, canary_problem = _as_value(canary)
    stable_value, stable_problem = _as_value(stable)
    if canary_problem or stable_problem:
        problem = f"canary {canary_problem}" if canary_problem else f"stable {stable_problem}"
        return CheckResult(definition.key, definition.metric, Verdict.INCONCLUSIVE, definition.threshold,
                           canary_value, stable_value, f"{definition.metric}: {problem}")
    floor = ERROR_RATE_BASELINE_FLOOR if definition.metric == ERROR_RATE else LATENCY_BASELINE_FLOOR_SECONDS
    baseline = max(stable_value, floor)
    ratio = canary_value / baseline
    verdict = Verdict.SUCCESSFUL if ratio <= definition.threshold else Verdict.FAILED
    relation = "<=" if verdict is Verdict.SUCCESSFUL else ">"
    return CheckResult(
        definition.key, definition.metric, verdict, definition.threshold, canary_value, stable_value,
        f"{definition.metric} canary {_fmt(canary_value)} / stable {_fmt(stable_value)} = "
        f"{ratio:.2f}x {relation} {_fmt(definition.threshold)}x",
    )


def judge_relative_with_confidence(
    definition: CheckDefinition,
    canary: Mapping[str, MeasurementLike],
    reference: Mapping[str, MeasurementLike],
    confidence: float,
) -> CheckResult:
    """A latency ratio that needs evidence either way, from each revision's p95 and its
    confidence bounds (`bound_name`): Failed when even the canary's lower bound exceeds the ratio
    times the stable's upper bound, Successful when even the canary's upper bound is within the
    ratio times the stable's lower bound, Inconclusive otherwise (too few requests to tell)."""
    names = (definition.metric, bound_name(definition.metric, LOWER), bound_name(definition.metric, UPPER))
    canary_values = [_as_value(canary.get(name)) for name in names]
    stable_values = [_as_value(reference.get(name)) for name in names]
    point = canary_values[0][0]
    for revision, values in (("canary", canary_values), ("stable", stable_values)):
        problem = next((problem for _, problem in values if problem is not None), None)
        if problem is not None:
            return CheckResult(definition.key, definition.metric, Verdict.INCONCLUSIVE, definition.threshold,
                               point, stable_values[0][0], f"{definition.metric}: {revision} {problem}")
    (canary_point, _), (canary_low, _), (canary_high, _) = canary_values
    (stable_point, _), (stable_low, _), (stable_high, _) = stable_values
    ratio = definition.threshold
    if canary_low > ratio * max(stable_high, LATENCY_BASELINE_FLOOR_SECONDS):
        verdict, relation = Verdict.FAILED, ">"
    elif canary_high <= ratio * max(stable_low, LATENCY_BASELINE_FLOOR_SECONDS):
        verdict, relation = Verdict.SUCCESSFUL, "<="
    else:
        verdict, relation = Verdict.INCONCLUSIVE, "not clearly within"
    return CheckResult(
        definition.key, definition.metric, verdict, definition.threshold, canary_point, stable_point,
        f"{definition.metric} canary {_fmt(canary_point)} ({confidence:.0%} bounds {_fmt(canary_low)}.."
        f"{_fmt(canary_high)}) / stable {_fmt(stable_point)} ({_fmt(stable_low)}..{_fmt(stable_high)}) = "
        f"{canary_point / max(stable_point, LATENCY_BASELINE_FLOOR_SECONDS):.2f}x {relation} {_fmt(ratio)}x",
    )


@dataclass(frozen=True)
class RunMeasurements:
    """One run's numbers: measurement name -> Measurement (or a bare number) per revision."""

    canary: Mapping[str, MeasurementLike]
    stable: Mapping[str, MeasurementLike] | None = None

    def provider_errors(self) -> list[str]:
        errors = []
        for revision, values in (("canary", self.canary), ("stable", self.stable or {})):
            for name, measurement in values.items():
                if isinstance(measurement, Measurement) and measurement.error is not None:
                    errors.append(f"{revision} {name}: {measurement.error}")
        return errors


@dataclass(frozen=True)
class RunResult:
    verdict: Verdict
    checks: tuple[CheckResult, ...]
    message: str
    # Some measurement came back with a provider error (e.g. Prometheus unreachable).
    metrics_unavailable: bool = False
    # Inconclusive only because the canary has fewer than minRequests in the window (yet).
    too_few_requests: bool = False


def _traffic_gate(spec: AnalysisSpec, measurements: Mapping[str, MeasurementLike] | None) -> str | None:
    """Why a revision's numbers cannot be trusted yet (too few requests), or None."""
    if spec.min_requests <= 0:
        return None
    value, problem = _as_value((measurements or {}).get(REQUEST_COUNT))
    if problem is not None:
        return f"request count: {problem}"
    if value < spec.min_requests:
        return f"{value:.0f} requests in the window < minRequests {spec.min_requests}"
    return None


def judge_run(
    spec: AnalysisSpec, measurements: RunMeasurements, baseline: Mapping[str, MeasurementLike] | None = None
) -> RunResult:
    """All checks of one run. Any Failed -> Failed; else any Inconclusive (or no checks) ->
    Inconclusive; else Successful. Too few canary requests make every check Inconclusive.

    Relative checks compare with the stable over the same window; when the stable has no traffic
    now (the canary took it all: `setWeight: 100`, a blue-green post-promotion analysis) they
    compare with `baseline`, the stable's numbers captured before the step, if one was."""
    definitions = spec.checks()
    errors = measurements.provider_errors()
    canary_gate = _traffic_gate(spec, measurements.canary)
    stable_gate = _traffic_gate(spec, measurements.stable) if spec.needs_stable() else None
    reference, reference_name = measurements.stable or {}, "stable"
    if stable_gate is not None and baseline and _traffic_gate(spec, baseline) is None:
        reference, reference_name, stable_gate = baseline, "baseline", None
    results = []
    for definition in definitions:
        if canary_gate is not None:
            result = CheckResult(definition.key, definition.metric, Verdict.INCONCLUSIVE,
                                 definition.threshold, message=f"canary: {canary_gate}")
        elif definition.key == "maxErrorRate" and spec.error_rate_confidence is not None:
            result = judge_rate_with_confidence(
                definition, measurements.canary.get(definition.metric), measurements.canary.get(REQUEST_COUNT),
                spec.error_rate_confidence)
        elif not definition.relative:
            result = judge_absolute(definition, measurements.canary.get(definition.metric))
        elif stable_gate is not None:
            result = CheckResult(definition.key, definition.metric, Verdict.INCONCLUSIVE,
                                 definition.threshold, message=f"stable: {stable_gate}")
        else:
            if spec.latency_ratio_confidence is not None and definition.metric in LATENCY_QUANTILES:
                result = judge_relative_with_confidence(definition, measurements.canary, reference,
                                                        spec.latency_ratio_confidence)
            else:
                result = judge_relative(definition, measurements.canary.get(definition.metric),
                                        reference.get(definition.metric))
            if reference_name == "baseline":
                result = replace(result, message=result.message.replace(" / stable ", " / stable before the step "))
        results.append(result)
    checks = tuple(results)
    failed = [check for check in checks if check.verdict is Verdict.FAILED]
    inconclusive = [check for check in checks if check.verdict is Verdict.INCONCLUSIVE]
    if failed:
        return RunResult(Verdict.FAILED, checks, "; ".join(check.message for check in failed), bool(errors))
    if not checks:
        return RunResult(Verdict.INCONCLUSIVE, checks, "no analysis checks are enabled", bool(errors))
    if inconclusive:
        if errors:
            message = "metrics unavailable: " + errors[0]
        elif canary_gate is not None:
            message = f"canary: {canary_gate}"
        else:
            message = "; ".join(check.message for check in inconclusive)
        return RunResult(Verdict.INCONCLUSIVE, checks, message, bool(errors),
                         too_few_requests=canary_gate is not None and not errors)
    return RunResult(Verdict.SUCCESSFUL, checks, "all checks passed", bool(errors))


# ---------------------------------------------------------------- state and decisions (pure)


@dataclass(frozen=True)
class AnalysisState:
    """What `status.rollout.analysis` keeps between runs (and across operator restarts)."""

    phase: Phase = Phase.RUNNING
    started_at: float = 0.0
    last_run_at: float | None = None
    runs: int = 0
    successful_runs: int = 0
    consecutive_failures: int = 0
    consecutive_inconclusive: int = 0
    last_verdict: Verdict | None = None
    checks: tuple[CheckResult, ...] = field(default_factory=tuple)
    reason: str = ""
    message: str = ""
    # The stable's numbers captured before the step (measurement name, value), for relative
    # checks once the stable gets no traffic; see `measure_baseline`.
    baseline: tuple[tuple[str, float], ...] = ()
    # Early looks taken while the canary had too few requests for a verdict (see `evaluate`).
    early_looks: int = 0

    @classmethod
    def start(cls, now: float, baseline: Mapping[str, MeasurementLike] | None = None) -> "AnalysisState":
        """A fresh analysis; `baseline` keeps the usable numbers of the stable's last window."""
        kept = []
        for name, measurement in sorted((baseline or {}).items()):
            value, problem = _as_value(measurement)
            if problem is None:
                kept.append((name, value))
        return cls(started_at=now, baseline=tuple(kept))

    @property
    def finished(self) -> bool:
        return self.phase in (Phase.SUCCESSFUL, Phase.FAILED)

    def to_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase.value,
            "startedAt": self.started_at,
            "lastRunAt": self.last_run_at,
            "runs": self.runs,
            "successfulRuns": self.successful_runs,
            "consecutiveFailures": self.consecutive_failures,
            "consecutiveInconclusive": self.consecutive_inconclusive,
            "lastVerdict": self.last_verdict.value if self.last_verdict else None,
            "checks": [check.to_dict() for check in self.checks],
            "reason": self.reason,
            "message": self.message,
            "baseline": dict(self.baseline),
            "earlyLooks": self.early_looks,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "AnalysisState":
        """Tolerant of missing keys (an older operator's status, a hand-edited object)."""
        data = data or {}
        verdict = data.get("lastVerdict")
        return cls(
            phase=_enum_or(Phase, data.get("phase"), Phase.RUNNING),
            started_at=_float_or_none(data.get("startedAt")) or 0.0,
            last_run_at=_float_or_none(data.get("lastRunAt")),
            runs=_count(data.get("runs")),
            successful_runs=_count(data.get("successfulRuns")),
            consecutive_failures=_count(data.get("consecutiveFailures")),
            consecutive_inconclusive=_count(data.get("consecutiveInconclusive")),
            last_verdict=_enum_or(Verdict, verdict, None) if verdict else None,
            checks=tuple(CheckResult.from_dict(item) for item in data.get("checks") or ()),
            reason=str(data.get("reason") or ""),
            message=str(data.get("message") or ""),
            baseline=tuple(sorted(
                (str(name), number) for name, number in
                ((name, _float_or_none(value)) for name, value in dict(data.get("baseline") or {}).items())
                if number is not None
            )),
            early_looks=_count(data.get("earlyLooks")),
        )


@dataclass(frozen=True)
class AnalysisResult:
    action: Action
    verdict: Verdict | None
    checks: tuple[CheckResult, ...]
    reason: str
    message: str
    next_run_at: float | None


def next_run_at(state: AnalysisState, spec: AnalysisSpec) -> float | None:
    """When the next run is due (None once the analysis is finished or paused)."""
    if state.phase is not Phase.RUNNING:
        return None
    if state.last_run_at is None:
        return state.started_at + spec.first_run_delay()
    if state.early_looks and state.runs == state.early_looks:  # still waiting for the canary's traffic
        return state.last_run_at + early_look_seconds(spec)
    return state.last_run_at + spec.interval_seconds


def early_look_seconds(spec: AnalysisSpec) -> float:
    return max(1.0, spec.interval_seconds / EARLY_LOOKS_PER_INTERVAL)


EARLY_LOOKS_PER_INTERVAL = 5


def is_due(state: AnalysisState, spec: AnalysisSpec, now: float) -> bool:
    due = next_run_at(state, spec)
    return due is not None and now >= due


def evaluate(
    state: AnalysisState, measurements: RunMeasurements, now: float, spec: AnalysisSpec
) -> tuple[AnalysisResult, AnalysisState]:
    """Fold one run into the state and decide. Finished or paused analyses are left as they are
    (so a replayed reconcile after a restart cannot flip a decision)."""
    if state.phase is not Phase.RUNNING:
        return _settled_result(state, spec), state

    run = judge_run(spec, measurements, dict(state.baseline))
    if run.too_few_requests and state.runs == state.early_looks and \
            state.early_looks < EARLY_LOOKS_PER_INTERVAL - 1:
        # No verdict yet and the canary's traffic is still building up (the window holds less of it
        # than minRequests): look again soon instead of a whole interval later, without counting
        # the look as a run. A bad canary is caught as soon as its requests allow; a canary with no
        # traffic still pauses after `inconclusiveLimit` runs, at most one interval later.
        new_state = replace(state, last_run_at=now, runs=state.runs + 1, early_looks=state.early_looks + 1,
                            last_verdict=run.verdict, checks=run.checks, message=run.message)
        return AnalysisResult(Action.CONTINUE, run.verdict, run.checks, "", run.message,
                              next_run_at(new_state, spec)), new_state
    successful_runs = state.successful_runs
    consecutive_failures = state.consecutive_failures
    consecutive_inconclusive = state.consecutive_inconclusive
    if run.verdict is Verdict.SUCCESSFUL:
        successful_runs += 1
        consecutive_failures = 0
        consecutive_inconclusive = 0
    elif run.verdict is Verdict.FAILED:
        consecutive_failures += 1
        consecutive_inconclusive = 0
    else:
        # Inconclusive is no evidence of recovery: it leaves the failure streak as it is.
        consecutive_inconclusive += 1

    if consecutive_failures >= spec.failure_limit:
        phase, action, reason = Phase.FAILED, Action.ABORT, REASON_FAILED
        message = f"{consecutive_failures} consecutive failed run(s): {run.message}"
    elif consecutive_inconclusive >= spec.inconclusive_limit:
        phase, action = Phase.PAUSED, Action.PAUSE
        reason = REASON_METRICS_UNAVAILABLE if run.metrics_unavailable else REASON_INCONCLUSIVE
        message = f"{consecutive_inconclusive} consecutive inconclusive run(s): {run.message}"
    elif successful_runs >= spec.successful_runs:
        phase, action, reason = Phase.SUCCESSFUL, Action.PASS, REASON_PASSED
        message = f"{successful_runs} successful run(s): {run.message}"
    else:
        phase, action, reason, message = Phase.RUNNING, Action.CONTINUE, "", run.message

    new_state = replace(
        state,
        phase=phase,
        last_run_at=now,
        runs=state.runs + 1,
        successful_runs=successful_runs,
        consecutive_failures=consecutive_failures,
        consecutive_inconclusive=consecutive_inconclusive,
        last_verdict=run.verdict,
        checks=run.checks,
        reason=reason,
        message=message,
    )
    return AnalysisResult(action, run.verdict, run.checks, reason, message, next_run_at(new_state, spec)), new_state


def resume(state: AnalysisState, now: float) -> AnalysisState:
    """A human resumed a paused analysis: fresh inconclusive count; the next run comes one
    initial delay after `now`, so its window holds data gathered after the resume."""
    if state.phase is not Phase.PAUSED:
        return state
    return replace(state, phase=Phase.RUNNING, started_at=now, last_run_at=None,
                   consecutive_inconclusive=0, reason="", message="")


def _settled_result(state: AnalysisState, spec: AnalysisSpec) -> AnalysisResult:
    action = {Phase.SUCCESSFUL: Action.PASS, Phase.FAILED: Action.ABORT, Phase.PAUSED: Action.PAUSE}[state.phase]
    return AnalysisResult(action, state.last_verdict, state.checks, state.reason, state.message,
                          next_run_at(state, spec))


# ---------------------------------------------------------------- presentation


_RATE_METRICS = (ERROR_RATE, HTTP_ERROR_RATE, KV_USAGE)
_SECONDS_METRICS = (TTFT_P95, ITL_P95, E2E_P95)


def format_metric_value(metric: str, value: float | None) -> str:
    """A measurement as a person reads it: 4.2%, 380ms, 1.25s, 3."""
    if value is None or not math.isfinite(value):
        return "-"
    if metric in _RATE_METRICS:
        return f"{value * 100:.2f}%"
    if metric in _SECONDS_METRICS:
        return f"{value * 1000:.0f}ms" if value < 1 else f"{value:.2f}s"
    return f"{value:.4g}"


def check_rows(checks: tuple[CheckResult, ...] | list[CheckResult]) -> list[dict[str, str]]:
    """Rows for `digital-worker status`: check, canary value, stable value, limit, verdict."""
    rows = []
    for check in checks:
        relative = check.name in dict(_RELATIVE_CHECKS)
        limit = (f"<= {check.threshold:g}x stable" if relative
                 else f"<= {format_metric_value(check.metric, check.threshold)}")
        rows.append({
            "check": check.name,
            "canary": format_metric_value(check.metric, check.value),
            "stable": format_metric_value(check.metric, check.baseline) if relative else "",
            "limit": limit,
            "verdict": check.verdict.value,
        })
    return rows


# ---------------------------------------------------------------- small helpers


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _float_or_none(value: Any) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _count(value: Any) -> int:
    number = _float_or_none(value)
    return max(0, int(number)) if number is not None else 0


def _enum_or(enum: type[Enum], value: Any, default: Any) -> Any:
    try:
        return enum(value)
    except ValueError:
        return default


# ---------------------------------------------------------------- client side


def run_queries(
    spec: AnalysisSpec,
    canary_matchers: LabelMatchers,
    stable_matchers: LabelMatchers | None,
    http_errors: HttpErrorSource | None = None,
) -> tuple[dict[str, MetricQuery], dict[str, MetricQuery]]:
    """Only the queries the enabled checks need: (canary queries, stable queries)."""
    bounds = set()
    if spec.latency_ratio_confidence is not None:
        bounds = {bound_name(check.metric, side) for check in spec.checks()
                  if check.relative and check.metric in LATENCY_QUANTILES for side in (LOWER, UPPER)}
    needed_canary = {REQUEST_COUNT} | {check.metric for check in spec.checks()} | bounds
    needed_stable = {REQUEST_COUNT} | {check.metric for check in spec.checks() if check.relative} | bounds
    if spec.max_http_error_rate is not None and http_errors is None:
        http_errors = SGLANG_HTTP_RESPONSES
    confidence = spec.latency_ratio_confidence
    canary_all = revision_queries(canary_matchers, spec.window_seconds, http_errors, confidence=confidence)
    canary = {name: query for name, query in canary_all.items() if name in needed_canary}
    stable: dict[str, MetricQuery] = {}
    if spec.needs_stable() and stable_matchers is not None:
        stable_all = revision_queries(stable_matchers, spec.window_seconds, http_errors, confidence=confidence)
        stable = {name: query for name, query in stable_all.items() if name in needed_stable}
    return canary, stable


def measure_run(
    provider: MetricProvider,
    spec: AnalysisSpec,
    canary_matchers: LabelMatchers,
    stable_matchers: LabelMatchers | None = None,
    http_errors: HttpErrorSource | None = None,
    at: float | None = None,
) -> RunMeasurements:
    """Ask the provider for one run's numbers (the only function here that does I/O)."""
    canary_queries, stable_queries = run_queries(spec, canary_matchers, stable_matchers, http_errors)
    # One evaluation time for both revisions: "relative to stable over the same window".
    at = time.time() if at is None else at
    canary = provider.measure_all(canary_queries, at)
    stable = provider.measure_all(stable_queries, at) if stable_queries else None
    return RunMeasurements(canary, stable)


def measure_baseline(
    provider: MetricProvider,
    spec: AnalysisSpec,
    stable_matchers: LabelMatchers,
    at: float | None = None,
    http_errors: HttpErrorSource | None = None,
) -> dict[str, Measurement]:
    """The stable's numbers over the window ending `at` (None: now), taken before a step that
    moves all traffic away from it; pass them to `AnalysisState.start(now, baseline=...)`."""
    _, stable_queries = run_queries(spec, {}, stable_matchers, http_errors)
    return provider.measure_all(stable_queries, time.time() if at is None else at)
