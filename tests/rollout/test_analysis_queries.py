"""PromQL builders and result parsing (pure). Their behaviour in Prometheus is covered by
test_analysis_prometheus.py; here: exact text, escaping and validation."""
from __future__ import annotations

import pytest

from digital_worker.operator.metric_providers import (
    E2E_P95,
    ERROR_RATE,
    HTTP_ERROR_RATE,
    ITL_P95,
    KV_USAGE,
    QUEUE_LENGTH,
    REQUEST_COUNT,
    REQUEST_RATE,
    TTFT_P95,
    HttpErrorSource,
    MetricQuery,
    histogram_quantile_query,
    measurement_from_result,
    render_matchers,
    revision_queries,
    sglang_selector,
)

REVISION = {"namespace": "team-a", "digitalworker_io_instance": "helpdesk", "digitalworker_io_revision": "5f8c2d"}
QUERY = MetricQuery("q", "x")


def test_selector_matches_both_name_forms_and_sorted_labels():
    selector = sglang_selector("num_requests_total", REVISION)
    assert selector == (
        '{__name__=~"sglang[:_]num_requests_total", digitalworker_io_instance="helpdesk", '
        'digitalworker_io_revision="5f8c2d", namespace="team-a"}'
    )


def test_ttft_p95_query_is_the_documented_histogram_quantile():
    assert histogram_quantile_query("time_to_first_token_seconds", {"digitalworker_io_revision": "a"}, 60) == (
        'histogram_quantile(0.95, sum by (le) (rate({__name__=~"sglang[:_]time_to_first_token_seconds_bucket", '
        'digitalworker_io_revision="a"}[60s])))'
    )


def test_revision_queries_cover_every_measurement():
    queries = revision_queries(REVISION, 90)
    assert set(queries) == {REQUEST_COUNT, REQUEST_RATE, ERROR_RATE, TTFT_P95, ITL_P95, E2E_P95, QUEUE_LENGTH, KV_USAGE}
    for name, query in queries.items():
        assert query.name == name
        assert "[90s]" in query.promql and 'digitalworker_io_revision="5f8c2d"' in query.promql
        assert "sglang[:_]" in query.promql
    assert "inter_token_latency_seconds_bucket" in queries[ITL_P95].promql
    assert "e2e_request_latency_seconds_bucket" in queries[E2E_P95].promql
    # Aborted requests counted from a series' first sample on (increase() would drop the first ones).
    assert queries[ERROR_RATE].promql.startswith(
        "clamp_max((((sum(last_over_time({__name__=~\"sglang[:_]num_aborted_requests_total\"")
    # ... and the scheduler's failures, which SGLang counts as finished: non-2xx POST answers.
    assert 'http_responses_total", digitalworker_io_instance="helpdesk"' in queries[ERROR_RATE].promql
    assert 'method="POST", namespace="team-a", status_code!~"2.."' in queries[ERROR_RATE].promql
    assert "offset 90s" in queries[ERROR_RATE].promql
    assert "or vector(0)" in queries[ERROR_RATE].promql
    assert "num_queue_reqs" in queries[QUEUE_LENGTH].promql and "token_usage" in queries[KV_USAGE].promql


def test_http_error_rate_is_opt_in_and_reads_sglangs_post_responses_by_default():
    assert HTTP_ERROR_RATE not in revision_queries(REVISION, 60)
    default = revision_queries(REVISION, 60, HttpErrorSource())[HTTP_ERROR_RATE]
    assert default.measurement == HTTP_ERROR_RATE  # the in-process scraper can answer it too
    assert '{__name__=~"sglang[:_]http_responses_total", digitalworker_io_instance="helpdesk"' in default.promql
    assert 'method="POST"' in default.promql and 'status_code!~"2.."' in default.promql
    assert "last_over_time(" in default.promql  # counts a series born inside the window
    gateway = HttpErrorSource("http_requests_total", "code", sglang=False, method=None)
    query = revision_queries(REVISION, 60, gateway)[HTTP_ERROR_RATE]
    assert 'http_requests_total{digitalworker_io_instance="helpdesk"' in query.promql and 'code!~"2.."' in query.promql
    assert "method" not in query.promql and query.measurement is None  # PromQL only
    with pytest.raises(ValueError):
        revision_queries(REVISION, 60, HttpErrorSource("bad metric", "code"))


def test_matchers_escape_values_and_accept_operators():
    rendered = render_matchers({"a": 'say "hi"\\\n', "b": ("=~", "v1|v2"), "c": ("!=", "x")})
    assert rendered == 'a="say \\"hi\\"\\\\\\n", b=~"v1|v2", c!="x"'
    assert render_matchers({}) == ""
    assert sglang_selector("token_usage", {}) == '{__name__=~"sglang[:_]token_usage"}'


@pytest.mark.parametrize(
    "matchers", [{"bad-label": "x"}, {"__name__": "x"}, {"a": ("==", "x")}, {"1a": "x"}]
)
def test_invalid_matchers_are_refused(matchers):
    with pytest.raises(ValueError):
        render_matchers(matchers)


def test_windows_and_quantiles_are_validated():
    with pytest.raises(ValueError):
        revision_queries(REVISION, 0.2)
    with pytest.raises(ValueError):
        histogram_quantile_query("time_to_first_token_seconds", REVISION, 60, quantile=1.0)
    assert "[2s]" in revision_queries(REVISION, 1.6)[REQUEST_COUNT].promql


@pytest.mark.parametrize(
    ("result", "value", "series", "has_error"),
    [
        ([], None, 0, False),
        ([{"metric": {}, "value": [1.0, "0.25"]}], 0.25, 1, False),
        ([{"metric": {}, "value": [1.0, "NaN"]}], None, 1, False),
        ([{"metric": {}, "value": [1.0, "+Inf"]}], None, 1, False),
        ([1700000000.5, "3"], 3.0, 1, False),  # a scalar result: [time, "value"]
        ([{"metric": {"a": "1"}, "value": [1, "1"]}, {"metric": {"a": "2"}, "value": [1, "2"]}], None, 2, True),
        ([{"metric": {}, "value": [1.0, "abc"]}], None, 1, True),
        ("garbage", None, 0, True),
    ],
)
def test_measurement_from_result(result, value, series, has_error):
    measurement = measurement_from_result(QUERY, result)
    assert measurement.value == value and measurement.series_count == series
    assert (measurement.error is not None) is has_error
    assert measurement.usable is (value is not None and not has_error)


def test_revision_matchers_use_the_operator_labels():
    from digital_worker.operator.metric_providers import INSTANCE_LABEL, REVISION_LABEL, revision_matchers

    assert revision_matchers("team-a", "helpdesk", "5f8c2d") == REVISION
    assert (INSTANCE_LABEL, REVISION_LABEL) == ("digitalworker_io_instance", "digitalworker_io_revision")


def test_rollout_modules_import_nothing_heavy():
    """analysis, metric providers, routers and capacity run in the operator without kopf, and
    prometheus_api_client (which pulls in pandas) loads only when a provider first queries."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import digital_worker.operator.analysis, digital_worker.operator.metric_providers\n"
        "import digital_worker.operator.traffic, digital_worker.operator.capacity\n"
        "heavy = ('kopf', 'pandas', 'prometheus_api_client', 'statsmodels', 'pulumi')\n"
        "heavy = [m for m in heavy if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
