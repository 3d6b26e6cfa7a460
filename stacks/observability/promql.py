"""PromQL shared by the alerts and the dashboard, so "error", "timeout" and "CPU" mean one thing.

Where the numbers come from:

- SGLang (and the simulator, `runtime/sim.py`): `sglang:<name>`, which prometheus_client answers
  Prometheus's OpenMetrics scrape with as `sglang_<name>`; every selector takes both
  (`__name__=~"sglang[:_]<name>"`). The platform's scrape configs label the series `namespace`,
  `digitalworker_io_instance` (the DigitalWorker) and `digitalworker_io_revision`.
- The node agent (`agents/`): dcgm-exporter names (`DCGM_FI_DEV_*`) and `digital_worker_gpu_*`, by
  `Hostname`, `gpu`, `UUID`, plus the `namespace`/`pod` holding the GPU.
- The operator (`operator/metrics.py`): `digitalworker_operator_*`, `digitalworker_autoscaler_*`
  (per worker: `namespace`, `name`).

What stands for what:

- **Errors ("5xx")**: requests SGLang aborted (a client gone, the abort endpoint) plus non-2xx
  answers to POSTs (`http_responses_total`), over requests that ended (finished + aborted), as the
  rollout analysis counts them (`operator/metric_providers.py`). A request SGLang's scheduler fails
  (an internal 500) counts as finished there, so only its status shows it. A streaming request
  it fails has already been answered 200 (an SSE error event ends it): none of SGLang's metrics
  show it.
- **Timeouts**: requests whose client waited longer than `TIMEOUT_SECONDS` for the first byte of its
  answer, which is what a gateway's read timeout cuts: time to first token for streaming
  requests, end-to-end latency for the others, read from SGLang's histograms (60 s is one of
  their bucket bounds, and nginx's default `proxy_read_timeout`).
- **CPU**: a container's CPU use (kubelet's cAdvisor, `container_cpu_usage_seconds_total`) over its
  CPU limit, or its request when it has no limit (the runtime pods have requests only, and only
  when `spec.runtime.resources.cpu` sets one: without, the alert cannot cover them), from
  kube-state-metrics. Both come with the platform's Prometheus (the Helm chart's
  `kubernetes-nodes-cadvisor` job and its kube-state-metrics; kube-prometheus-stack has both too).
"""
from __future__ import annotations

from digital_worker.operator.metric_providers import (ABORTED_REQUESTS_TOTAL, E2E_HISTOGRAM, INSTANCE_LABEL,
                                                      NAMESPACE_LABEL, REQUESTS_TOTAL, SGLANG_HTTP_RESPONSES,
                                                      TTFT_HISTOGRAM, render_matchers)

WORKER_LABELS = f"{NAMESPACE_LABEL}, {INSTANCE_LABEL}"
TIMEOUT_SECONDS = 60
# Containers the CPU alert watches: the runtime (operator/templates/deployment.json.j2), the operator
# (operator/deploy.py) and the node agent (agents/manifests.py).
CPU_CONTAINERS = ("sglang", "operator", "agent")
# The only series the alerts read that we do not export ourselves: Kubernetes' own (cAdvisor, kube-state-metrics).
PLATFORM_METRICS = ("container_cpu_usage_seconds_total", "kube_pod_container_resource_limits",
                    "kube_pod_container_resource_requests")


def sglang(metric: str, *matchers: str) -> str:
    """A selector for `sglang:<metric>` and `sglang_<metric>` with extra label matchers."""
    return "{" + ", ".join([f'__name__=~"sglang[:_]{metric}"', *(m for m in matchers if m)]) + "}"


def le_matcher(bound: float) -> str:
    """prometheus_client writes bucket bounds as floats (`60.0`); other exporters may write `60`."""
    text = f"{bound:g}"
    return f'le=~"{text}|{float(bound)}"' if "." not in text else f'le="{text}"'


def sum_rate(selector: str, window: str, by: str = WORKER_LABELS) -> str:
    return f"sum by ({by}) (rate({selector}[{window}]))"


def error_share(window: str, matchers: str = "", by: str = WORKER_LABELS) -> str:
    """Aborted requests plus non-2xx POST answers over ended requests per worker, at most 1. Any
    of the three series may be absent (`or ... * 0` stands in for it): a worker that finished
    nothing and aborted everything reads 1, not "no data"."""
    aborted = sum_rate(sglang(ABORTED_REQUESTS_TOTAL, matchers), window, by)
    responses = SGLANG_HTTP_RESPONSES
    refused = sum_rate(sglang(responses.metric, matchers, render_matchers(responses.scope), responses.failure_matcher),
                       window, by)
    finished = sum_rate(sglang(REQUESTS_TOTAL, matchers), window, by)
    failed = f"(({aborted} or {refused} * 0) + ({refused} or {aborted} * 0))"
    ended = f"(({aborted} or {finished} * 0) + ({finished} or {aborted} * 0))"
    return f"clamp_max({failed} / {ended}, 1)"


def timeout_share(window: str, matchers: str = "", by: str = WORKER_LABELS,
                  timeout_seconds: float = TIMEOUT_SECONDS) -> str:
    """Requests whose first byte came after `timeout_seconds` (TTFT when streaming, end-to-end
    latency otherwise) over all requests that finished, per worker."""
    le = le_matcher(timeout_seconds)

    def slow(histogram: str, streaming: str) -> str:
        selector = f'is_streaming="{streaming}"'
        count = sum_rate(sglang(f"{histogram}_count", matchers, selector), window, by)
        fast = sum_rate(sglang(f"{histogram}_bucket", matchers, selector, le), window, by)
        return f"({count} - {fast})"

    total = sum_rate(sglang(f"{E2E_HISTOGRAM}_count", matchers), window, by)
    return (f"(({slow(TTFT_HISTOGRAM, 'true')} or {total} * 0) + ({slow(E2E_HISTOGRAM, 'false')} or {total} * 0))"
            f" / {total}")


def cpu_share(window: str) -> str:
    """CPU used over the CPU limit (or request) per container, 0..1 and above."""
    containers = "|".join(CPU_CONTAINERS)
    by = "namespace, pod, container"
    usage = (f'sum by ({by}) (rate(container_cpu_usage_seconds_total{{container=~"{containers}"}}[{window}]))')
    limit = f'max by ({by}) (kube_pod_container_resource_limits{{resource="cpu", container=~"{containers}"}})'
    request = f'max by ({by}) (kube_pod_container_resource_requests{{resource="cpu", container=~"{containers}"}})'
    return f"{usage} / on ({by}) ({limit} or {request})"
