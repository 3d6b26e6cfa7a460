"""`latencyRatioConfidence`: latency ratios judged by confidence bounds of both revisions' p95.

A p95 from a few dozen requests is about the second- to fourth-highest of them, read off SGLang's
coarse histogram buckets, so a point-estimate ratio fails healthy canaries and passes slow ones
by chance. With the option, a ratio check says Failed or Successful only when the bounds agree,
else Inconclusive. The bounds are computed by the in-process provider here (from
SGLang-bucketed histograms, the path `digital-worker dev` takes) and by PromQL against a real
Prometheus in test_analysis_prometheus.py.
"""
from __future__ import annotations

import numpy as np
import pytest

from digital_worker.operator.analysis import (
    AnalysisSpec,
    CheckDefinition,
    Verdict,
    judge_relative_with_confidence,
    judge_run,
    measure_run,
    run_queries,
)
from digital_worker.operator.autoscaling.metrics import ScrapeSample
from digital_worker.operator.inprocess_analysis import InProcessAnalysisProvider
from digital_worker.operator.metric_providers import (
    LOWER,
    TTFT_P95,
    UPPER,
    bound_name,
    bound_quantile,
    revision_matchers,
)
from digital_worker.runtime.sglang_metrics import E2E_BUCKETS, TTFT_BUCKETS

RATIO = CheckDefinition("maxTTFTP95Ratio", TTFT_P95, 1.5, relative=True)
LOW, HIGH = bound_name(TTFT_P95, LOWER), bound_name(TTFT_P95, UPPER)


def revision(point, low, high) -> dict:
    return {TTFT_P95: point, LOW: low, HIGH: high}


# ---------------------------------------------------------------- pure


def test_bound_levels_narrow_with_more_observations_and_saturate_with_few():
    assert bound_quantile(0.95, 20, 0.9, UPPER) == 1.0  # p95 of 20 requests: no better known than their max
    widths = [bound_quantile(0.95, n, 0.9, UPPER) - bound_quantile(0.95, n, 0.9, LOWER) for n in (100, 400, 1600)]
    assert widths[0] > widths[1] > widths[2] > 0
    assert widths[0] == pytest.approx(2 * widths[1]) == pytest.approx(4 * widths[2])  # 1/sqrt(n)
    assert bound_quantile(0.95, 400, 0.99, UPPER) > bound_quantile(0.95, 400, 0.9, UPPER)
    assert bound_quantile(0.95, 0, 0.9, LOWER) == 0.0 and bound_quantile(0.95, 0, 0.9, UPPER) == 1.0


@pytest.mark.parametrize("canary,stable,verdict", [
    (revision(0.50, 0.46, 0.55), revision(0.45, 0.43, 0.47), Verdict.SUCCESSFUL),  # 0.55 <= 1.5 x 0.43
    (revision(0.90, 0.80, 1.00), revision(0.45, 0.43, 0.47), Verdict.FAILED),  # 0.80 > 1.5 x 0.47
    # The tour's false abort: 1.54x by the point estimates, but the bounds overlap 1.5x.
    (revision(0.506, 0.40, 0.62), revision(0.329, 0.30, 0.36), Verdict.INCONCLUSIVE),
    (revision(0.50, None, 0.55), revision(0.45, 0.43, 0.47), Verdict.INCONCLUSIVE),
    (revision(0.50, 0.46, 0.55), revision(0.45, 0.43, None), Verdict.INCONCLUSIVE),
    (revision(0.0005, 0.0004, 0.0009), revision(0.0, 0.0, 0.0), Verdict.SUCCESSFUL),  # floored baseline
])
def test_ratio_verdict_needs_the_bounds_to_agree(canary, stable, verdict):
    result = judge_relative_with_confidence(RATIO, canary, stable, 0.9)
    assert result.verdict is verdict, result.message
    assert result.value == canary[TTFT_P95] and result.baseline == stable[TTFT_P95]
    if verdict is not Verdict.INCONCLUSIVE or None not in (*canary.values(), *stable.values()):
        assert "90% bounds" in result.message


def test_only_ratio_checks_ask_for_bounds_and_only_with_the_option():
    matchers = revision_matchers("ns", "w", "c"), revision_matchers("ns", "w", "s")
    plain = AnalysisSpec.from_dict({"maxTTFTP95Ratio": 1.5, "maxITLP95Ratio": None})
    canary, stable = run_queries(plain, *matchers)
    assert LOW not in canary and LOW not in stable
    with_bounds = AnalysisSpec.from_dict({"maxTTFTP95Ratio": 1.5, "maxITLP95Ratio": None,
                                          "latencyRatioConfidence": 0.9})
    canary, stable = run_queries(with_bounds, *matchers)
    assert {LOW, HIGH} <= set(canary) and {LOW, HIGH} <= set(stable)
    assert bound_name("itl_p95", LOWER) not in canary  # its check is off
    assert canary[HIGH].confidence == 0.9 and canary[HIGH].quantile == 0.95
    with pytest.raises(ValueError, match="latencyRatioConfidence"):
        AnalysisSpec.from_dict({"latencyRatioConfidence": 1.0})


# ---------------------------------------------------------------- through the in-process provider


def _cumulative(values: np.ndarray, bounds) -> tuple[tuple[float, float], ...]:
    return tuple((float(b), float(np.sum(values <= b))) for b in bounds) + ((float("inf"), float(len(values))),)


def _scrape(at: float, ttft: np.ndarray) -> ScrapeSample:
    return ScrapeSample(time=at, requests_total=float(len(ttft)), prompt_tokens_total=0.0,
                        generation_tokens_total=0.0, queue=0.0, running=0.0, token_usage=0.0,
                        ttft_buckets=_cumulative(ttft, TTFT_BUCKETS), e2e_buckets=_cumulative(ttft + 5.0, E2E_BUCKETS))


def _verdicts(n_canary: int, n_stable: int, slowdown: float, sigma: float, confidence: float | None,
              trials: int = 150) -> dict[Verdict, float]:
    """Share of verdicts over `trials` windows: lognormal TTFTs (median 0.25 s) on SGLang's
    buckets, the canary `slowdown` times slower, judged at maxTTFTP95Ratio 1.5."""
    rng = np.random.default_rng(7)
    spec = AnalysisSpec.from_dict({"windowSeconds": 60, "minRequests": 20, "maxErrorRate": None,
                                   "maxITLP95Ratio": None, "maxTTFTP95Ratio": 1.5,
                                   **({"latencyRatioConfidence": confidence} if confidence else {})})
    counts = dict.fromkeys(Verdict, 0)
    for _ in range(trials):
        provider = InProcessAnalysisProvider()
        for name, n, factor in (("canary", n_canary, slowdown), ("stable", n_stable, 1.0)):
            ttft = factor * 0.25 * np.exp(sigma * rng.standard_normal(n))
            provider.record("ns", "w", name, "pod", _scrape(0.0, ttft[:0]))
            provider.record("ns", "w", name, "pod", _scrape(59.0, ttft))
        provider.mark_scraped("ns", "w", 59.5)
        run = measure_run(provider, spec, revision_matchers("ns", "w", "canary"),
                          revision_matchers("ns", "w", "stable"), at=60.0)
        counts[judge_run(spec, run).verdict] += 1
    return {verdict: count / trials for verdict, count in counts.items()}


def test_few_requests_no_longer_pass_a_twice_slower_canary_by_chance():
    # 20 canary requests (minRequests' default): the point estimate waves a 2x slower canary
    # through about one window in six; the bounds almost never do, and say Inconclusive instead.
    point = _verdicts(20, 80, slowdown=2.0, sigma=0.4, confidence=None)
    bounded = _verdicts(20, 80, slowdown=2.0, sigma=0.4, confidence=0.9)
    assert point[Verdict.SUCCESSFUL] >= 0.10
    assert bounded[Verdict.SUCCESSFUL] <= 0.03
    assert bounded[Verdict.INCONCLUSIVE] >= 0.5


def test_heavy_tails_no_longer_fail_a_healthy_canary_by_chance():
    # Near saturation TTFT has a heavy tail: the point estimate fails a healthy canary now and
    # then; the bounds never do, and pass it once the requests tell.
    point = _verdicts(75, 300, slowdown=1.0, sigma=0.8, confidence=None)
    bounded = _verdicts(75, 300, slowdown=1.0, sigma=0.8, confidence=0.9)
    assert point[Verdict.FAILED] >= 0.02
    assert bounded[Verdict.FAILED] == 0.0
    enough = _verdicts(500, 2000, slowdown=1.0, sigma=0.8, confidence=0.9)
    assert enough[Verdict.FAILED] == 0.0 and enough[Verdict.SUCCESSFUL] >= 0.9


def test_a_twice_slower_canary_is_still_failed_once_the_requests_tell():
    bounded = _verdicts(500, 2000, slowdown=2.0, sigma=0.8, confidence=0.9)
    assert bounded[Verdict.FAILED] >= 0.95 and bounded[Verdict.SUCCESSFUL] == 0.0
