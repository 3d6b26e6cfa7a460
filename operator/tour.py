"""The scripted tour of `digital-worker dev`: the product's whole story on one machine, narrated.

deploy -> traffic ramps -> the autoscaler scales out before the ramp peaks -> a new model version
rolls out as a canary and is promoted -> a bad version (errors injected into its simulated replicas)
is aborted by analysis and the stable revision takes all traffic back -> a GPU fault on one replica
-> the replica is replaced. Everything is real except the hardware: the emulated API, the kopf
operator, simulated SGLang replicas, a trace-replaying load generator (operator/loadgen.py), a
real Prometheus when there is one (else the operator's in-process paths).

A `Tour` runs a list of steps (`SCENARIOS`), each a method returning a `StepResult`; a `Recorder`
samples the DigitalWorker's status and the load generator's numbers every second and collects the
cluster's Events, for the live view, the narration and the report (operator/report.py).
`TourTiming.for_speed` compresses the intervals and durations of the applied spec and of the load
trace, never below the schema's floors (5 s autoscaling/analysis intervals, 10 s analysis windows).
"""
from __future__ import annotations

import copy
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from digital_worker.operator import pods, schema as api

# Share of the tour's requests sent streaming.
TOUR_STREAM_SHARE = 0.5

STEP_TITLES = {
    "deploy": "Deploy the DigitalWorker",
    "traffic": "Steady traffic",
    "ramp": "Traffic ramps; the autoscaler scales out",
    "canary": "A new model version rolls out as a canary",
    "rollback": "A bad version is rolled back automatically",
    "gpu-fault": "A GPU fault on one replica; the replica is replaced",
}
SCENARIOS: dict[str, tuple[str, ...]] = {
    "tour": ("deploy", "ramp", "canary", "rollback", "gpu-fault"),
    "autoscale": ("deploy", "ramp"),
    "canary": ("deploy", "traffic", "canary"),
    "rollback": ("deploy", "traffic", "rollback"),
    "gpu-fault": ("deploy", "traffic", "gpu-fault"),
}


@dataclass(frozen=True)
class TourTiming:
    """The tour's clock at `speed` (1 = the paced tour; 10 = CI)."""

    speed: float
    autoscale_interval: int
    warmup: float
    ramp: float
    pause_seconds: int
    analysis_interval: int
    analysis_window: int
    base_rate: float = 1.0
    peak_rate: float = 7.0
    requests_per_replica: float = 1.5

    @classmethod
    def for_speed(cls, speed: float) -> "TourTiming":
        speed = max(0.1, float(speed))
        interval = max(5, round(15 / speed))
        analysis_interval = max(5, round(20 / speed))
        return cls(
            speed=speed,
            autoscale_interval=interval,
            # At least six autoscaling ticks on the ramp: with Prometheus the request rate is a 60 s
            # rate(), so the reactive signals (queue, TTFT) carry the scale-out on a short ramp.
            warmup=max(1.0 * interval, 40.0 / speed),
            ramp=max(6.0 * interval, 100.0 / speed),
            pause_seconds=max(2, round(20 / speed)),
            analysis_interval=analysis_interval,
            analysis_window=max(10, 2 * analysis_interval),
        )

    @property
    def step_timeout(self) -> float:
        # Generous: a loaded CI machine is slower than the schedule, never faster.
        return max(60.0, 12.0 * self.analysis_interval + 4.0 * self.pause_seconds)


def tour_worker(body: dict[str, Any], timing: TourTiming) -> dict[str, Any]:
    """The manifest with the tour's settings: one replica to start, Auto scaling, a short canary."""
    body = copy.deepcopy(body)
    spec = body["spec"]
    spec["replicas"] = 1
    # A small batch per replica: a replica saturates at a few requests/s of the trace, so the ramp
    # visibly queues and the reactive signals (queue, TTFT) join the request rate.
    spec["runtime"]["maxRunningRequests"] = 4
    spec["autoscaling"] = {
        "mode": "Auto", "minReplicas": 1, "maxReplicas": 6, "intervalSeconds": timing.autoscale_interval,
        "targetRequestsPerReplica": timing.requests_per_replica, "slo": {"ttftP95Seconds": 1.0},
        "reactive": {"queueLengthPerReplica": 2},
        # Scale-down waits longer than the tour: replicas only go up during the story.
        "scaleDown": {"stabilizationSeconds": 3600},
    }
    spec["rollout"] = {
        "strategy": "Canary",
        "canary": {"steps": [{"setWeight": 25}, {"pause": {"duration": f"{timing.pause_seconds}s"}},
                             {"analysis": {}}, {"setWeight": 100}], "maxSurge": 1},
        # Each verdict needs two runs: two successful ones to promote, two failed in a row to
        # abort. The canaries are judged on a few dozen requests near saturation (5-20 at --speed
        # 10), where p95 TTFT is about the 4th-highest of ~75 and one SGLang histogram bucket
        # (0.2-0.4 s vs 0.4-0.6 s) already reads as 1.5x the stable's: a paced tour aborted its
        # healthy canary at 1.54x, hence also the 2x latency ratios. The bad version fails every
        # request, but SGLang's metrics show only the non-streaming half: it shows no error in 5
        # requests one time in 32, so a single run could promote it; its error rate fails on
        # nearly every run.
        "analysis": {"intervalSeconds": timing.analysis_interval, "windowSeconds": timing.analysis_window,
                     "minRequests": 5, "successfulRuns": 2, "failureLimit": 2, "inconclusiveLimit": 6,
                     "maxErrorRate": 0.05, "maxTTFTP95Ratio": 2.0, "maxITLP95Ratio": 2.0},
    }
    return body


@dataclass
class StepResult:
    name: str
    title: str
    ok: bool = False
    skipped: bool = False
    interrupted: bool = False  # Ctrl-C, SIGTERM or --duration stopped the tour during this step
    started: float = 0.0  # seconds since the tour started
    finished: float = 0.0
    detail: str = ""
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass
class TourMarker:
    at: float
    label: str
    kind: str  # "step", "event" (a Kubernetes Event) or "note"


class Recorder:
    """Samples the worker's status and the load every `period` seconds; collects new Events."""

    def __init__(self, kube, namespace: str, name: str, started: float, *, period: float = 1.0) -> None:
        self.kube, self.namespace, self.name = kube, namespace, name
        self.started = started
        self.period = period
        self.samples: list[dict[str, Any]] = []
        self.markers: list[TourMarker] = []
        self.events: list[dict[str, Any]] = []
        self.loadgen = None
        self.on_event: Callable[[dict[str, Any]], None] | None = None
        self._seen_events: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def now(self) -> float:
        return time.time() - self.started

    def mark(self, label: str, kind: str = "note") -> None:
        with self._lock:
            self.markers.append(TourMarker(round(self.now(), 2), label, kind))

    def latest(self) -> dict[str, Any]:
        with self._lock:
            return dict(self.samples[-1]) if self.samples else {}

    def sample_once(self) -> dict[str, Any]:
        body = self.kube.get(api.API_VERSION, api.PLURAL, self.namespace, self.name) or {}
        spec, status = body.get("spec") or {}, body.get("status") or {}
        autoscaling = status.get("autoscaling") or {}
        forecast = autoscaling.get("forecast") or {}
        rollout = status.get("rollout") or {}
        sample: dict[str, Any] = {
            "t": round(self.now(), 2),
            "phase": status.get("phase"),
            "replicas": spec.get("replicas"),
            "desired": autoscaling.get("desiredReplicas"),
            "ready": status.get("readyReplicas"),
            "decision": autoscaling.get("action"),
            "reason": autoscaling.get("reason"),
            "forecast": forecast.get("value"),
            "forecast_lower": forecast.get("lower"),
            "forecast_upper": forecast.get("upper"),
            "stable_revision": status.get("stableRevision") or status.get("currentRevision"),
            "current_revision": status.get("currentRevision"),
            "rollout_phase": rollout.get("phase"),
            "rollout_revision": rollout.get("revision"),
            "canary_weight": rollout.get("weight") if rollout.get("phase") in ("Progressing", "Paused") else
            (100 if rollout.get("phase") == "Completed" else 0) if rollout else None,
            "rollout_message": rollout.get("message"),
        }
        if self.loadgen is not None:
            window = self.loadgen.window(5.0)
            sample.update(offered_rate=round(window["offered_rate"], 3), rate=round(window["rate"], 3),
                          error_rate=window["error_rate"], by_revision=window["by_revision"])
            slow = self.loadgen.window(10.0)
            sample["ttft_p95"] = slow["ttft_p95"]
        with self._lock:
            self.samples.append(sample)
        self._collect_events()
        return sample

    def _collect_events(self) -> None:
        for event in self.kube.list("v1", "events", self.namespace):
            uid = event["metadata"].get("uid") or event["metadata"]["name"]
            if uid in self._seen_events or (event.get("involvedObject") or {}).get("name") != self.name:
                continue
            self._seen_events.add(uid)
            record = {"t": round(self.now(), 2), "type": event.get("type"), "reason": event.get("reason"),
                      "message": event.get("message"), "timestamp": event.get("lastTimestamp")}
            with self._lock:
                self.events.append(record)
                self.markers.append(TourMarker(record["t"], record["reason"] or "", "event"))
            if self.on_event is not None:
                self.on_event(record)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.sample_once()
            except Exception:  # the API restarting or going away at the end: keep what we have
                pass

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tour-recorder", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)


class Tour:
    """Runs the scenario's steps against a running dev stack; see the module docstring."""

    def __init__(self, *, kube, runtime, body: dict[str, Any], timing: TourTiming, narrate: Callable[[str], None],
                 prometheus_url: str | None, gpu_faults=None, gpu_unavailable: str = "", trace=None,
                 log_events: bool = True) -> None:
        from digital_worker.operator.loadgen import default_trace

        self.kube, self.runtime, self.timing, self.narrate = kube, runtime, timing, narrate
        self.body = tour_worker(body, timing)
        self.namespace = self.body["metadata"].setdefault("namespace", "default")
        self.name = self.body["metadata"]["name"]
        self.model = self.body["spec"]["model"]["name"]
        self.prometheus_url = prometheus_url
        self.gpu_faults = gpu_faults  # simulated node agents (operator/simnodes.py), when available
        self.gpu_unavailable = gpu_unavailable or "no simulated node agents, so no GPU can fail"
        self.trace = trace or default_trace()
        self.started = time.time()
        self.recorder = Recorder(kube, self.namespace, self.name, self.started)
        if log_events:
            self.recorder.on_event = lambda e: self.narrate(
                f"  event {e['type']}/{e['reason']}: {(e['message'] or '')[:160]}")
        self.loadgen = None
        self.results: list[StepResult] = []
        self.interrupted = False
        self.final_state: dict[str, Any] = {}
        self.current_step = ""

    # -- helpers -----------------------------------------------------------------------------------
    def now(self) -> float:
        return time.time() - self.started

    def worker(self) -> dict[str, Any]:
        return self.kube.get(api.API_VERSION, api.PLURAL, self.namespace, self.name) or {}

    def status(self) -> dict[str, Any]:
        return self.worker().get("status") or {}

    def wait(self, predicate: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(interval)
        return None

    def revision_for(self, **model_changes: Any) -> str:
        from digital_worker.operator import render, spec as dw_spec

        spec = copy.deepcopy(self.worker().get("spec") or self.body["spec"])
        spec["model"].update(model_changes)
        return render.revision_hash(dw_spec.normalize_spec(spec)[0])

    def ensure_load(self, profile) -> None:
        from digital_worker.operator.loadgen import LoadGenerator

        if self.loadgen is None:
            # From request 1000 on: the trace's first minutes are much sparser than its mean.
            # Half the requests stream (a chat UI), half do not (an agent's tool-calling steps): a
            # failure SGLang's metrics can show is a non-streaming one (see step_rollback).
            self.loadgen = LoadGenerator(self.kube, self.namespace, self.name, self.model, self.trace, profile,
                                         start_index=1000 if len(self.trace.requests) > 2000 else 0,
                                         stream_share=TOUR_STREAM_SHARE)
            self.recorder.loadgen = self.loadgen
            self.loadgen.start()
        else:
            self.loadgen.set_profile(profile)

    def watch_rollout(self, revision: str, until: set[str], timeout: float) -> dict[str, Any]:
        """Narrate the rollout's step changes until its phase is in `until`; the last status."""
        deadline = time.monotonic() + timeout
        last_message, rollout = None, {}
        while time.monotonic() < deadline:
            rollout = self.status().get("rollout") or {}
            if rollout.get("revision") == revision:
                message = f"step {rollout.get('step')}: {rollout.get('phase')}, weight {rollout.get('weight')}%"
                if message != last_message:
                    self.narrate(f"  rollout {message} ({rollout.get('message', '')[:120]})")
                    last_message = message
                if rollout.get("phase") in until:
                    return rollout
            time.sleep(0.5)
        return rollout

    # -- the run -----------------------------------------------------------------------------------
    def run(self, steps: tuple[str, ...]) -> list[StepResult]:
        self.recorder.start()
        try:
            for name in steps:
                self.current_step = STEP_TITLES[name]
                result = StepResult(name, STEP_TITLES[name], started=round(self.now(), 2))
                self.recorder.mark(name, "step")
                self.narrate(f"[bold]▶ {result.title}[/]")
                try:
                    getattr(self, "step_" + name.replace("-", "_"))(result)
                except KeyboardInterrupt:
                    self.interrupted = result.interrupted = True
                    result.detail = "interrupted"
                    result.finished = round(self.now(), 2)
                    self.results.append(result)
                    break
                except Exception as exc:  # a broken step is reported, and the tour stops there
                    result.ok, result.detail = False, f"{type(exc).__name__}: {exc}"
                result.finished = round(self.now(), 2)
                self.results.append(result)
                self.narrate(f"  {verdict(result)} in {result.finished - result.started:.1f}s: {result.detail}")
                if not result.ok and not result.skipped:
                    break
        except KeyboardInterrupt:
            self.interrupted = True
        finally:
            if self.loadgen is not None:
                self.loadgen.stop()
            try:
                self.recorder.sample_once()
                self.final_state = self.capture_state()
            except Exception:
                pass
            self.recorder.stop()
        return self.results

    def capture_state(self) -> dict[str, Any]:
        """The cluster as the tour leaves it: the worker's status, its Deployments and pods, node taints."""
        return {
            "status": self.status(),
            "spec_replicas": (self.worker().get("spec") or {}).get("replicas"),
            "deployments": {revision: {"replicas": (d.get("spec") or {}).get("replicas"),
                                       "ready": (d.get("status") or {}).get("readyReplicas", 0)}
                            for revision, d in self._deployments().items()},
            "pods": sorted(p["metadata"]["name"] for p in self._pods()),
            "node_taints": {n["metadata"]["name"]: [t.get("key") for t in (n.get("spec") or {}).get("taints") or []]
                            for n in self.kube.list("v1", "nodes")},
        }

    def step_deploy(self, result: StepResult) -> None:
        from digital_worker.operator.dev import apply_worker

        apply_worker(self.kube, self.body)
        self.narrate(f"  applied DigitalWorker {self.namespace}/{self.name} (model {self.model}, 1 replica, "
                     f"autoscaling Auto every {self.timing.autoscale_interval}s, canary 25% → analysis → 100%)")
        status = self.wait(lambda: (s := self.status()).get("phase") in ("Ready", "Degraded") and s, 60)
        if not status:
            result.detail = f"not Ready within 60s: {self.status().get('message')}"
            return
        result.ok = status["phase"] == "Ready"
        result.facts = {"revision": status.get("currentRevision"), "phase": status["phase"]}
        result.detail = f"{status['phase']}: revision {status.get('currentRevision')}, {status.get('message', '')}"

    def step_traffic(self, result: StepResult) -> None:
        from digital_worker.operator.loadgen import RateProfile

        rate = self.timing.peak_rate / 2
        self.ensure_load(RateProfile(((0.0, rate),)))
        self.narrate(f"  replaying {self.trace.source} at {rate:g} req/s")
        answered = self.wait(lambda: self.loadgen.window(5.0)["rate"] > 0.3 * rate, 30)
        result.ok = bool(answered)
        result.detail = f"{self.loadgen.window(5.0)['rate']:.1f} req/s answered"

    def step_ramp(self, result: StepResult) -> None:
        from digital_worker.operator.loadgen import RateProfile

        timing = self.timing
        start = self.loadgen.elapsed() if self.loadgen is not None else 0.0
        profile = RateProfile.ramp(base=timing.base_rate, peak=timing.peak_rate, warmup=start + timing.warmup,
                                   ramp=timing.ramp)
        self.ensure_load(profile)
        peak_at = self.now() + timing.warmup + timing.ramp
        initial = int(self.worker()["spec"]["replicas"])
        self.narrate(f"  replaying {self.trace.source}: {timing.base_rate:g} req/s for {timing.warmup:.0f}s, then "
                     f"up to {timing.peak_rate:g} req/s over {timing.ramp:.0f}s (peak at t={peak_at:.0f}s)")
        scaled_at, replicas = None, initial
        while self.now() < peak_at:
            body = self.worker()
            current = int(body["spec"]["replicas"])
            if current != replicas:
                reason = ((body.get("status") or {}).get("autoscaling") or {}).get("reason", "")
                self.narrate(f"  autoscaler: replicas {replicas} → {current} at t={self.now():.0f}s "
                             f"(offered {self.loadgen.window(5.0)['offered_rate']:.1f} req/s): {reason[:140]}")
                if current > replicas and scaled_at is None:
                    scaled_at = self.now()
                replicas = current
            time.sleep(0.5)
        ready = self.wait(lambda: (s := self.status()).get("readyReplicas", 0) >= int(self.worker()["spec"]["replicas"])
                          and s, 30)
        result.facts = {"initial_replicas": initial, "replicas": replicas, "scaled_out_at": scaled_at,
                        "peak_at": round(peak_at, 2), "ready": (ready or {}).get("readyReplicas")}
        result.ok = scaled_at is not None and scaled_at <= peak_at and replicas > initial
        result.detail = (f"scaled {initial} → {replicas} replicas; first scale-out at t={scaled_at:.0f}s, "
                         f"{peak_at - scaled_at:.0f}s before the peak" if scaled_at is not None else
                         f"no scale-out by the peak (replicas {replicas})")

    def step_canary(self, result: StepResult) -> None:
        old = self.status().get("currentRevision")
        model_revision = "v2"
        new = self.revision_for(revision=model_revision)
        self.narrate(f"  new model version: spec.model.revision → {model_revision} (revision {new}, stable {old})")
        self.kube.patch(api.API_VERSION, api.PLURAL, self.namespace, self.name,
                        {"spec": {"model": {"revision": model_revision}}})
        rollout = self.watch_rollout(new, {"Completed", "Aborted", "Paused"}, self.timing.step_timeout)
        result.facts = {"revision": new, "previous": old, "phase": rollout.get("phase")}
        result.ok = rollout.get("phase") == "Completed"
        result.detail = f"canary {new}: {rollout.get('phase')}: {rollout.get('message', '')}"
        if result.ok:
            self.wait(lambda: self.status().get("stableRevision", self.status().get("currentRevision")) == new
                      and len(self._deployments()) == 1, 30)

    def step_rollback(self, result: StepResult) -> None:
        stable = self.status().get("currentRevision")
        model_revision = "v3-bad"
        bad = self.revision_for(revision=model_revision)
        # Every request fails. SGLang shows only the non-streaming half (HTTP 500): a stream has
        # answered 200 before its scheduler fails it, and carries an SSE error event no metric counts.
        self.runtime.inject(bad, error_rate=1.0)
        self.narrate(f"  bad version: spec.model.revision → {model_revision} (revision {bad}); its simulated "
                     f"replicas fail every request: HTTP 500 when not streaming, an SSE error event in a "
                     f"200 stream when streaming (which no SGLang metric counts)")
        self.kube.patch(api.API_VERSION, api.PLURAL, self.namespace, self.name,
                        {"spec": {"model": {"revision": model_revision}}})
        rollout = self.watch_rollout(bad, {"Completed", "Aborted", "Paused"}, self.timing.step_timeout)
        aborted = rollout.get("phase") == "Aborted"
        drained = self.wait(lambda: int(((self._deployments().get(bad) or {}).get("spec") or {}).get("replicas", 0)) == 0,
                            30) if aborted else False
        result.facts = {"revision": bad, "stable": stable, "phase": rollout.get("phase"),
                        "abort_reason": rollout.get("abortReason"), "bad_scaled_to_zero": bool(drained)}
        result.ok = aborted and bool(drained)
        result.detail = (f"canary {bad} {rollout.get('phase')}: {rollout.get('abortReason', rollout.get('message', ''))}"
                         f"; stable {stable} serves all traffic" if aborted else
                         f"canary {bad} not aborted: {rollout.get('phase')} {rollout.get('message', '')}")

    def step_gpu_fault(self, result: StepResult) -> None:
        if self.gpu_faults is None:
            result.skipped, result.ok = True, True
            result.detail = f"not available: {self.gpu_unavailable}"
            return
        status = self.status()
        stable = status.get("stableRevision") or status.get("currentRevision")
        ready = {p["metadata"]["name"] for p in self._pods()
                 if pods.is_ready(p) and p["metadata"]["labels"].get(api.LABEL_REVISION) == stable}
        holding = sorted(pod for (namespace, pod) in self.gpu_faults.gpu_assignments()
                         if namespace == self.namespace and pod in ready)
        if not holding:
            result.detail = "no ready replica holds a simulated GPU"
            return
        fault = self.gpu_faults.inject_gpu_fault(f"{self.namespace}/{holding[0]}", xid=79)
        name, node = holding[0], fault.node
        self.narrate(f"  GPU fault: XID 79 (fallen off the bus) on {node} GPU {fault.gpu} ({fault.uuid}), "
                     f"held by replica {name}")
        gone = self.wait(lambda: name not in {p["metadata"]["name"] for p in self._pods()}, self.timing.step_timeout)
        if not gone:
            result.detail = f"replica {name} was not replaced within {self.timing.step_timeout:.0f}s"
            return
        self.narrate(f"  replica {name} deleted by the operator; the Deployment starts a new one")
        deployment = lambda: self._deployments().get(stable) or {}  # noqa: E731
        back = self.wait(lambda: int((deployment().get("status") or {}).get("readyReplicas", 0) or 0) >=
                         int((deployment().get("spec") or {}).get("replicas", 1)), 60)
        replicas = int((deployment().get("spec") or {}).get("replicas", 0))
        health = self.status().get("gpuHealth") or {}
        node_taints = [t.get("key") for t in ((self.kube.get("v1", "nodes", None, node) or {}).get("spec") or {})
                       .get("taints") or []] if node else []
        result.facts = {"pod": name, "node": node, "replaced": True, "gpuHealth": health, "node_taints": node_taints}
        result.ok = bool(back)
        result.detail = (f"replica {name} replaced; {replicas} ready again on revision {stable}; node {node} taints: "
                         f"{', '.join(node_taints) or 'none'}")

    def _deployments(self) -> dict[str, dict[str, Any]]:
        return {d["metadata"]["labels"].get(api.LABEL_REVISION, ""): d
                for d in self.kube.list("apps/v1", "deployments", self.namespace, f"{api.LABEL_INSTANCE}={self.name}")}

    def _pods(self) -> list[dict[str, Any]]:
        return [p for p in self.kube.list("v1", "pods", self.namespace, f"{api.LABEL_INSTANCE}={self.name}")
                if not p["metadata"].get("deletionTimestamp")]

    def dump(self) -> dict[str, Any]:
        """Everything the report needs, JSON-ready."""
        return {
            "started": self.started,
            "speed": self.timing.speed,
            "timing": asdict(self.timing),
            "worker": f"{self.namespace}/{self.name}",
            "trace": self.trace.source,
            "prometheus": self.prometheus_url,
            "interrupted": self.interrupted,
            "steps": [asdict(r) for r in self.results],
            "samples": list(self.recorder.samples),
            "markers": [asdict(m) for m in self.recorder.markers],
            "events": list(self.recorder.events),
            "requests": _request_totals(self.loadgen),
            "final_state": self.final_state,
        }


def verdict(result: StepResult) -> str:
    return "interrupted" if result.interrupted else "skipped" if result.skipped else "ok" if result.ok else "FAILED"


def _request_totals(loadgen) -> dict[str, Any]:
    if loadgen is None:
        return {}
    records = loadgen.snapshot()
    by_revision: dict[str, dict[str, int]] = {}
    for record in records:
        counts = by_revision.setdefault(record.revision,
                                        {"ok": 0, "error": 0, "http_5xx": 0, "stream_error": 0, "broken": 0})
        counts["ok" if record.ok else "error"] += 1
        if not record.ok:
            kind = "http_5xx" if record.status >= 500 else "stream_error" if record.stream_error else "broken"
            counts[kind] += 1
    from digital_worker.operator.loadgen import percentile

    return {"sent": len(records), "dropped": loadgen.dropped, "errors": sum(not r.ok for r in records),
            "ttft_p95": percentile([r.ttft for r in records if r.ttft is not None], 0.95),
            "by_revision": by_revision}
