"""End-to-end smoke test of a serving endpoint: `digital-worker test --scenario full-flow --endpoint URL`.

Talks to an SGLang server (real or simulated, directly or through a Service/ingress) the way a
client and Prometheus do, and reports every check by name:

- ``health``: ``/health`` and ``/health_generate`` answer 200;
- ``model-info``: ``/v1/models`` lists the model (SGLang's ``/get_model_info`` adds the model path);
- ``chat``: a non-streaming chat completion returns text and usage;
- ``chat-stream``: a streaming one sends tokens as server-sent events and ends with ``[DONE]``;
- ``latency``: N streaming requests, TTFT and end-to-end p50/p95;
- ``metrics``: ``/metrics`` carries SGLang's request, TTFT, latency and queue metrics
  (``sglang:`` names as SGLang 0.5 writes them, or ``sglang_`` as some exporters rewrite them).

Standard library only, so it runs where only the `runtime` extra is installed; rich prints the
table when it is there, plain text otherwise.
"""
from __future__ import annotations

import http.client
import json
import math
import re
import socket
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

# Metric families a serving replica must export (SGLang 0.5 names without the `sglang:` prefix).
REQUIRED_METRICS = (
    "num_requests_total",
    "time_to_first_token_seconds",
    "e2e_request_latency_seconds",
    "num_running_reqs",
    "num_queue_reqs",
)
PROMPT = "Say hello to the digital worker smoke test in one short sentence."


class SmokeFailure(Exception):
    """One check failed; the message says what was expected and what came back."""


@dataclass(frozen=True)
class SmokeSettings:
    endpoint: str
    model: str | None = None  # None: the first model /v1/models lists
    api_key: str | None = None
    requests: int = 5
    max_tokens: int = 16
    timeout: float = 60.0

    @property
    def base_url(self) -> str:
        url = self.endpoint.rstrip("/")
        return url[: -len("/v1")] if url.endswith("/v1") else url


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: str  # "pass", "fail" or "skip"
    detail: str
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status != "fail"


@dataclass(frozen=True)
class LatencySummary:
    requests: int
    ttft_p50: float
    ttft_p95: float
    e2e_p50: float
    e2e_p95: float
    tokens_per_request: float


@dataclass(frozen=True)
class SmokeReport:
    endpoint: str
    model: str | None
    checks: tuple[CheckResult, ...]
    latency: LatencySummary | None = None
    context: dict[str, Any] = field(default_factory=dict)  # what the caller adds (e.g. the embedded flow's times)

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    @property
    def failed(self) -> list[CheckResult]:
        return [check for check in self.checks if not check.ok]

    def to_dict(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "model": self.model, "ok": self.ok,
                "checks": [asdict(check) for check in self.checks],
                "latency": asdict(self.latency) if self.latency else None, "context": self.context}

    def with_checks(self, before: tuple[CheckResult, ...] = (), after: tuple[CheckResult, ...] = (),
                    **context: Any) -> "SmokeReport":
        return SmokeReport(self.endpoint, self.model, before + self.checks + after, self.latency,
                           {**self.context, **context})


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); q in [0, 100]."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# ---- HTTP ----------------------------------------------------------------------------------------

class _Client:
    def __init__(self, settings: SmokeSettings) -> None:
        self.settings = settings
        self.base = settings.base_url

    def _request(self, method: str, path: str, body: dict | None = None) -> urllib.request.Request:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self.settings.api_key:
            headers["Authorization"] = f"Bearer {self.settings.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        return urllib.request.Request(self.base + path, data=data, method=method, headers=headers)

    def open(self, method: str, path: str, body: dict | None = None):
        """The open response for a 2xx; SmokeFailure naming the status and the server's message otherwise."""
        try:
            return urllib.request.urlopen(self._request(method, path, body), timeout=self.settings.timeout)
        except urllib.error.HTTPError as exc:
            raise SmokeFailure(f"{method} {path}: HTTP {exc.code}{_error_message(exc)}") from None
        except urllib.error.URLError as exc:
            raise SmokeFailure(f"{method} {path}: cannot connect to {self.base} ({exc.reason})") from None
        except (socket.timeout, TimeoutError):
            raise SmokeFailure(f"{method} {path}: no answer within {self.settings.timeout:g}s") from None
        except (http.client.HTTPException, OSError) as exc:
            raise SmokeFailure(f"{method} {path}: {type(exc).__name__}: {exc}") from None

    def read(self, method: str, path: str, body: dict | None = None) -> bytes:
        with self.open(method, path, body) as response:
            try:
                return response.read()
            except (socket.timeout, TimeoutError):
                raise SmokeFailure(f"{method} {path}: body not complete within {self.settings.timeout:g}s") from None

    def json(self, method: str, path: str, body: dict | None = None) -> Any:
        raw = self.read(method, path, body)
        try:
            return json.loads(raw)
        except ValueError:
            raise SmokeFailure(f"{method} {path}: the answer is not JSON: {raw[:120]!r}") from None


def _error_message(exc: urllib.error.HTTPError) -> str:
    try:
        raw = exc.read()[:2000]
    except Exception:
        return ""
    try:
        payload = json.loads(raw)
        message = payload.get("message") or (payload.get("error") or {}).get("message") or payload.get("error")
    except (ValueError, AttributeError):
        message = raw.decode(errors="replace").strip()
    return f": {str(message)[:200]}" if message else ""


@dataclass(frozen=True)
class _Streamed:
    ttft: float
    e2e: float
    chunks: int
    text: str


def _stream_chat(client: _Client, model: str, max_tokens: int) -> _Streamed:
    """One streaming chat completion, timed; SmokeFailure unless tokens arrive and [DONE] ends it."""
    body = {"model": model, "stream": True, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": PROMPT}]}
    started = time.perf_counter()
    first_token_at = None
    chunks = 0
    text = []
    done = False
    with client.open("POST", "/v1/chat/completions", body) as response:
        content_type = response.headers.get("Content-Type", "")
        if "text/event-stream" not in content_type:
            raise SmokeFailure(f"streaming answer has Content-Type {content_type!r}, not text/event-stream")
        try:
            for raw_line in response:
                line = raw_line.decode(errors="replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    done = True
                    break
                try:
                    chunk = json.loads(data)
                except ValueError:
                    raise SmokeFailure(f"an event is not JSON: {data[:120]!r}") from None
                if chunk.get("error"):
                    # How SGLang ends a stream its scheduler failed: the answer was already 200.
                    error = chunk["error"]
                    code = f" {error.get('code')}" if isinstance(error, dict) and error.get("code") else ""
                    raise SmokeFailure(f"error{code} in the stream after {chunks} token(s): "
                                       f"{error.get('message', error) if isinstance(error, dict) else error}")
                for choice in chunk.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content") or choice.get("text") or ""
                    if piece:
                        chunks += 1
                        text.append(piece)
                        if first_token_at is None:
                            first_token_at = time.perf_counter()
        except (socket.timeout, TimeoutError):
            raise SmokeFailure(f"stream stalled for {client.settings.timeout:g}s after {chunks} token(s)") from None
        except (http.client.HTTPException, OSError) as exc:
            raise SmokeFailure(f"stream broke after {chunks} token(s): {type(exc).__name__}: {exc}") from None
    ended = time.perf_counter()
    if not done:
        raise SmokeFailure(f"stream ended without data: [DONE] after {chunks} token(s)")
    if not chunks or first_token_at is None:
        raise SmokeFailure("stream ended with [DONE] but no token arrived")
    return _Streamed(first_token_at - started, ended - started, chunks, "".join(text))


def metric_families(exposition: str) -> set[str]:
    """Family names in a Prometheus text exposition, normalized to SGLang's `sglang:` form."""
    names = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE ") or line.startswith("# HELP "):
            name = line.split()[2]
        elif line and not line.startswith("#"):
            name = re.split(r"[{\s]", line, maxsplit=1)[0]
            name = re.sub(r"_(bucket|sum|count|created)$", "", name)
        else:
            continue
        if name.startswith("sglang_"):
            name = "sglang:" + name[len("sglang_"):]
        names.add(name)
    return names


# ---- the checks ----------------------------------------------------------------------------------

def run_smoke(settings: SmokeSettings, *, progress: Callable[[CheckResult], None] | None = None) -> SmokeReport:
    """Run every check in order; a check failing never stops the others, an unreachable endpoint does."""
    client = _Client(settings)
    checks: list[CheckResult] = []
    state: dict[str, Any] = {"model": settings.model, "latency": None}

    def run(name: str, check: Callable[[], str]) -> bool:
        started = time.perf_counter()
        try:
            detail, status = check(), "pass"
        except SmokeFailure as exc:
            detail, status = str(exc), "fail"
        result = CheckResult(name, status, detail, round(time.perf_counter() - started, 4))
        checks.append(result)
        if progress is not None:
            progress(result)
        return result.ok

    def health() -> str:
        for path in ("/health", "/health_generate"):
            client.read("GET", path)
        return "/health and /health_generate answer 200"

    def model_info() -> str:
        listed = client.json("GET", "/v1/models")
        ids = [m.get("id") for m in (listed.get("data") or []) if isinstance(m, dict)] if isinstance(listed, dict) else []
        if not ids:
            raise SmokeFailure(f"/v1/models lists no model: {json.dumps(listed)[:160]}")
        if state["model"] is None:
            state["model"] = ids[0]
        elif state["model"] not in ids:
            raise SmokeFailure(f"/v1/models lists {ids}, not {state['model']!r}")
        try:
            info = client.json("GET", "/get_model_info")
            path = f", model_path {info.get('model_path')}" if isinstance(info, dict) else ""
        except SmokeFailure:
            path = " (no SGLang /get_model_info: not an SGLang server, or behind a proxy that hides it)"
        return f"serves {state['model']!r}{path}"

    def chat() -> str:
        started = time.perf_counter()
        answer = client.json("POST", "/v1/chat/completions", {
            "model": state["model"], "max_tokens": settings.max_tokens,
            "messages": [{"role": "user", "content": PROMPT}]})
        elapsed = time.perf_counter() - started
        try:
            content = answer["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise SmokeFailure(f"no choices[0].message.content in {json.dumps(answer)[:160]}") from None
        if not content:
            raise SmokeFailure("the completion is empty")
        usage = answer.get("usage") or {}
        if not usage.get("completion_tokens"):
            raise SmokeFailure(f"usage.completion_tokens missing or 0: {usage}")
        return (f"{usage['completion_tokens']} tokens in {elapsed:.3f}s: "
                f"{content[:48]!r}{'...' if len(content) > 48 else ''}")

    def chat_stream() -> str:
        streamed = _stream_chat(client, state["model"], settings.max_tokens)
        return f"{streamed.chunks} token events, TTFT {streamed.ttft:.3f}s, ended with [DONE] in {streamed.e2e:.3f}s"

    def latency() -> str:
        runs = []
        for index in range(settings.requests):
            try:
                runs.append(_stream_chat(client, state["model"], settings.max_tokens))
            except SmokeFailure as exc:
                raise SmokeFailure(f"request {index + 1} of {settings.requests}: {exc}") from None
        ttfts = [r.ttft for r in runs]
        e2es = [r.e2e for r in runs]
        summary = LatencySummary(
            requests=len(runs), ttft_p50=percentile(ttfts, 50), ttft_p95=percentile(ttfts, 95),
            e2e_p50=percentile(e2es, 50), e2e_p95=percentile(e2es, 95),
            tokens_per_request=sum(r.chunks for r in runs) / len(runs))
        state["latency"] = summary
        return (f"{summary.requests} streaming requests: TTFT p50 {summary.ttft_p50:.3f}s p95 {summary.ttft_p95:.3f}s, "
                f"e2e p50 {summary.e2e_p50:.3f}s p95 {summary.e2e_p95:.3f}s")

    def metrics() -> str:
        text = client.read("GET", "/metrics").decode(errors="replace")
        found = metric_families(text)
        missing = [name for name in REQUIRED_METRICS if f"sglang:{name}" not in found]
        if missing:
            raise SmokeFailure(f"/metrics lacks {', '.join('sglang:' + m for m in missing)} "
                               f"({len([n for n in found if n.startswith('sglang:')])} sglang families found)")
        return f"{len([n for n in found if n.startswith('sglang:')])} sglang families, all {len(REQUIRED_METRICS)} required present"

    if not run("health", health):
        # Nothing else can pass against a server that is down or not ready; say so instead of timing out six times.
        for name in ("model-info", "chat", "chat-stream", "latency", "metrics"):
            checks.append(CheckResult(name, "skip", "not run: the health check failed"))
    else:
        run("model-info", model_info)
        if state["model"] is None:
            state["model"] = "default"
        run("chat", chat)
        run("chat-stream", chat_stream)
        if settings.requests > 0:
            run("latency", latency)
        run("metrics", metrics)
    return SmokeReport(settings.base_url, state["model"], tuple(checks), state["latency"])


# ---- the report ----------------------------------------------------------------------------------

def _verdict(report: SmokeReport) -> str:
    if report.ok:
        return f"PASSED: {len(report.checks)} checks against {report.endpoint}"
    failed = report.failed
    return (f"FAILED {len(failed)} of {len(report.checks)} checks: {', '.join(c.name for c in failed)}. "
            f"First failure: {failed[0].name}: {failed[0].detail}")


def _title(report: SmokeReport) -> str:
    worker = f"{report.context['worker']}: " if report.context.get("worker") else ""
    return f"{worker}smoke test of {report.endpoint} (model {report.model or '?'})"


def report_lines(report: SmokeReport) -> Iterator[str]:
    """The report as plain text (no rich): one line per check, the percentiles, a verdict."""
    width = max(len(c.name) for c in report.checks) if report.checks else 8
    yield _title(report)
    for check in report.checks:
        yield f"  {check.name:<{width}}  {check.status.upper():<4}  {check.seconds:7.3f}s  {check.detail}"
    if report.latency:
        lat = report.latency
        yield (f"  latency over {lat.requests} requests: TTFT p50 {lat.ttft_p50 * 1000:.1f} ms, "
               f"p95 {lat.ttft_p95 * 1000:.1f} ms; e2e p50 {lat.e2e_p50 * 1000:.1f} ms, p95 {lat.e2e_p95 * 1000:.1f} ms")
    yield _verdict(report)


def print_report(report: SmokeReport, file=None) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        import sys

        for line in report_lines(report):
            print(line, file=file or sys.stdout)
        return
    console = Console(file=file, width=None if Console(file=file).is_terminal else 132)
    table = Table(title=_title(report))
    for column in ("Check", "Result", "Time", "Detail"):
        table.add_column(column)
    colors = {"pass": "green", "fail": "bold red", "skip": "yellow"}
    for check in report.checks:
        table.add_row(check.name, f"[{colors[check.status]}]{check.status.upper()}[/]", f"{check.seconds:.3f}s",
                      check.detail)
    console.print(table)
    if report.latency:
        lat = report.latency
        latency = Table(title=f"Latency over {lat.requests} streaming requests")
        for column in ("", "p50", "p95"):
            latency.add_column(column, justify="right")
        latency.add_row("TTFT", f"{lat.ttft_p50 * 1000:.1f} ms", f"{lat.ttft_p95 * 1000:.1f} ms")
        latency.add_row("end to end", f"{lat.e2e_p50 * 1000:.1f} ms", f"{lat.e2e_p95 * 1000:.1f} ms")
        console.print(latency)
    console.print(("[bold green]" if report.ok else "[bold red]") + _verdict(report).replace("[", "\\[") + "[/]")
