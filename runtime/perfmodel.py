"""One performance model of one SGLang replica, shared by every simulator in the project.

Two users, one set of parameters:

* the SGLang-compatible HTTP simulator (runtime) drives `ReplicaEngine` in real time;
* the trace-replay autoscaling simulator drives the analytic helpers (`capacity_rps`,
  `ttft_quantile`, `sustainable_rps`, `ttft_attainment`) in virtual time, because replaying weeks of
  traffic request by request would take hours. The helpers are derived from the same `GpuProfile`
  numbers as the engine, and a test checks that they agree with it.

The engine models SGLang's scheduler at the level of one forward step: requests wait in a FIFO
queue, are admitted while the running batch is below `max_running_requests` and their prompt plus
output fits in the KV cache (SGLang reserves KV for the expected output, so the cache bounds the
batch), get their prompt prefilled in chunks of at most `chunked_prefill_tokens` per step, and then
decode one token per step. A step that carries a prefill chunk and decodes costs
``chunk / prefill_tokens_per_second + decode_base_seconds + decode_per_request_seconds * batch``
(SGLang's mixed chunked prefill), times the replica's `slowdown` factor.

Pure standard library: the `runtime` extra carries no numpy.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field, replace

__all__ = [
    "GpuProfile",
    "PROFILES",
    "DEFAULT_PROFILE",
    "profile_for",
    "ReplicaParams",
    "EngineEvent",
    "FirstToken",
    "Token",
    "Finished",
    "Aborted",
    "ReplicaEngine",
    "max_batch",
    "decode_step_seconds",
    "capacity_rps",
    "ttft_quantile",
    "ttft_attainment",
    "sustainable_rps",
]


@dataclass(frozen=True)
class GpuProfile:
    """Speed and memory of one SGLang replica (one GPU, an 8B-class model in BF16).

    Sources (approximate, rounded, for an 8B Llama-3-class model, TP=1):
    * SGLang blog "Achieving Faster Open-Source Llama3 Serving with SGLang Runtime" (LMSYS, July
      2024) and the SGLang paper (Zheng et al., "SGLang: Efficient Execution of Structured Language
      Model Programs", NeurIPS 2024): offline throughput of Llama-3-8B on one A100/H100 in the
      thousands of output tokens/s at large batch, single-request ITL of a few milliseconds.
    * The decode step is memory-bandwidth bound: reading ~16 GB of weights takes ~4.8 ms at
      3.35 TB/s (H100 SXM), ~8 ms at 2.0 TB/s (A100 80GB), ~53 ms at 300 GB/s (L4); the base step
      time adds kernel/scheduler overhead to that floor. The per-request cost covers reading that
      request's KV cache and its share of sampling.
    * KV capacity: GPU memory x SGLang's default mem-fraction-static (~0.88) minus weights,
      divided by 128 KiB per token (32 layers x 8 KV heads x 128 dims x 2 (K,V) x 2 bytes).
    """

    name: str
    prefill_tokens_per_second: float
    decode_base_seconds: float
    decode_per_request_seconds: float
    kv_cache_tokens: int
    memory_gb: float


PROFILES: dict[str, GpuProfile] = {
    profile.name: profile
    for profile in (
        GpuProfile(
            name="nvidia-h100-80gb",
            prefill_tokens_per_second=16000.0,
            decode_base_seconds=0.0065,
            decode_per_request_seconds=0.00012,
            kv_cache_tokens=420_000,
            memory_gb=80.0,
        ),
        GpuProfile(
            name="nvidia-a100-80gb",
            prefill_tokens_per_second=8500.0,
            decode_base_seconds=0.011,
            decode_per_request_seconds=0.0002,
            kv_cache_tokens=420_000,
            memory_gb=80.0,
        ),
        GpuProfile(
            name="nvidia-a10g-24gb",
            prefill_tokens_per_second=2800.0,
            decode_base_seconds=0.030,
            decode_per_request_seconds=0.0006,
            kv_cache_tokens=40_000,
            memory_gb=24.0,
        ),
        GpuProfile(
            name="nvidia-l4",
            prefill_tokens_per_second=2200.0,
            decode_base_seconds=0.058,
            decode_per_request_seconds=0.0008,
            kv_cache_tokens=35_000,
            memory_gb=24.0,
        ),
    )
}
DEFAULT_PROFILE = PROFILES["nvidia-h100-80gb"]

# Node label values (nvidia.com/gpu.product, cloud instance GPU names) → profile names.
_ALIASES = {
    "h100": "nvidia-h100-80gb",
    "a100": "nvidia-a100-80gb",
    "a10g": "nvidia-a10g-24gb",
    "a10": "nvidia-a10g-24gb",
    "l4": "nvidia-l4",
}


def profile_for(gpu_type: str | None) -> GpuProfile:
    """The profile for a GPU name as users or node labels spell it ("NVIDIA-H100-80GB-HBM3", "a100", ...).

    Unknown or missing names get `DEFAULT_PROFILE`.
    """
    if not gpu_type:
        return DEFAULT_PROFILE
    key = gpu_type.strip().lower().replace("_", "-").replace(" ", "-")
    if key in PROFILES:
        return PROFILES[key]
    for token in key.split("-"):
        if token in _ALIASES:
            return PROFILES[_ALIASES[token]]
    for alias, name in _ALIASES.items():
        if alias in key:
            return PROFILES[name]
    return DEFAULT_PROFILE


@dataclass(frozen=True)
class ReplicaParams:
    """How one replica is configured (SGLang flags) and how it misbehaves (fault injection)."""

    profile: GpuProfile = DEFAULT_PROFILE
    max_running_requests: int = 256  # SGLang --max-running-requests
    chunked_prefill_tokens: int = 8192  # SGLang --chunked-prefill-size
    cold_start_seconds: float = 180.0  # pod scheduled → ready (image pull, weights load, CUDA graphs)
    slowdown: float = 1.0  # multiplies every step time; >1 injects a slow GPU / noisy neighbour
    kv_cache_tokens: int | None = None  # SGLang --max-total-tokens; None: the profile's capacity
    prefix_cache_hit_rate: float = 0.0  # share of prompt tokens served from the radix cache

    def __post_init__(self) -> None:
        if self.max_running_requests < 1:
            raise ValueError("max_running_requests must be at least 1")
        if self.chunked_prefill_tokens < 1:
            raise ValueError("chunked_prefill_tokens must be at least 1")
        if self.slowdown <= 0:
            raise ValueError("slowdown must be positive")
        if not 0.0 <= self.prefix_cache_hit_rate < 1.0:
            raise ValueError("prefix_cache_hit_rate must be in [0, 1)")

    @property
    def kv_capacity(self) -> int:
        return self.kv_cache_tokens if self.kv_cache_tokens is not None else self.profile.kv_cache_tokens

    def with_slowdown(self, slowdown: float) -> "ReplicaParams":
        return replace(self, slowdown=slowdown)


# ---------------------------------------------------------------------------------------------
# Events


@dataclass(frozen=True)
class EngineEvent:
    request_id: str
    time: float


@dataclass(frozen=True)
class FirstToken(EngineEvent):
    ttft: float  # arrival → first output token
    queue_time: float  # arrival → admitted into the running batch


@dataclass(frozen=True)
class Token(EngineEvent):
    index: int  # 0-based index of this output token (0 is the first token)


@dataclass(frozen=True)
class Finished(EngineEvent):
    e2e_latency: float
    ttft: float
    queue_time: float
    prompt_tokens: int
    output_tokens: int
    inter_token_latencies: tuple[float, ...]


@dataclass(frozen=True)
class Aborted(EngineEvent):
    reason: str


@dataclass
class _Request:
    request_id: str
    prompt_tokens: int
    output_tokens: int
    arrival: float
    prefill_remaining: int = 0
    generated: int = 0
    admitted_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    inter_token: list[float] = field(default_factory=list)

    @property
    def kv_reserved(self) -> int:
        return self.prompt_tokens + self.output_tokens


def decode_step_seconds(params: ReplicaParams, batch: int) -> float:
    """Time of one decode step with `batch` running requests (no prefill in the step)."""
    if batch <= 0:
        return 0.0
    profile = params.profile
    return (profile.decode_base_seconds + profile.decode_per_request_seconds * batch) * params.slowdown


def _step_seconds(params: ReplicaParams, prefill_tokens: int, decode_batch: int) -> float:
    profile = params.profile
    seconds = prefill_tokens / profile.prefill_tokens_per_second
    # Every forward pass reads the weights once, prefill-only steps included.
    seconds += profile.decode_base_seconds + profile.decode_per_request_seconds * decode_batch
    return seconds * params.slowdown


class ReplicaEngine:
    """Step-level continuous batching of one SGLang replica, in time supplied by the caller.

    Time is a float in seconds and only moves forward. `submit` and `abort` take the current time;
    `advance(now)` runs every step that starts at or before `now` and returns the events dated at
    or before `now`, in time order. A step, once started, is committed: its events may be dated
    after `now` and are returned by a later `advance`.
    """

    # Window over which `gen_throughput` is measured, as SGLang's scheduler logs it.
    THROUGHPUT_WINDOW_SECONDS = 5.0

    def __init__(self, params: ReplicaParams | None = None, *, stream_tokens: bool = True) -> None:
        self.params = params or ReplicaParams()
        self.stream_tokens = stream_tokens
        self._clock = 0.0  # when the engine is free to start its next step
        self._started = False
        self._queue: deque[_Request] = deque()
        self._running: dict[str, _Request] = {}
        self._kv_used = 0
        self._pending: list[EngineEvent] = []  # committed events not yet handed out
        self._recent_tokens: deque[tuple[float, int]] = deque()
        self._prompt_tokens_total = 0
        self._cached_tokens_total = 0
        self.finished_requests = 0

    # -- live gauges (what SGLang exports as sglang:num_running_reqs etc.) -----------------------
    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_queued(self) -> int:
        return len(self._queue)

    @property
    def token_usage(self) -> float:
        return self._kv_used / self.params.kv_capacity

    @property
    def gen_throughput(self) -> float:
        if not self._recent_tokens:
            return 0.0
        horizon = self._clock - self.THROUGHPUT_WINDOW_SECONDS
        while self._recent_tokens and self._recent_tokens[0][0] < horizon:
            self._recent_tokens.popleft()
        return sum(count for _, count in self._recent_tokens) / self.THROUGHPUT_WINDOW_SECONDS

    @property
    def cache_hit_rate(self) -> float:
        if self._prompt_tokens_total == 0:
            return 0.0
        return self._cached_tokens_total / self._prompt_tokens_total

    @property
    def clock(self) -> float:
        return self._clock

    def has_work(self) -> bool:
        return bool(self._queue or self._running)

    # -- requests ---------------------------------------------------------------------------------
    def submit(self, request_id: str, prompt_tokens: int, output_tokens: int, now: float) -> None:
        """Queue a request that arrived at `now`. Requests that can never fit are aborted at once."""
        if prompt_tokens < 1 or output_tokens < 1:
            raise ValueError("a request needs at least one prompt and one output token")
        self._run_until(now, inclusive=False)
        request = _Request(request_id, int(prompt_tokens), int(output_tokens), float(now))
        if request.kv_reserved > self.params.kv_capacity:
            self._pending.append(Aborted(request_id, now, "prompt plus output exceed the KV cache"))
            return
        cached = int(request.prompt_tokens * self.params.prefix_cache_hit_rate)
        self._prompt_tokens_total += request.prompt_tokens
        self._cached_tokens_total += cached
        request.prefill_remaining = max(1, request.prompt_tokens - cached)
        self._queue.append(request)
        if not self._running and len(self._queue) == 1 and self._clock < now:
            self._clock = now

    def abort(self, request_id: str, now: float) -> bool:
        """Drop a queued or running request (client went away). Returns whether it was known."""
        self._run_until(now)
        for request in self._queue:
            if request.request_id == request_id:
                self._queue.remove(request)
                self._pending.append(Aborted(request_id, now, "aborted by client"))
                return True
        request = self._running.pop(request_id, None)
        if request is None:
            return False
        self._kv_used -= request.kv_reserved
        self._pending.append(Aborted(request_id, now, "aborted by client"))
        return True

    def advance(self, now: float) -> list[EngineEvent]:
        self._run_until(now)
        ready = [event for event in self._pending if event.time <= now]
        if ready:
            self._pending = [event for event in self._pending if event.time > now]
            ready.sort(key=lambda event: event.time)
        return ready

    def next_event_time(self) -> float | None:
        """The earliest time at which `advance` can return something or change the gauges."""
        times = [event.time for event in self._pending]
        if self.has_work():
            times.append(self._clock)
        return min(times) if times else None

    # -- the scheduler ----------------------------------------------------------------------------
    def _admit(self) -> None:
        while self._queue and len(self._running) < self.params.max_running_requests:
            head = self._queue[0]
            if self._kv_used + head.kv_reserved > self.params.kv_capacity:
                break  # FIFO: SGLang's default policy does not let small requests overtake
            self._queue.popleft()
            head.admitted_at = self._clock
            self._kv_used += head.kv_reserved
            self._running[head.request_id] = head

    def _run_until(self, now: float, *, inclusive: bool = True) -> None:
        # `submit` runs only the steps starting strictly before `now`, so requests arriving at the
        # same instant join the same step; `advance` also runs the one starting exactly at `now`.
        while self.has_work() and (self._clock <= now if inclusive else self._clock < now):
            self._step()
        if not self.has_work() and self._clock < now:
            self._clock = now

    def _step(self) -> None:
        start = self._clock
        self._admit()
        budget = self.params.chunked_prefill_tokens
        prefill_tokens = 0
        prefilling: list[_Request] = []
        decoding: list[_Request] = []
        for request in self._running.values():
            if request.prefill_remaining > 0:
                if budget > 0:
                    chunk = min(budget, request.prefill_remaining)
                    request.prefill_remaining -= chunk
                    budget -= chunk
                    prefill_tokens += chunk
                    if request.prefill_remaining == 0:
                        prefilling.append(request)  # its last chunk: this step samples token 0
            else:
                decoding.append(request)
        if not prefilling and not decoding and prefill_tokens == 0:
            # Unreachable while oversized requests are refused at submit; never spin forever.
            raise RuntimeError("scheduler made no progress")
        duration = _step_seconds(self.params, prefill_tokens, len(decoding) + len(prefilling))
        end = start + duration
        self._clock = end
        produced = 0
        for request in prefilling:
            request.first_token_at = end
            request.last_token_at = end
            request.generated = 1
            produced += 1
            self._pending.append(
                FirstToken(request.request_id, end, ttft=end - request.arrival,
                           queue_time=(request.admitted_at or start) - request.arrival)
            )
            if self.stream_tokens:
                self._pending.append(Token(request.request_id, end, index=0))
        for request in decoding:
            request.inter_token.append(end - (request.last_token_at or end))
            request.last_token_at = end
            if self.stream_tokens:
                self._pending.append(Token(request.request_id, end, index=request.generated))
            request.generated += 1
            produced += 1
        if produced:
            self._recent_tokens.append((end, produced))
        for request in prefilling + decoding:
            if request.generated >= request.output_tokens:
                del self._running[request.request_id]
                self._kv_used -= request.kv_reserved
                self.finished_requests += 1
                self._pending.append(
                    Finished(
                        request.request_id,
                        end,
                        e2e_latency=end - request.arrival,
                        ttft=(request.first_token_at or end) - request.arrival,
                        queue_time=(request.admitted_at or start) - request.arrival,
                        prompt_tokens=request.prompt_tokens,
                        output_tokens=request.output_tokens,
                        inter_token_latencies=tuple(request.inter_token),
                    )
                )


# ---------------------------------------------------------------------------------------------
# Analytic helpers: the same parameters, in closed form, for fast replay of long traces.


def max_batch(params: ReplicaParams, mean_prompt_tokens: float, mean_output_tokens: float) -> int:
    """The largest running batch: bounded by --max-running-requests and by the KV cache.

    A request holds its prompt plus, on average, half its output in KV while it runs; the engine
    reserves the whole output at admission, so the bound is between the two; we use the engine's.
    """
    per_request = max(1.0, mean_prompt_tokens + mean_output_tokens)
    return max(1, min(params.max_running_requests, int(params.kv_capacity // per_request)))


def _effective_prompt(params: ReplicaParams, mean_prompt_tokens: float) -> float:
    return max(1.0, mean_prompt_tokens * (1.0 - params.prefix_cache_hit_rate))


def capacity_rps(params: ReplicaParams, mean_prompt_tokens: float, mean_output_tokens: float) -> float:
    """Saturation throughput (requests/s) of one replica: the batch full, latency unbounded.

    In one second the engine spends P/prefill_tps per request on its prompt and, per output token,
    a 1/B share of a decode step of B requests: 1 = λ·(P/Ptps + O·(base/B + per_request)).
    """
    profile = params.profile
    batch = max_batch(params, mean_prompt_tokens, mean_output_tokens)
    seconds_per_request = (
        _effective_prompt(params, mean_prompt_tokens) / profile.prefill_tokens_per_second
        + max(1.0, mean_output_tokens) * (profile.decode_base_seconds / batch + profile.decode_per_request_seconds)
    ) * params.slowdown
    return 1.0 / seconds_per_request


def _erlang_c(servers: int, offered_load: float) -> float:
    """Probability that an arrival waits in an M/M/c queue (offered_load = λ/μ < servers)."""
    if offered_load <= 0:
        return 0.0
    if offered_load >= servers:
        return 1.0
    # Erlang B by the stable recursion, then C from B.
    erlang_b = 1.0
    for k in range(1, servers + 1):
        erlang_b = offered_load * erlang_b / (k + offered_load * erlang_b)
    utilisation = offered_load / servers
    return erlang_b / (1.0 - utilisation + utilisation * erlang_b)


@dataclass(frozen=True)
class _QueueModel:
    fixed_seconds: float  # TTFT with no queueing: own prefill + one step + half a step of phase
    prefill_busy: float  # P(an arrival finds the prefill budget busy with other prompts)
    prefill_wait_mean: float  # mean of that wait when it happens (exponential tail)
    slot_wait_probability: float  # Erlang C: all batch slots busy
    slot_wait_decay: float  # P(slot wait > t | wait) = exp(-decay · t)
    saturated: bool

    def wait_exceeds(self, seconds: float) -> float:
        """P(queueing wait > seconds): the two waits treated as independent exceedances."""
        if self.saturated:
            return 1.0
        if seconds < 0:
            return 1.0
        prefill_tail = self.prefill_busy * math.exp(-seconds / self.prefill_wait_mean) if self.prefill_wait_mean > 0 else 0.0
        slot_tail = self.slot_wait_probability * math.exp(-self.slot_wait_decay * seconds) if self.slot_wait_decay > 0 else self.slot_wait_probability
        return 1.0 - (1.0 - prefill_tail) * (1.0 - slot_tail)


def _queue_model(params: ReplicaParams, rps: float, mean_prompt_tokens: float, mean_output_tokens: float) -> _QueueModel:
    profile = params.profile
    prompt = _effective_prompt(params, mean_prompt_tokens)
    batch = max_batch(params, mean_prompt_tokens, mean_output_tokens)
    capacity = capacity_rps(params, mean_prompt_tokens, mean_output_tokens)
    utilisation = rps / capacity if capacity > 0 else math.inf
    # Steady-state running batch, by Little's law on the decode phase, capped by the batch limit.
    running = min(float(batch), rps * max(1.0, mean_output_tokens) * decode_step_seconds(params, max(1, batch)))
    step = decode_step_seconds(params, max(1, int(running) + 1))
    prefill = prompt / profile.prefill_tokens_per_second * params.slowdown
    fixed = prefill + 1.5 * step  # wait for the current step, then the step carrying our prompt
    prefill_busy = min(0.99, rps * prefill)
    # An arrival during someone else's prefill waits for it (and for those queued behind it); the
    # mean grows like M/D/1's as the prefill budget fills. Fitted to ReplicaEngine runs.
    prefill_wait_mean = 0.5 * prefill * (1.0 + 1.0 / (1.0 - prefill_busy))
    if utilisation >= 1.0:
        return _QueueModel(fixed, 1.0, prefill_wait_mean, 1.0, 0.0, True)
    # Batch slots as servers of an M/M/c queue: each slot serves 1/(capacity/batch) seconds.
    slot_rate = capacity / batch
    slot_wait_probability = _erlang_c(batch, rps / slot_rate)
    decay = batch * slot_rate - rps
    return _QueueModel(fixed, prefill_busy, prefill_wait_mean, slot_wait_probability, decay, False)


def ttft_quantile(
    params: ReplicaParams,
    rps: float,
    mean_prompt_tokens: float,
    mean_output_tokens: float,
    quantile: float = 0.95,
) -> float:
    """Approximate TTFT quantile (seconds) of one replica under Poisson arrivals at `rps`.

    TTFT = fixed part (own prefill, step phase) + wait behind other prompts for the prefill budget
    + wait for a batch slot (M/M/c with c = the batch limit). Infinite at or beyond `capacity_rps`.
    """
    if not 0.0 < quantile < 1.0:
        raise ValueError("quantile must be in (0, 1)")
    model = _queue_model(params, max(0.0, rps), mean_prompt_tokens, mean_output_tokens)
    if model.saturated:
        return math.inf
    tail = 1.0 - quantile
    if model.wait_exceeds(0.0) <= tail:
        return model.fixed_seconds
    low, high = 0.0, 1.0
    while model.wait_exceeds(high) > tail:
        high *= 2.0
        if high > 1e6:
            return math.inf
    for _ in range(40):
        middle = (low + high) / 2.0
        if model.wait_exceeds(middle) > tail:
            low = middle
        else:
            high = middle
    return model.fixed_seconds + high


def ttft_attainment(
    params: ReplicaParams,
    rps: float,
    mean_prompt_tokens: float,
    mean_output_tokens: float,
    ttft_slo_seconds: float,
    extra_wait_seconds: float = 0.0,
) -> float:
    """Share of requests whose TTFT is within the SLO at a steady `rps` on one replica.

    `extra_wait_seconds` adds a deterministic wait (e.g. a backlog ahead of the request).
    """
    model = _queue_model(params, max(0.0, rps), mean_prompt_tokens, mean_output_tokens)
    if model.saturated:
        return 0.0
    slack = ttft_slo_seconds - model.fixed_seconds - extra_wait_seconds
    if slack < 0:
        return 0.0
    return 1.0 - model.wait_exceeds(slack)


def sustainable_rps(
    params: ReplicaParams,
    mean_prompt_tokens: float,
    mean_output_tokens: float,
    ttft_slo_seconds: float,
    quantile: float = 0.95,
) -> float:
    """The highest request rate one replica serves with TTFT at `quantile` within the SLO.

    Zero when even an idle replica misses the SLO (prompt too long for the GPU).
    """
    capacity = capacity_rps(params, mean_prompt_tokens, mean_output_tokens)
    if ttft_quantile(params, 0.0, mean_prompt_tokens, mean_output_tokens, quantile) > ttft_slo_seconds:
        return 0.0
    low, high = 0.0, capacity
    for _ in range(50):
        middle = (low + high) / 2.0
        if ttft_quantile(params, middle, mean_prompt_tokens, mean_output_tokens, quantile) <= ttft_slo_seconds:
            low = middle
        else:
            high = middle
    return low
