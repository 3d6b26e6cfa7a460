"""An SGLang-compatible simulated server: SGLang's HTTP surface, driven by `perfmodel.ReplicaEngine`.

It answers what the operator, Prometheus and users touch on a real SGLang 0.5.23 server:
``/health``, ``/health_generate``, ``/get_model_info`` and ``/model_info``, ``/get_server_info`` and
``/server_info`` (without secrets), ``/v1/models``, ``/v1/chat/completions`` and
``/v1/completions`` (streaming or not), ``/metrics`` (SGLang's metric names, labels and buckets).
Timing follows the shared performance model in real (wall-clock) time: requests queue, are
batched, are prefilled in chunks, then decode token by token, so TTFT grows with load.

Faults, by config or at run time through ``POST /admin/faults`` (JSON, any subset):
``error_rate`` (share of generation requests the scheduler fails: HTTP 500, or a 200 stream
ending in an SSE error event, counted as SGLang counts them, finished and not aborted),
``latency_factor`` (every engine step takes that many times longer), ``hang`` (generation and
health checks stop answering; health checks give 503 after `health_check_timeout`, as SGLang's
do), ``crash`` (the server stops listening at once; the CLI process exits 1),
``cold_start_seconds`` (restart the warm-up clock).
``GET /admin/faults`` shows them.

Cheap enough for tens of servers in one process: one aiohttp site and one engine task each, the
task asleep whenever its engine has nothing to do, and a CollectorRegistry per server.

Token counts are estimated (one token per 4 bytes of text, plus 4 per chat message for the
template): the simulator has no tokenizer, and only the counts matter to the model.

Errors answer as SGLang 0.5.23's do. Validation (a bad body, an unknown model, a prompt over the
context length) is a plain HTTP 400/404 before anything runs. A request its scheduler ends with an
error status (an injected failure: 500; a request larger than the KV cache: 400) is an HTTP error
when not streaming, but a stream has already answered 200: it gets an SSE error event and
``[DONE]``. SGLang's metrics count such a stream as a finished request with a 200 response, so no
metric tells it from a success; only its client sees it (`serving_chat._handle_streaming_request`
kick-starts the stream for validation errors only).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import random
import time
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, AsyncIterator

from .contract import DEFAULT_PORT, SGLANG_VERSION
from .perfmodel import Aborted, Finished, ReplicaEngine, ReplicaParams, Token, profile_for
from .sglang_metrics import SGLangMetrics

if TYPE_CHECKING:
    from .contract import LaunchConfig

# SGLang's own health-check timeout (SGLANG_HEALTH_CHECK_TIMEOUT, 20 s by default).
HEALTH_CHECK_TIMEOUT = 20.0
_WORDS = (
    "the", "digital", "worker", "answers", "your", "question", "with", "care", "and", "a", "short",
    "summary", "of", "what", "it", "found", "in", "the", "documents", "you", "shared", ".",
)


@dataclass(frozen=True)
class SimConfig:
    model_name: str = "default"
    model_path: str | None = None  # reported by /model_info; defaults to /models/<model_name>
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port (see SimulatedSGLang.url)
    gpu_type: str | None = None
    revision: str | None = None  # what the deployment serves; shown by /get_server_info
    cold_start_seconds: float = 0.0
    max_running_requests: int = 256
    chunked_prefill_size: int = 8192
    context_length: int = 8192
    max_total_tokens: int | None = None  # KV capacity override (SGLang --max-total-tokens)
    prefix_cache_hit_rate: float = 0.0
    default_max_tokens: int = 128
    api_key: str | None = None
    error_rate: float = 0.0
    latency_factor: float = 1.0
    hang: bool = False
    crash_after_seconds: float | None = None
    health_check_timeout: float = HEALTH_CHECK_TIMEOUT
    seed: int | None = None

    @classmethod
    def from_launch_config(cls, launch: "LaunchConfig", **overrides) -> "SimConfig":
        """The simulated twin of a replica the operator would launch with `launch` (same ConfigMap).

        Fields SGLang would take from the config carry over; `overrides` set the rest (gpu_type,
        cold_start_seconds, faults, host/port for a pod simulator that picks its own port...).
        """
        values = {
            "model_name": launch.served_model_name,
            "model_path": launch.model_path,
            "port": launch.port,
            "revision": launch.revision,
        }
        if launch.max_running_requests is not None:
            values["max_running_requests"] = launch.max_running_requests
        if launch.chunked_prefill_size is not None and launch.chunked_prefill_size > 0:
            values["chunked_prefill_size"] = launch.chunked_prefill_size
        if launch.context_length is not None:
            values["context_length"] = launch.context_length
        values.update(overrides)
        return cls(**values)

    def problems(self) -> list[str]:
        found = []
        if not 0.0 <= self.error_rate <= 1.0:
            found.append(f"error_rate: must be between 0 and 1, got {self.error_rate}")
        if self.latency_factor <= 0:
            found.append(f"latency_factor: must be positive, got {self.latency_factor}")
        if self.cold_start_seconds < 0:
            found.append(f"cold_start_seconds: must not be negative, got {self.cold_start_seconds}")
        for name in ("max_running_requests", "chunked_prefill_size", "context_length", "default_max_tokens"):
            if getattr(self, name) < 1:
                found.append(f"{name}: must be positive, got {getattr(self, name)}")
        if not 0 <= self.port <= 65535:
            found.append(f"port: {self.port} is not a TCP port")
        if not 0.0 <= self.prefix_cache_hit_rate < 1.0:
            found.append(f"prefix_cache_hit_rate: must be in [0, 1), got {self.prefix_cache_hit_rate}")
        return found

    def replica_params(self) -> ReplicaParams:
        return ReplicaParams(
            profile=profile_for(self.gpu_type),
            max_running_requests=self.max_running_requests,
            chunked_prefill_tokens=self.chunked_prefill_size,
            cold_start_seconds=self.cold_start_seconds,
            slowdown=self.latency_factor,
            kv_cache_tokens=self.max_total_tokens,
            prefix_cache_hit_rate=self.prefix_cache_hit_rate,
        )


@dataclass
class Faults:
    error_rate: float = 0.0
    latency_factor: float = 1.0
    hang: bool = False

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def estimate_tokens(text: str) -> int:
    return max(1, math.ceil(len(text.encode()) / 4))


class _RequestError(Exception):
    def __init__(self, status: int, message: str, kind: str = "BadRequestError") -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


class _SchedulerAbort(_RequestError):
    """The scheduler ended the request with an error status (SGLang's FINISH_ABORT with a status
    code): an HTTP error without streaming, an SSE error event inside a stream that answered 200."""

    def sse_event(self) -> bytes:
        # serving_base.create_streaming_error_response, as serving_chat calls it for such an abort.
        error = {"object": "error", "message": str(self), "type": HTTPStatus(self.status).name, "param": None,
                 "code": self.status}
        return b"data: " + json.dumps({"error": error}).encode() + b"\n\n"


# Per-request key: the status a streaming answer started with (what SGLang's HTTP metrics count it as).
STARTED_STATUS = "digital_worker.started_status"


class SimulatedSGLang:
    """One simulated SGLang replica. ``async with SimulatedSGLang(SimConfig(...)) as server: server.url``."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        problems = self.config.problems()
        if problems:
            raise ValueError(problems[0])
        self.params = self.config.replica_params()
        self.faults = Faults(self.config.error_rate, self.config.latency_factor, self.config.hang)
        self.engine = ReplicaEngine(self.params, stream_tokens=True)
        self.metrics = SGLangMetrics(self.config.model_name)
        self.random = random.Random(self.config.seed)
        self.crashed = asyncio.Event()
        self.draining = False  # SIGTERM seen: health answers 503 while the engine finishes its requests
        self.port: int | None = None
        self._epoch = 0.0  # loop time that the engine's clock 0 maps to
        self._ready_at = 0.0
        self._started_wall = time.time()
        self._waiters: dict[str, asyncio.Queue] = {}
        self._wake: asyncio.Event | None = None
        self._driver: asyncio.Task | None = None
        self._crash_timer: asyncio.Task | None = None
        self._runner = None
        self._hang_release: asyncio.Event | None = None
        self._background: set[asyncio.Future] = set()  # strong references to fire-and-forget tasks

    # ---- lifecycle ------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.config.host in ("0.0.0.0", "") else self.config.host
        return f"http://{host}:{self.port}"

    @property
    def ready(self) -> bool:
        return self._now() >= self._ready_at and not self.crashed.is_set()

    async def start(self) -> "SimulatedSGLang":
        from aiohttp import web

        loop = asyncio.get_running_loop()
        self._epoch = loop.time()
        self._ready_at = self.config.cold_start_seconds
        self._wake = asyncio.Event()
        self._hang_release = asyncio.Event()
        # SGLang adds its API-key check last, outermost: a refused key never reaches the HTTP metrics.
        app = web.Application(middlewares=[self._auth_middleware, self._http_metrics_middleware])
        routes = [
            web.get("/health", self._health),
            web.get("/health_generate", self._health),
            web.get("/get_model_info", self._model_info),
            web.get("/model_info", self._model_info),
            web.get("/get_server_info", self._server_info),
            web.get("/server_info", self._server_info),
            web.get("/v1/models", self._models),
            web.post("/v1/chat/completions", self._chat_completions),
            web.post("/v1/completions", self._completions),
            web.get("/metrics", self._metrics),
            web.get("/admin/faults", self._get_faults),
            web.post("/admin/faults", self._post_faults),
        ]
        app.add_routes(routes)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port, reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # the real port when 0 was asked
        self._driver = asyncio.create_task(self._drive(), name=f"sim-engine-{self.port}")
        if self.config.crash_after_seconds is not None:
            self._crash_timer = asyncio.create_task(self._crash_later(self.config.crash_after_seconds))
        return self

    async def stop(self, grace_seconds: float = 0.0) -> None:
        """Shut down. With a grace period, drain first as SGLang does on SIGTERM (its tokenizer
        manager's `sigterm_watchdog`): health answers 503, the requests already in the engine run to
        completion, and the process exits once none is left, or when the grace period (Kubernetes'
        `terminationGracePeriodSeconds`, then SIGKILL) runs out. A hung server exits at once, as an
        unhealthy SGLang does."""
        try:
            if grace_seconds > 0 and self._runner is not None:
                await self._drain(grace_seconds)
        finally:
            await self._halt()

    async def _drain(self, grace_seconds: float) -> None:
        self.draining = True
        try:
            async with asyncio.timeout(None if math.isinf(grace_seconds) else grace_seconds):
                while self._waiters and not self.faults.hang and not self.crashed.is_set():
                    await asyncio.sleep(0.05)
        except TimeoutError:
            pass

    async def _halt(self) -> None:
        tasks = [task for task in (self._driver, self._crash_timer)
                 if task is not None and task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        # gather, not a try around each await: a cancel of stop() itself must still propagate.
        await asyncio.gather(*tasks, return_exceptions=True)
        self._driver = self._crash_timer = None
        if self._hang_release is not None:
            self._hang_release.set()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def crash(self) -> None:
        """Stop answering at once, as a killed SGLang process would (connections refused from now on)."""
        self.crashed.set()
        await self.stop()

    async def __aenter__(self) -> "SimulatedSGLang":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def _crash_later(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        await self.crash()

    def set_faults(self, **changes) -> Faults:
        known = {f.name for f in dataclasses.fields(Faults)} | {"cold_start_seconds"}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown fault(s): {', '.join(unknown)}")
        if "error_rate" in changes and not 0.0 <= float(changes["error_rate"]) <= 1.0:
            raise ValueError("error_rate: must be between 0 and 1")
        if "latency_factor" in changes and float(changes["latency_factor"]) <= 0:
            raise ValueError("latency_factor: must be positive")
        if "cold_start_seconds" in changes:
            self._ready_at = self._now() + float(changes.pop("cold_start_seconds"))
        if "error_rate" in changes:
            self.faults.error_rate = float(changes["error_rate"])
        if "latency_factor" in changes:
            self.faults.latency_factor = float(changes["latency_factor"])
            self.engine.params = self.params.with_slowdown(self.faults.latency_factor)
            self._kick()
        if "hang" in changes:
            self.faults.hang = bool(changes["hang"])
            if not self.faults.hang and self._hang_release is not None:
                self._hang_release.set()
                self._hang_release = asyncio.Event()
        return self.faults

    # ---- the engine in real time ------------------------------------------------------------------
    def _now(self) -> float:
        return asyncio.get_running_loop().time() - self._epoch

    def _kick(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _drive(self) -> None:
        while True:
            for event in self.engine.advance(self._now()):
                queue = self._waiters.get(event.request_id)
                if queue is not None:
                    queue.put_nowait(event)
            self._export_gauges()
            next_time = self.engine.next_event_time()
            self._wake.clear()
            if next_time is None:
                await self._wake.wait()
                continue
            delay = next_time - self._now()
            if delay > 0:
                # Not asyncio.wait_for: on Python 3.11 it swallows a cancel that lands just after the
                # event was set (cpython gh-86296), and the driver would then outlive stop() forever.
                try:
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
                except TimeoutError:
                    pass

    def _export_gauges(self) -> None:
        engine = self.engine
        self.metrics.set("sglang:num_running_reqs", engine.num_running)
        self.metrics.set("sglang:num_queue_reqs", engine.num_queued)
        self.metrics.set("sglang:token_usage", engine.token_usage)
        self.metrics.set("sglang:gen_throughput", engine.gen_throughput)
        self.metrics.set("sglang:cache_hit_rate", engine.cache_hit_rate)

    async def generate(self, prompt_tokens: int, max_tokens: int, streaming: bool) -> AsyncIterator[object]:
        """Run one request through the engine; yields FirstToken, Token... and finally Finished."""
        if self.faults.hang:
            await self._hang()
        if self.faults.error_rate and self.random.random() < self.faults.error_rate:
            # As a scheduler ending a request with FINISH_ABORT(500): SGLang counts it finished, not aborted.
            self._record_rejected(prompt_tokens, streaming)
            # Not streaming, SGLang raises it as an HTTPException, whose handler types it by its code.
            raise _SchedulerAbort(500, "Injected failure (digital-worker simulator)", "500")
        request_id = uuid.uuid4().hex
        queue: asyncio.Queue = asyncio.Queue()
        self._waiters[request_id] = queue
        self.engine.submit(request_id, prompt_tokens, max_tokens, self._now())
        self._kick()
        done = False
        try:
            while True:
                event = await queue.get()
                if isinstance(event, Aborted):
                    done = True  # the scheduler refused it (FINISH_ABORT(400)): finished, as SGLang counts it
                    self._record_rejected(prompt_tokens, streaming)
                    raise _SchedulerAbort(400, event.reason)
                if isinstance(event, Finished):
                    done = True
                    self._record_finished(event, streaming)
                yield event
                if done:
                    return
        finally:
            self._waiters.pop(request_id, None)
            if not done:  # the client went away: free the slot as SGLang does on disconnect
                if self.engine.abort(request_id, self._now()):
                    self.metrics.child("sglang:num_aborted_requests_total").inc()
                self._kick()

    async def _hang(self) -> None:
        # Wait until the hang is lifted (or the server stops); answer nothing meanwhile.
        while self.faults.hang:
            if self._runner is None or self.crashed.is_set() or self._hang_release is None:
                raise _RequestError(503, "server stopped", "ServiceUnavailableError")
            await self._hang_release.wait()

    def _count_request(self, streaming: bool, prompt_tokens: int, output_tokens: int, e2e_latency: float) -> None:
        """What SGLang's `observe_one_finished_request` counts for every request that ended."""
        is_streaming = {"is_streaming": "true" if streaming else "false"}
        metrics = self.metrics
        metrics.child("sglang:prompt_tokens_total", **is_streaming).inc(prompt_tokens)
        metrics.child("sglang:generation_tokens_total", **is_streaming).inc(output_tokens)
        metrics.child("sglang:num_requests_total", **is_streaming).inc()
        metrics.child("sglang:e2e_request_latency_seconds", **is_streaming).observe(e2e_latency)

    def _record_rejected(self, prompt_tokens: int, streaming: bool) -> None:
        """A request the scheduler ended with an error status. SGLang 0.5.23 (tokenizer_manager
        `collect_metrics`) counts it in `num_requests_total` whatever its finish reason, with its
        prompt and end-to-end latency; `num_aborted_requests_total` is only for `abort_request`
        (a client gone, the abort endpoint). Its HTTP status is what tells it apart."""
        self._count_request(streaming, prompt_tokens, 0, 0.0)

    def _record_finished(self, event: Finished, streaming: bool) -> None:
        self._count_request(streaming, event.prompt_tokens, event.output_tokens, event.e2e_latency)
        metrics = self.metrics
        is_streaming = {"is_streaming": "true" if streaming else "false"}
        metrics.child("sglang:time_to_first_token_seconds", **is_streaming).observe(event.ttft)
        metrics.child("sglang:queue_time_seconds").observe(event.queue_time)
        itl = metrics.child("sglang:inter_token_latency_seconds")
        for latency in event.inter_token_latencies:
            itl.observe(latency)

    # ---- HTTP -------------------------------------------------------------------------------------
    @property
    def _aiohttp(self):
        from aiohttp import web

        return web

    def _json(self, payload, status: int = 200):
        return self._aiohttp.json_response(payload, status=status)

    def _error(self, error: _RequestError):
        # SGLang's OpenAI-compatible error body.
        return self._json({"object": "error", "message": str(error), "type": error.kind, "param": None,
                           "code": error.status}, status=error.status)

    @property
    def _auth_middleware(self):
        web = self._aiohttp

        @web.middleware
        async def middleware(request, handler):
            path = request.path
            # As SGLang: probes, metrics (and our admin endpoint, a test hook) need no key.
            open_paths = ("/health", "/ready", "/metrics", "/admin/")
            if self.config.api_key and not path.startswith(open_paths):
                if request.headers.get("Authorization") != f"Bearer {self.config.api_key}":
                    return web.json_response({"error": "Unauthorized"}, status=401)
            return await handler(request)

        return middleware

    @property
    def _http_metrics_middleware(self):
        """SGLang's `http_request_metrics` middleware: requests and responses by route and status.

        The endpoint label is the route's path (the request's own path when no route matched);
        a streaming answer counts with the status it started with, as in SGLang."""
        web = self._aiohttp
        metrics = self.metrics

        @web.middleware
        async def middleware(request, handler):
            resource = request.match_info.route.resource
            endpoint = resource.canonical if resource is not None else request.path
            labels = {"endpoint": endpoint, "method": request.method}
            metrics.child("sglang:http_requests_total", **labels).inc()
            active = metrics.child("sglang:http_requests_active", **labels)
            active.inc()
            status = None
            try:
                response = await handler(request)
                status = response.status
                return response
            except web.HTTPException as exc:
                status = exc.status
                raise
            except (ConnectionResetError, asyncio.CancelledError):
                # The client left: a stream that had started counts with its status, nothing else does.
                status = request.get(STARTED_STATUS)
                raise
            except Exception:
                status = request.get(STARTED_STATUS, 500)
                raise
            finally:
                active.dec()
                if status is not None:
                    metrics.child("sglang:http_responses_total", status_code=str(status), **labels).inc()

        return middleware

    async def _health(self, request):
        web = self._aiohttp
        if self.draining:
            return web.Response(status=503)
        if self.faults.hang:
            # SGLang's health check waits for the scheduler, then gives up with 503.
            try:
                async with asyncio.timeout(self.config.health_check_timeout):  # not wait_for: see _drive
                    await self._hang_release.wait()
            except TimeoutError:
                return web.Response(status=503)
        if not self.ready:
            return web.Response(status=503)
        return web.Response(status=200)

    async def _model_info(self, request):
        return self._json({
            "model_path": self._model_path,
            "served_model_name": self.config.model_name,
            "tokenizer_path": self._model_path,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": "default",
            "load_format": "auto",
            "reasoning_parser": None,
            "tool_call_parser": None,
            "disaggregation_mode": "null",
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
        })

    @property
    def _model_path(self) -> str:
        return self.config.model_path or f"/models/{self.config.model_name}"

    def server_info(self) -> dict:
        """What /get_server_info shows: SGLang's field names for what we model; never the API key."""
        params = self.engine.params
        return {
            "model_path": self._model_path,
            "served_model_name": self.config.model_name,
            "host": self.config.host,
            "port": self.port or DEFAULT_PORT,
            "tp_size": 1,
            "dp_size": 1,
            "revision": self.config.revision,
            "max_running_requests": params.max_running_requests,
            "chunked_prefill_size": params.chunked_prefill_tokens,
            "max_total_num_tokens": params.kv_capacity,
            "context_length": self.config.context_length,
            "enable_metrics": True,
            "api_key": None,  # never shown (a real SGLang shows it to holders of the key)
            "version": SGLANG_VERSION,
            "startup_time": self._started_wall,
            "internal_states": [{
                "last_gen_throughput": self.engine.gen_throughput,
                "num_running_reqs": self.engine.num_running,
                "num_queue_reqs": self.engine.num_queued,
                "token_usage": self.engine.token_usage,
            }],
            "digital_worker": {
                "simulated": True,
                "gpu_profile": params.profile.name,
                "ready": self.ready,
                "faults": self.faults.as_dict(),
            },
        }

    async def _server_info(self, request):
        return self._json(self.server_info())

    async def _models(self, request):
        return self._json({"object": "list", "data": [{
            "id": self.config.model_name, "object": "model", "created": int(self._started_wall),
            "owned_by": "sglang", "root": self._model_path, "max_model_len": self.config.context_length,
        }]})

    async def _metrics(self, request):
        # Only the driver advances the engine (it owns the events); the gauges read its state.
        self._export_gauges()
        body, content_type = self.metrics.exposition(request.headers.get("Accept"))
        response = self._aiohttp.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response

    async def _get_faults(self, request):
        return self._json({**self.faults.as_dict(), "ready": self.ready})

    async def _post_faults(self, request):
        try:
            changes = await request.json()
            if not isinstance(changes, dict):
                raise ValueError("expected a JSON object")
            crash = bool(changes.pop("crash", False))
            faults = self.set_faults(**changes)
        except (ValueError, TypeError) as exc:
            return self._json({"error": str(exc)}, status=400)
        if crash:
            # Answer first, then go down, so the caller learns the fault was taken.
            self._background.add(asyncio.ensure_future(self._crash_later(0.05)))
        return self._json({**faults.as_dict(), "crash": crash})

    # ---- OpenAI-compatible generation ---------------------------------------------------------------
    async def _read_body(self, request) -> dict:
        try:
            body = await request.json()
        except (ValueError, json.JSONDecodeError):
            raise _RequestError(400, "request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise _RequestError(400, "request body must be a JSON object")
        model = body.get("model")
        if model not in (None, "", "default", self.config.model_name):
            raise _RequestError(404, f"The model `{model}` does not exist.", "NotFoundError")
        return body

    def _check_ready(self) -> None:
        if not self.ready:
            raise _RequestError(503, "The server is starting up.", "ServiceUnavailableError")

    def _output_budget(self, body: dict, prompt_tokens: int) -> int:
        if prompt_tokens >= self.config.context_length:
            raise _RequestError(400, f"The input ({prompt_tokens} tokens) is longer than the model's "
                                     f"context length ({self.config.context_length} tokens).")
        requested = body.get("max_completion_tokens") or body.get("max_tokens") or self.config.default_max_tokens
        if not isinstance(requested, int) or requested < 1:
            raise _RequestError(400, "max_tokens must be a positive integer")
        return min(requested, self.config.context_length - prompt_tokens)

    async def _chat_completions(self, request):
        try:
            self._check_ready()
            body = await self._read_body(request)
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise _RequestError(400, "messages must be a non-empty list")
            text = ""
            for message in messages:
                content = message.get("content") if isinstance(message, dict) else None
                if isinstance(content, list):  # content parts
                    content = " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
                text += str(content or "")
            prompt_tokens = estimate_tokens(text) + 4 * len(messages)
            max_tokens = self._output_budget(body, prompt_tokens)
            return await self._respond(request, body, prompt_tokens, max_tokens, chat=True)
        except _RequestError as error:
            return self._error(error)

    async def _completions(self, request):
        try:
            self._check_ready()
            body = await self._read_body(request)
            prompt = body.get("prompt")
            if isinstance(prompt, list):
                prompt = " ".join(str(p) for p in prompt)
            if not isinstance(prompt, str) or not prompt:
                raise _RequestError(400, "prompt must be a non-empty string")
            prompt_tokens = estimate_tokens(prompt)
            max_tokens = self._output_budget(body, prompt_tokens)
            return await self._respond(request, body, prompt_tokens, max_tokens, chat=False)
        except _RequestError as error:
            return self._error(error)

    async def _respond(self, request, body: dict, prompt_tokens: int, max_tokens: int, chat: bool):
        web = self._aiohttp
        streaming = bool(body.get("stream"))
        response_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": max_tokens,
                 "total_tokens": prompt_tokens + max_tokens}

        def word(index: int) -> str:
            return (" " if index else "") + _WORDS[index % len(_WORDS)]

        if not streaming:
            pieces = []
            async for event in self.generate(prompt_tokens, max_tokens, streaming=False):
                if isinstance(event, Token):
                    pieces.append(word(event.index))
            text = "".join(pieces)
            choice = {"index": 0, "finish_reason": "length", "logprobs": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": text, "tool_calls": None,
                                     "reasoning_content": None}
            else:
                choice["text"] = text
            return self._json({"id": response_id, "object": kind, "created": created,
                               "model": self.config.model_name, "choices": [choice], "usage": usage})

        # Streaming: headers go out with the first event (SGLang kick-starts the stream), so only
        # errors raised before the scheduler answers (hang, shutdown) are plain HTTP errors.
        events = self.generate(prompt_tokens, max_tokens, streaming=True)
        try:
            first = await events.__anext__()
        except _SchedulerAbort as abort:
            first = abort
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        request[STARTED_STATUS] = response.status
        chunk_kind = "chat.completion.chunk" if chat else "text_completion"
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def send(choice: dict, usage_value=None) -> None:
            chunk = {"id": response_id, "object": chunk_kind, "created": created,
                     "model": self.config.model_name, "choices": [choice] if choice else []}
            if usage_value is not None:
                chunk["usage"] = usage_value
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")

        async def emit(event) -> None:
            if isinstance(event, Token):
                finish = "length" if event.index == max_tokens - 1 else None
                if chat:
                    await send({"index": 0, "delta": {"content": word(event.index)}, "finish_reason": finish})
                else:
                    await send({"index": 0, "text": word(event.index), "finish_reason": finish,
                                "logprobs": None})

        try:
            if isinstance(first, _SchedulerAbort):
                raise first
            if chat:  # SGLang's role chunk comes with the first output, unless that output is an error
                await send({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
            await emit(first)
            async for event in events:
                await emit(event)
            if include_usage:
                await send({}, usage)
        except _SchedulerAbort as abort:
            await response.write(abort.sse_event())
        finally:  # also when the client left (ConnectionResetError, CancelledError): frees its slot
            await events.aclose()
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


async def serve_forever(config: SimConfig, terminate: asyncio.Event | None = None) -> int:
    """Run one simulated server until it crashes (exit code 1 after an injected crash), `terminate`
    is set (SIGTERM: drain as SGLang does, then exit code 0) or it is cancelled (stop at once)."""
    server = SimulatedSGLang(config)
    await server.start()
    print(f"simulated SGLang {SGLANG_VERSION} serving {config.model_name!r} on {server.url}", flush=True)
    terminate = terminate or asyncio.Event()
    waits = [asyncio.ensure_future(server.crashed.wait()), asyncio.ensure_future(terminate.wait())]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if server.crashed.is_set():
            return 1
        # SGLang sets no limit of its own on the drain: the kubelet's SIGKILL after the grace period does.
        await server.stop(grace_seconds=math.inf)
        return 0
    finally:
        for wait in waits:
            wait.cancel()
        await server.stop()
