"""SGLang's Prometheus metrics, as SGLang 0.5.23 declares them, for the simulated server.

Names, types, label names and histogram buckets are those of SGLang's
`srt/observability/metrics_collector.py` and `http_request_metrics.py` at the pinned version (a
slow test reads both files in the SGLang virtualenv and compares). Three collectors in SGLang,
three label sets here: the scheduler's (per rank: gauges and queue time), the tokenizer manager's
(per request) and the HTTP server's (per endpoint and method, no base labels).
Each `SGLangMetrics` owns a fresh CollectorRegistry, so many simulated servers live in one process.
"""
from __future__ import annotations

from dataclasses import dataclass

from .contract import SGLANG_VERSION

METRICS_SGLANG_VERSION = SGLANG_VERSION

TTFT_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400)
INTER_TOKEN_BUCKETS = (
    0.002, 0.004, 0.006, 0.008, 0.010, 0.015, 0.020, 0.025, 0.030, 0.035, 0.040, 0.060, 0.080,
    0.100, 0.200, 0.400, 0.600, 0.800, 1.000, 2.000, 4.000, 6.000, 8.000,
)
E2E_BUCKETS = (
    0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400, 600, 1200, 1800, 2400,
)
QUEUE_TIME_BUCKETS = (
    0.0, 0.001, 0.005, 0.010, 0.050, 0.100, 0.200, 0.500, 1, 2, 3, 4, 5, 10, 15, 20, 30, 40, 50, 60,
    70, 80, 90, 100, 200, 300, 400, 500, 600, 700, 800, 900, 1000, 1200, 1400, 1600, 1800, 2000,
    2500, 3000,
)

SCHEDULER = "scheduler"
TOKENIZER = "tokenizer"
HTTP = "http"


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str  # "gauge", "counter" or "histogram"
    documentation: str
    collector: str  # SCHEDULER, TOKENIZER or HTTP: which base label set it carries
    extra_labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] | None = None


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("sglang:num_running_reqs", "gauge", "The number of running requests.", SCHEDULER),
    MetricSpec("sglang:num_queue_reqs", "gauge", "The number of requests in the waiting queue.", SCHEDULER),
    MetricSpec("sglang:gen_throughput", "gauge", "The generation throughput (token/s).", SCHEDULER),
    MetricSpec("sglang:cache_hit_rate", "gauge", "The prefix cache hit rate.", SCHEDULER),
    MetricSpec("sglang:token_usage", "gauge", "The token usage.", SCHEDULER),
    MetricSpec("sglang:queue_time_seconds", "histogram", "Histogram of queueing time in seconds.",
               SCHEDULER, buckets=QUEUE_TIME_BUCKETS),
    MetricSpec("sglang:prompt_tokens_total", "counter", "Number of prefill tokens processed.",
               TOKENIZER, ("is_streaming",)),
    MetricSpec("sglang:generation_tokens_total", "counter", "Number of generation tokens processed.",
               TOKENIZER, ("is_streaming",)),
    MetricSpec("sglang:num_requests_total", "counter", "Number of requests processed.",
               TOKENIZER, ("is_streaming",)),
    MetricSpec("sglang:num_aborted_requests_total", "counter", "Number of requests aborted.", TOKENIZER),
    MetricSpec("sglang:time_to_first_token_seconds", "histogram",
               "Histogram of time to first token in seconds.", TOKENIZER, ("is_streaming",), TTFT_BUCKETS),
    MetricSpec("sglang:inter_token_latency_seconds", "histogram",
               "Histogram of inter-token latency in seconds.", TOKENIZER, buckets=INTER_TOKEN_BUCKETS),
    MetricSpec("sglang:e2e_request_latency_seconds", "histogram",
               "Histogram of End-to-end request latency in seconds", TOKENIZER, ("is_streaming",), E2E_BUCKETS),
    # SGLang's HTTP middleware (with --enable-metrics): every request, and every response by status.
    MetricSpec("sglang:http_requests_total", "counter", "Total number of HTTP requests by endpoint and method",
               HTTP, ("endpoint", "method")),
    MetricSpec("sglang:http_responses_total", "counter", "Total number of HTTP responses by endpoint and status code",
               HTTP, ("endpoint", "status_code", "method")),
    MetricSpec("sglang:http_requests_active", "gauge", "Number of currently active HTTP requests",
               HTTP, ("endpoint", "method")),
)


def scheduler_labels(model_name: str) -> dict[str, str]:
    """What SGLang's scheduler puts on its metrics for a TP=1, DP=1, unified (not disaggregated) replica."""
    return {"model_name": model_name, "engine_type": "unified", "tp_rank": "0", "pp_rank": "0", "moe_ep_rank": "0"}


def tokenizer_labels(model_name: str) -> dict[str, str]:
    return {"model_name": model_name, "engine_type": "unified"}


class SGLangMetrics:
    """One server's metrics in its own registry, with SGLang's names, labels and buckets."""

    def __init__(self, model_name: str) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.base_labels = {SCHEDULER: scheduler_labels(model_name), TOKENIZER: tokenizer_labels(model_name),
                            HTTP: {}}
        self._metrics = {}
        for spec in METRICS:
            labelnames = [*self.base_labels[spec.collector], *spec.extra_labels]
            if spec.kind == "gauge":
                metric = Gauge(spec.name, spec.documentation, labelnames, registry=self.registry)
            elif spec.kind == "counter":
                metric = Counter(spec.name, spec.documentation, labelnames, registry=self.registry)
            else:
                metric = Histogram(spec.name, spec.documentation, labelnames, registry=self.registry,
                                   buckets=spec.buckets)
            self._metrics[spec.name] = (spec, metric)
        # SGLang exports its gauges from the first scheduler pass; show zeros from the start too.
        for name in ("sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:gen_throughput",
                     "sglang:cache_hit_rate", "sglang:token_usage"):
            self.set(name, 0.0)
        # Labelled counters (aborted requests, HTTP responses by status) appear at their first
        # increment, as in SGLang: queries must read an absent series as 0.

    def child(self, name: str, **extra: str):
        spec, metric = self._metrics[name]
        return metric.labels(**self.base_labels[spec.collector], **extra)

    def set(self, name: str, value: float) -> None:
        self.child(name).set(value)

    def exposition(self, accept_header: str | None) -> tuple[bytes, str]:
        """The scrape body and content type, negotiated as prometheus_client (and so SGLang) does."""
        from prometheus_client.exposition import choose_encoder

        encoder, content_type = choose_encoder(accept_header or "")
        return encoder(self.registry), content_type
