"""`spec.autoscaling` of a DigitalWorker as a frozen dataclass, with our defaults for what is missing.

The dataclass defaults below are the only place the defaults are written: `parse_spec` fills in
missing keys from them, and the CRD schema (`operator/schema.py`) declares them as its `default`s, so
a spec the API server defaulted and one read raw (the emulator applies no defaults) mean the same.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

MODES = ("Off", "DryRun", "Auto")
SEASONALITIES = ("auto", "none", "daily", "weekly")


class SpecError(ValueError):
    """A value in spec.autoscaling that cannot be used; the message names the field."""


@dataclass(frozen=True)
class ForecastSpec:
    quantile: float = 0.9
    horizon_seconds: float | None = None  # None: the provisioning lead time (cold start + one tick)
    seasonality: str = "auto"
    refit_interval_seconds: float = 6 * 3600.0


@dataclass(frozen=True)
class ReactiveSpec:
    queue_length_per_replica: float = 8.0
    kv_cache_usage: float = 0.9
    ttft_p95_seconds: float | None = None  # None: the SLO's TTFT target


@dataclass(frozen=True)
class ScaleDownSpec:
    stabilization_seconds: float = 300.0
    max_step_replicas: int = 2


@dataclass(frozen=True)
class AutoscalingSpec:
    mode: str = "Off"
    min_replicas: int = 1
    max_replicas: int = 8
    scale_to_zero: bool = False
    slo_ttft_p95_seconds: float = 2.0
    slo_itl_p95_seconds: float | None = None
    target_requests_per_replica: float = 4.0
    # Tokens/s one replica prefills / generates within the SLO; None: from the first request mix seen.
    target_prompt_tokens_per_replica: float | None = None
    target_generation_tokens_per_replica: float | None = None
    forecast: ForecastSpec = field(default_factory=ForecastSpec)
    reactive: ReactiveSpec = field(default_factory=ReactiveSpec)
    scale_down: ScaleDownSpec = field(default_factory=ScaleDownSpec)
    cold_start_seconds: float | None = None  # None: learned from readiness history
    interval_seconds: float = 20.0

    @property
    def reactive_ttft_seconds(self) -> float:
        return self.reactive.ttft_p95_seconds or self.slo_ttft_p95_seconds

    @property
    def floor_replicas(self) -> int:
        return 0 if self.scale_to_zero else self.min_replicas


def _number(source: Mapping[str, Any], key: str, default, path: str, low=None, high=None):
    value = source.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(f"{path}.{key} must be a number")
    if (low is not None and value < low) or (high is not None and value > high):
        raise SpecError(f"{path}.{key} must be between {low} and {high}")
    return value


DEFAULTS = AutoscalingSpec()


def parse_spec(raw: Mapping[str, Any] | None) -> AutoscalingSpec:
    """Read spec.autoscaling (camelCase keys, as in the CRD) into an `AutoscalingSpec`."""
    raw = dict(raw or {})
    path = "spec.autoscaling"
    mode = raw.get("mode", DEFAULTS.mode)
    if mode not in MODES:
        raise SpecError(f"{path}.mode must be one of {', '.join(MODES)}")
    min_replicas = int(_number(raw, "minReplicas", DEFAULTS.min_replicas, path, 0))
    max_replicas = int(_number(raw, "maxReplicas", DEFAULTS.max_replicas, path, 0))
    if max_replicas < min_replicas:
        raise SpecError(f"{path}.maxReplicas must be at least minReplicas")
    slo = dict(raw.get("slo") or {})
    forecast_raw = dict(raw.get("forecast") or {})
    seasonality = forecast_raw.get("seasonality", DEFAULTS.forecast.seasonality)
    if seasonality not in SEASONALITIES:
        raise SpecError(f"{path}.forecast.seasonality must be one of {', '.join(SEASONALITIES)}")
    reactive_raw = dict(raw.get("reactive") or {})
    down_raw = dict(raw.get("scaleDown") or {})
    forecast_path, reactive_path, down_path = f"{path}.forecast", f"{path}.reactive", f"{path}.scaleDown"
    return AutoscalingSpec(
        mode=mode,
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        scale_to_zero=bool(raw.get("scaleToZero", DEFAULTS.scale_to_zero)),
        slo_ttft_p95_seconds=float(_number(slo, "ttftP95Seconds", DEFAULTS.slo_ttft_p95_seconds, f"{path}.slo", 0.001)),
        slo_itl_p95_seconds=_number(slo, "itlP95Seconds", DEFAULTS.slo_itl_p95_seconds, f"{path}.slo", 0.0),
        target_requests_per_replica=float(
            _number(raw, "targetRequestsPerReplica", DEFAULTS.target_requests_per_replica, path, 1e-6)),
        target_prompt_tokens_per_replica=_number(
            raw, "targetPromptTokensPerReplica", DEFAULTS.target_prompt_tokens_per_replica, path, 1e-6),
        target_generation_tokens_per_replica=_number(
            raw, "targetGenerationTokensPerReplica", DEFAULTS.target_generation_tokens_per_replica, path, 1e-6),
        forecast=ForecastSpec(
            quantile=float(_number(forecast_raw, "quantile", DEFAULTS.forecast.quantile, forecast_path, 0.5, 0.999)),
            horizon_seconds=_number(
                forecast_raw, "horizonSeconds", DEFAULTS.forecast.horizon_seconds, forecast_path, 0.0),
            seasonality=seasonality,
            refit_interval_seconds=float(_number(
                forecast_raw, "refitIntervalSeconds", DEFAULTS.forecast.refit_interval_seconds, forecast_path, 1.0)),
        ),
        reactive=ReactiveSpec(
            queue_length_per_replica=float(_number(
                reactive_raw, "queueLengthPerReplica", DEFAULTS.reactive.queue_length_per_replica, reactive_path, 0.0)),
            kv_cache_usage=float(
                _number(reactive_raw, "kvCacheUsage", DEFAULTS.reactive.kv_cache_usage, reactive_path, 0.0, 1.0)),
            ttft_p95_seconds=_number(
                reactive_raw, "ttftP95Seconds", DEFAULTS.reactive.ttft_p95_seconds, reactive_path, 0.0),
        ),
        scale_down=ScaleDownSpec(
            stabilization_seconds=float(_number(
                down_raw, "stabilizationSeconds", DEFAULTS.scale_down.stabilization_seconds, down_path, 0.0)),
            max_step_replicas=int(
                _number(down_raw, "maxStepReplicas", DEFAULTS.scale_down.max_step_replicas, down_path, 1)),
        ),
        cold_start_seconds=_number(raw, "coldStartSeconds", DEFAULTS.cold_start_seconds, path, 0.0),
        interval_seconds=float(_number(raw, "intervalSeconds", DEFAULTS.interval_seconds, path, 1.0)),
    )
