"""Load for simulated fleets: replay a real request trace as OpenAI-compatible HTTP requests.

- Traces: the Azure LLM inference trace (conversation service; arrivals and prompt/output token
  counts) read from `../shared/data` next to the repository, a NAB series as a rate shape, or, when
  run outside this repository, a synthetic sample generated here (same columns, seeded).
- `RateProfile`: piecewise-linear requests/s over time. The trace's arrivals are replayed with
  their own burstiness, time-warped so that the mean rate follows the profile (a ramp, a plateau).
- `LoadGenerator`: sends each request as a `/v1/chat/completions` to one ready pod of the worker,
  picked among the pods its Service selector matches (what the Service would do), streaming or not
  (`stream_share`: chat UIs stream, an agent's tool-calling steps often do not), and records per
  request: when, which revision answered, the outcome, TTFT (streams) and end-to-end latency. A
  stream that answered 200 and then carried an SSE error event (how SGLang ends a stream its
  scheduler failed) counts as failed, with the event's code.

Used by `digital-worker dev`'s tour and reusable by bench/ and tests (no operator imports beyond
the API labels; the generator runs on its own thread and event loop).
"""
from __future__ import annotations

import asyncio
import bisect
import csv
import json
import math
import random
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

from digital_worker.operator import pods as pods_module
from digital_worker.operator import schema as api

AZURE_CONVERSATION = "azure-llm-2023/AzureLLMInferenceTrace_conv.csv"


@dataclass(frozen=True)
class TraceRequest:
    offset: float  # seconds since the trace's first request
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class Trace:
    source: str  # where it came from, for narration and reports
    requests: tuple[TraceRequest, ...]

    @property
    def mean_rate(self) -> float:
        if len(self.requests) < 2:
            return 1.0
        span = self.requests[-1].offset - self.requests[0].offset
        return (len(self.requests) - 1) / span if span > 0 else 1.0


def shared_data_dir(start: Path | None = None) -> Path | None:
    """`<repository>/../shared/data` when this package runs from a checkout that has it next door."""
    here = (start or Path(__file__)).resolve()
    for parent in here.parents:
        if (parent / "pyproject.toml").exists():
            candidate = parent.parent / "shared" / "data"
            return candidate if candidate.is_dir() else None
    return None


def load_azure_trace(path: Path, limit: int | None = None) -> Trace:
    rows: list[TraceRequest] = []
    first: float | None = None
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            # Timestamps carry 7 fractional digits; datetime takes 6.
            stamp = datetime.fromisoformat(row["TIMESTAMP"][:26]).timestamp()
            first = stamp if first is None else first
            rows.append(TraceRequest(stamp - first, max(1, int(row["ContextTokens"])),
                                     max(1, int(row["GeneratedTokens"]))))
            if limit is not None and len(rows) >= limit:
                break
    return Trace(f"Azure LLM conversation trace ({path.name}, {len(rows)} requests)", tuple(rows))


def synthetic_trace(count: int = 4000, rate: float = 5.0, seed: int = 7) -> Trace:
    """A stand-in with the Azure trace's shape: Poisson arrivals, log-normal prompt and output sizes."""
    rng = random.Random(seed)
    offset, rows = 0.0, []
    for _ in range(count):
        offset += rng.expovariate(rate)
        prompt = int(min(8000, max(8, rng.lognormvariate(6.5, 0.9))))
        output = int(min(1500, max(4, rng.lognormvariate(5.0, 0.8))))
        rows.append(TraceRequest(offset, prompt, output))
    return Trace(f"synthetic sample (seed {seed}, {count} requests)", tuple(rows))


def default_trace(limit: int | None = 6000) -> Trace:
    data = shared_data_dir()
    if data is not None and (data / AZURE_CONVERSATION).exists():
        return load_azure_trace(data / AZURE_CONVERSATION, limit)
    return synthetic_trace()


def nab_rate_shape(path: Path, points: int | None = None) -> list[float]:
    """A NAB series (`timestamp,value`) normalised to mean 1: a rate shape for `RateProfile.from_shape`."""
    with open(path, newline="") as handle:
        values = [float(row["value"]) for row in csv.DictReader(handle)]
    values = values[:points] if points else values
    mean = sum(values) / len(values) if values else 1.0
    return [v / mean for v in values] if mean > 0 else [1.0 for _ in values]


@dataclass(frozen=True)
class RateProfile:
    """Piecewise-linear requests/s: `points` are (seconds since start, rate), sorted by time."""

    points: tuple[tuple[float, float], ...]

    def rate(self, at: float) -> float:
        times = [t for t, _ in self.points]
        index = bisect.bisect_right(times, at)
        if index == 0:
            return self.points[0][1]
        if index >= len(self.points):
            return self.points[-1][1]
        (t0, r0), (t1, r1) = self.points[index - 1], self.points[index]
        return r0 + (r1 - r0) * (at - t0) / (t1 - t0) if t1 > t0 else r1

    @property
    def peak_time(self) -> float:
        return max(self.points, key=lambda p: p[1])[0]

    @classmethod
    def ramp(cls, *, base: float, peak: float, warmup: float, ramp: float) -> "RateProfile":
        return cls(((0.0, base), (warmup, base), (warmup + ramp, peak)))

    @classmethod
    def from_shape(cls, shape: list[float], *, mean_rate: float, step_seconds: float) -> "RateProfile":
        return cls(tuple((i * step_seconds, max(0.0, v * mean_rate)) for i, v in enumerate(shape)))


def arrivals(trace: Trace, profile: RateProfile, until: float, *, start_index: int = 0,
             step: float = 0.01) -> Iterator[tuple[float, TraceRequest]]:
    """(send time, request) pairs: the trace's arrivals on a clock that runs at `profile`'s rate.

    The trace's own time, counted in expected requests (offset x its mean rate), is matched to the
    integral of the profile's rate: bursts and lulls stay where the trace has them, the mean follows
    the profile (a time change of the arrival process). The trace repeats when it runs out."""
    requests = trace.requests
    if not requests:
        return
    mean = trace.mean_rate
    span = requests[-1].offset - requests[0].offset + 1.0 / mean
    at, integral, index = 0.0, 0.0, start_index
    origin = requests[start_index % len(requests)].offset
    while at < until:
        lap, position = divmod(index, len(requests))
        request = requests[position]
        target = (request.offset - origin + lap * span) * mean
        while integral < target and at < until:
            integral += profile.rate(at) * step
            at += step
        if at >= until:
            return
        yield at, request
        index += 1


@dataclass(frozen=True)
class RequestRecord:
    sent: float  # wall clock (time.time())
    revision: str
    ok: bool
    ttft: float | None
    latency: float
    status: int = 0  # HTTP status; 0: the connection failed or broke (e.g. the replica went away)
    stream_error: int = 0  # the code of an SSE error event in a stream that answered 200; 0: none


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def ready_endpoints(kube, namespace: str, service: str) -> list[tuple[str, str]]:
    """(revision, URL) of the ready pods the Service's selector matches, as the Service would route."""
    body = kube.get("v1", "services", namespace, service)
    selector = ((body or {}).get("spec") or {}).get("selector") or {}
    if not selector:
        return []
    pods = kube.list("v1", "pods", namespace, ",".join(f"{k}={v}" for k, v in sorted(selector.items())))
    found = []
    for pod in pods:
        meta = pod["metadata"]
        endpoint = pods_module.sim_endpoint(pod)
        if endpoint and pods_module.is_ready(pod) and not meta.get("deletionTimestamp"):
            found.append(((meta.get("labels") or {}).get(api.LABEL_REVISION, ""), endpoint))
    return sorted(found)


class LoadGenerator:
    """Open-loop replay of `trace` at `profile`'s rate against a DigitalWorker's ready pods."""

    def __init__(self, kube, namespace: str, name: str, model: str, trace: Trace, profile: RateProfile, *,
                 max_in_flight: int = 96, max_prompt_tokens: int = 4000, max_output_tokens: int = 256,
                 refresh_seconds: float = 0.5, seed: int = 11, start_index: int = 0,
                 stream_share: float = 1.0) -> None:
        self.kube, self.namespace, self.name, self.model = kube, namespace, name, model
        self.trace, self.profile = trace, profile
        self.max_in_flight = max_in_flight
        # Long trace requests are capped: the simulator decodes in real time, and the tour is short.
        self.max_prompt_tokens, self.max_output_tokens = max_prompt_tokens, max_output_tokens
        self.refresh_seconds = refresh_seconds
        self.start_index = start_index
        self.stream_share = stream_share
        self.records: list[RequestRecord] = []
        self.dropped = 0  # arrivals not sent: no ready pod, or the in-flight bound was reached
        self.started_at: float | None = None
        self._endpoints: list[tuple[str, str]] = []
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    # -- control ----------------------------------------------------------------------------------
    def start(self, duration: float = 3600.0) -> None:
        self.started_at = time.time()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main(duration)), name="loadgen", daemon=True)
        self._thread.start()

    def set_profile(self, profile: RateProfile) -> None:
        """Change the rate from now on (time in the profile stays relative to `start`)."""
        self.profile = profile

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def elapsed(self) -> float:
        return time.time() - self.started_at if self.started_at else 0.0

    # -- what happened ----------------------------------------------------------------------------
    def snapshot(self) -> list[RequestRecord]:
        with self._lock:
            return list(self.records)

    def window(self, seconds: float, now: float | None = None) -> dict[str, Any]:
        """Rate, TTFT p95 and error share of the requests sent in the last `seconds`, by revision too."""
        now = time.time() if now is None else now
        recent = [r for r in self.snapshot() if now - seconds <= r.sent + r.latency <= now]
        by_revision: dict[str, int] = {}
        for record in recent:
            by_revision[record.revision] = by_revision.get(record.revision, 0) + 1
        return {
            "rate": len(recent) / seconds,
            "ttft_p95": percentile([r.ttft for r in recent if r.ok and r.ttft is not None], 0.95),
            "error_rate": (sum(not r.ok for r in recent) / len(recent)) if recent else None,
            "by_revision": by_revision,
            "offered_rate": self.profile.rate(self.elapsed()),
        }

    # -- the loop ---------------------------------------------------------------------------------
    async def _main(self, duration: float) -> None:
        import aiohttp

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        in_flight = asyncio.Semaphore(self.max_in_flight)
        tasks: set[asyncio.Task] = set()
        refresher = asyncio.create_task(self._refresh())
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
            start = self._loop.time()
            try:
                for send_at, request in arrivals(self.trace, _LiveProfile(self), duration, start_index=self.start_index):
                    delay = start + send_at - self._loop.time()
                    if delay > 0:
                        # Not asyncio.wait_for: on Python 3.11 it can swallow a cancel (cpython gh-86296).
                        try:
                            async with asyncio.timeout(delay):
                                await self._stop.wait()
                        except TimeoutError:
                            pass
                    if self._stop.is_set():
                        break
                    if not self._endpoints or in_flight.locked():
                        self.dropped += 1
                        continue
                    revision, url = self._rng.choice(self._endpoints)
                    await in_flight.acquire()
                    task = asyncio.create_task(self._send(session, revision, url, request))
                    tasks.add(task)
                    task.add_done_callback(lambda t: (tasks.discard(t), in_flight.release()))
            finally:
                refresher.cancel()
                for task in list(tasks):
                    task.cancel()
                await asyncio.gather(refresher, *tasks, return_exceptions=True)

    async def _refresh(self) -> None:
        while True:
            try:
                self._endpoints = await asyncio.to_thread(ready_endpoints, self.kube, self.namespace, self.name)
            except Exception:  # the API being briefly away is no reason to stop the load
                pass
            await asyncio.sleep(self.refresh_seconds)

    async def _send(self, session, revision: str, url: str, request: TraceRequest) -> None:
        prompt_tokens = min(request.prompt_tokens, self.max_prompt_tokens)
        # The simulator estimates one token per 4 bytes of text.
        streaming = self._rng.random() < self.stream_share
        body = {"model": self.model, "stream": streaming,
                "max_tokens": min(request.output_tokens, self.max_output_tokens),
                "messages": [{"role": "user", "content": "word" * prompt_tokens}]}
        sent, started = time.time(), time.monotonic()
        ttft, ok, status, stream_error = None, False, 0, 0
        try:
            async with session.post(url + "/v1/chat/completions", json=body) as response:
                status = response.status
                if response.status == 200 and streaming:
                    async for line in response.content:
                        if ttft is None and _has_token(line):
                            ttft = time.monotonic() - started
                        stream_error = stream_error or _error_code(line)
                    ok = ttft is not None and not stream_error
                else:
                    await response.read()
                    ok = response.status == 200
        except asyncio.CancelledError:
            raise
        except Exception:
            ok, status = False, 0
        record = RequestRecord(sent, revision, ok, ttft, time.monotonic() - started, status, stream_error)
        with self._lock:
            self.records.append(record)


def _has_token(line: bytes) -> bool:
    """An SSE chunk carrying generated text (the first chunk only announces the assistant role)."""
    if not line.startswith(b"data:") or b'"content"' not in line:
        return False
    try:
        choices = json.loads(line[5:]).get("choices") or [{}]
    except ValueError:
        return False
    return bool((choices[0].get("delta") or {}).get("content"))


def _error_code(line: bytes) -> int:
    """The code of an SSE error event (`data: {"error": {..., "code": 500}}`), else 0."""
    if not line.startswith(b"data:") or b'"error"' not in line:
        return 0
    try:
        error = json.loads(line[5:]).get("error")
    except ValueError:
        return 0
    return int(error.get("code") or 500) if isinstance(error, dict) else 0


class _LiveProfile:
    """The generator's current profile, read at each arrival (so `set_profile` takes effect at once)."""

    def __init__(self, generator: LoadGenerator) -> None:
        self.generator = generator

    def rate(self, at: float) -> float:
        return self.generator.profile.rate(at)
