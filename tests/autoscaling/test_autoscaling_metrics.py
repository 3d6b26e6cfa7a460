"""Metric plumbing without servers: PromQL, exposition parsing (both name spellings), rates, resampling."""
from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from digital_worker.operator.autoscaling.history import (
    KV_CACHE_USAGE,
    PROMPT_TOKEN_RATE,
    QUEUE_LENGTH,
    REQUEST_RATE,
    ITL_P95,
    RUNNING_REQUESTS,
    TTFT_P95,
    MetricHistory,
)
from digital_worker.operator.autoscaling.metrics import (
    InMemoryMetricsSource,
    parse_sglang_exposition,
    promql_queries,
)


def exposition(requests: float, prompt_tokens: float, queue: float, running: float, usage: float,
               ttfts: list[float], openmetrics: bool = False) -> str:
    """A replica's /metrics page, registered with SGLang's own (colon) names."""
    registry = CollectorRegistry()
    Counter("sglang:num_requests", "requests", registry=registry).inc(requests)
    Counter("sglang:prompt_tokens", "prompt tokens", registry=registry).inc(prompt_tokens)
    Counter("sglang:generation_tokens", "generated tokens", registry=registry).inc(10)
    Gauge("sglang:num_queue_reqs", "queue", registry=registry).set(queue)
    Gauge("sglang:num_running_reqs", "running", registry=registry).set(running)
    Gauge("sglang:token_usage", "kv", registry=registry).set(usage)
    histogram = Histogram("sglang:time_to_first_token_seconds", "ttft", registry=registry,
                          buckets=(0.1, 0.25, 0.5, 1.0, 2.5, 5.0))
    for value in ttfts:
        histogram.observe(value)
    itl = Histogram("sglang:inter_token_latency_seconds", "itl", registry=registry, buckets=(0.01, 0.05, 0.1))
    for _ in ttfts:
        itl.observe(0.03)
    render = generate_openmetrics if openmetrics else generate_latest
    return render(registry).decode()


def test_promql_accepts_both_spellings_and_the_selector():
    queries = promql_queries('job="dw-bot",namespace="team"', 60)
    assert queries[REQUEST_RATE] == ('sum(rate({__name__=~"sglang[:_]num_requests_total",'
                                     'job="dw-bot",namespace="team"}[60s]))')
    assert queries[QUEUE_LENGTH] == 'sum({__name__=~"sglang[:_]num_queue_reqs",job="dw-bot",namespace="team"})'
    assert "histogram_quantile(0.95" in queries[TTFT_P95] and "sum by (le)" in queries[TTFT_P95]
    assert promql_queries('{job="x"}', 30)[KV_CACHE_USAGE] == 'max({__name__=~"sglang[:_]token_usage",job="x"})'


@pytest.mark.parametrize("openmetrics", [False, True])
def test_exposition_of_two_replicas_is_summed(openmetrics):
    pages = [exposition(100, 5000, 3, 7, 0.4, [0.2] * 10, openmetrics),
             exposition(50, 2500, 1, 5, 0.7, [0.8] * 10, openmetrics)]
    sample = parse_sglang_exposition(pages, now=10.0)
    assert sample.requests_total == 150 and sample.prompt_tokens_total == 7500
    assert sample.queue == 4 and sample.running == 12
    assert sample.token_usage == 0.7  # the busiest replica
    assert dict(sample.ttft_buckets)[math.inf] == 20


def test_rates_between_scrapes_and_counter_resets():
    source = InMemoryMetricsSource()
    source.record_scrape("a/b", parse_sglang_exposition([exposition(100, 1000, 0, 4, 0.2, [0.2] * 5)], now=100.0))
    assert source.history("a/b", 60, 10, now=100.0).timestamps == ()  # one scrape: no rate yet
    source.record_scrape("a/b", parse_sglang_exposition([exposition(160, 4000, 2, 6, 0.3, [0.2] * 5 + [2.0] * 5)],
                                                        now=110.0))
    history = source.history("a/b", 60, 10, now=110.0)
    assert history.latest(REQUEST_RATE) == pytest.approx(6.0)
    assert history.latest(PROMPT_TOKEN_RATE) == pytest.approx(300.0)
    assert history.latest(QUEUE_LENGTH) == 2 and history.latest(RUNNING_REQUESTS) == 6
    assert 1.0 < history.latest(TTFT_P95) <= 2.5  # only the new observations count: all 2.0 s
    assert 0.01 < history.latest(ITL_P95) <= 0.05
    # A replica restarted: its counter starts again from zero, counted like Prometheus does.
    source.record_scrape("a/b", parse_sglang_exposition([exposition(30, 100, 0, 1, 0.1, [])], now=120.0))
    assert source.history("a/b", 60, 10, now=120.0).latest(REQUEST_RATE) == pytest.approx(3.0)


def test_in_memory_history_resamples_and_goes_stale():
    source = InMemoryMetricsSource(retention_seconds=100)
    for t in range(0, 200, 5):
        source.record("k", float(t), {REQUEST_RATE: float(t)})
    # Like a Prometheus range query: one point per step back from `now`.
    history = source.history("k", 60, 20, now=195.0)
    assert list(history.timestamps) == [155.0, 175.0, 195.0]
    assert history.values(REQUEST_RATE) == (155.0, 175.0, 195.0)
    assert source.history("k", 300, 20, now=195.0).timestamps[0] >= 95  # retention dropped the rest
    assert source.history("k", 60, 20, now=600.0).timestamps == ()
    assert MetricHistory().staleness(600.0) == math.inf
    assert history.staleness(200.0) == pytest.approx(5.0)
