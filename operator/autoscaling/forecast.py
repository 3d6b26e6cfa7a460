"""Demand forecasting: statsmodels fits, cheap incremental forecasts, empirical quantile bands.

The expensive part (`fit_forecaster`, `fit_arima`: statsmodels' optimisers, ~0.1-1 s) runs on a
schedule in a worker thread. Its result is a frozen `FittedModel`: the smoothing parameters and
the backtest errors per horizon. Every tick, a `ModelState` runs the same recursions over the
buckets that arrived since the last tick (microseconds) and forecasts from there; the upper band is
the point forecast plus the `quantile` of the backtest errors at that horizon (a split-conformal
band: no normality assumption, honest about each model's real error at each horizon).

Models: Holt-Winters with additive damped trend and daily or weekly seasonality (detected from the
autocorrelation at those lags, or forced by spec), a damped Holt trend when the history is too
short for a season, and the last value when it is shorter still. The one with the lowest rolling
backtest error over the provisioning horizon wins. `fit_arima` is the Dynamo-like baseline's ARIMA.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

DAY_SECONDS = 86400.0
WEEK_SECONDS = 7 * DAY_SECONDS
# Past this many buckets the oldest do not improve a fit, only slow it down.
MAX_FIT_BUCKETS = 6048  # three weeks of 5-minute buckets
MIN_BACKTEST_ERRORS = 12
SEASONAL_ACF_THRESHOLD = 0.3


@dataclass(frozen=True)
class FittedModel:
    kind: str  # "holt-winters", "holt", "last-value", "arima"
    bucket_seconds: float
    season_length: int = 0  # in buckets; 0 = no season
    alpha: float = 1.0
    beta: float = 0.0
    gamma: float = 0.0
    phi: float = 1.0
    initial_level: float = 0.0
    initial_trend: float = 0.0
    initial_seasons: tuple[float, ...] = ()
    ar_coefficients: tuple[float, ...] = ()  # ARIMA(p,1,0) on the differences
    error_quantiles: tuple[float, ...] = ()  # [h-1]: quantile of (actual - forecast) at horizon h
    lower_quantiles: tuple[float, ...] = ()  # [h-1]: the mirror (1 - quantile) error quantile
    peak_quantiles: tuple[float, ...] = ()  # [h-1]: quantile of (actual peak - forecast peak) over 1..h
    quantile: float = 0.9
    backtest_mae: float = math.inf
    fit_seconds: float = 0.0
    observations: int = 0

    @property
    def name(self) -> str:
        if self.kind == "holt-winters":
            period = self.season_length * self.bucket_seconds
            label = "weekly" if period >= WEEK_SECONDS else "daily" if period >= DAY_SECONDS else f"{int(period)}s"
            return f"holt-winters-{label}"
        if self.kind == "arima":
            return f"arima({len(self.ar_coefficients)},1,0)"
        return self.kind


@dataclass(frozen=True)
class Forecast:
    """Demand (requests/s) over the next `horizon_seconds`: the peak of each bucket's forecast."""

    horizon_seconds: float
    point: float  # peak point forecast over the horizon
    upper: float  # peak of the upper `quantile` band
    lower: float  # lowest lower band value over the horizon
    quantile: float
    model: str
    path: tuple[float, ...] = field(default=(), compare=False)


class ModelState:
    """The running state of a fitted model: fed bucket by bucket, forecasts any horizon."""

    def __init__(self, model: FittedModel) -> None:
        self.model = model
        self.count = 0
        self.level = model.initial_level
        self.trend = model.initial_trend
        self.seasons = list(model.initial_seasons)
        self.recent: list[float] = []  # the last values, for last-value and ARIMA

    def update(self, value: float) -> None:
        model = self.model
        if model.kind in ("holt-winters", "holt"):
            m = model.season_length
            season_old = self.seasons[self.count % m] if m else 0.0
            previous = self.level + model.phi * self.trend
            level = model.alpha * (value - season_old) + (1 - model.alpha) * previous
            self.trend = model.beta * (level - self.level) + (1 - model.beta) * model.phi * self.trend
            if m:
                self.seasons[self.count % m] = model.gamma * (value - previous) + (1 - model.gamma) * season_old
            self.level = level
        self.recent.append(value)
        keep = max(2, len(model.ar_coefficients) + 2)
        if len(self.recent) > keep:
            del self.recent[: len(self.recent) - keep]
        self.count += 1

    def predict(self, horizon: int) -> list[float]:
        model = self.model
        if horizon <= 0:
            return []
        if model.kind in ("holt-winters", "holt"):
            m = model.season_length
            out = []
            damped = 0.0
            for h in range(1, horizon + 1):
                damped += model.phi ** h
                season = self.seasons[(self.count - 1 + h) % m] if m else 0.0
                out.append(self.level + damped * self.trend + season)
            return out
        if model.kind == "arima" and len(self.recent) > len(model.ar_coefficients):
            differences = [b - a for a, b in zip(self.recent[:-1], self.recent[1:])]
            value = self.recent[-1]
            out = []
            for _ in range(horizon):
                step = sum(c * differences[-1 - i] for i, c in enumerate(model.ar_coefficients))
                differences.append(step)
                value += step
                out.append(value)
            return out
        last = self.recent[-1] if self.recent else model.initial_level
        return [last] * horizon

    def forecast(self, horizon_buckets: int, horizon_seconds: float) -> Forecast:
        horizon_buckets = max(1, horizon_buckets)
        path = self.predict(horizon_buckets)
        model = self.model
        lowers = []
        for h, value in enumerate(path, start=1):
            index = min(h, len(model.lower_quantiles)) - 1
            lowers.append(max(0.0, value + (model.lower_quantiles[index] if index >= 0 else 0.0)))
        point = max(0.0, max(path))
        # The band of the peak itself (calibrated on the peaks of the backtest), not the peak of
        # per-bucket bands, which would be a higher quantile than asked for.
        if model.peak_quantiles:
            upper = point + model.peak_quantiles[min(horizon_buckets, len(model.peak_quantiles)) - 1]
        else:
            index = min(horizon_buckets, len(model.error_quantiles)) - 1
            upper = point + (model.error_quantiles[index] if index >= 0 else 0.0)
        return Forecast(
            horizon_seconds=horizon_seconds,
            point=point,
            upper=max(0.0, upper, point),
            lower=min(lowers),
            quantile=model.quantile,
            model=model.name,
            path=tuple(max(0.0, v) for v in path),
        )


# ---------------------------------------------------------------------------------------------
# Fitting (slow; run in a worker thread)


def _autocorrelation(values: np.ndarray, lag: int) -> float:
    if lag <= 0 or len(values) <= lag + 1:
        return 0.0
    centred = values - values.mean()
    denominator = float(np.dot(centred, centred))
    if denominator <= 0:
        return 0.0
    return float(np.dot(centred[:-lag], centred[lag:]) / denominator)


def detect_seasonality(values, bucket_seconds: float, mode: str = "auto") -> int:
    """Season length in buckets (0: none) for `mode` auto|none|daily|weekly.

    auto picks weekly when the weekly autocorrelation is clearly above the daily one (weekends
    differ), else daily, provided the series holds two full periods and correlates at that lag.
    """
    values = np.asarray(values, dtype=float)
    daily = int(round(DAY_SECONDS / bucket_seconds))
    weekly = int(round(WEEK_SECONDS / bucket_seconds))
    if mode == "none" or daily < 2:
        return 0
    if mode == "daily":
        return daily if len(values) >= 2 * daily else 0
    if mode == "weekly":
        if len(values) >= 2 * weekly:
            return weekly
        return daily if len(values) >= 2 * daily else 0
    daily_acf = _autocorrelation(values, daily) if len(values) >= 2 * daily else 0.0
    weekly_acf = _autocorrelation(values, weekly) if len(values) >= 2 * weekly else 0.0
    if weekly_acf >= SEASONAL_ACF_THRESHOLD and weekly_acf > daily_acf + 0.1:
        return weekly
    if daily_acf >= SEASONAL_ACF_THRESHOLD:
        return daily
    return 0


def _backtest(model: FittedModel, values: np.ndarray, horizon: int, start: int):
    """Run the model over `values`; from origin `start - 1` on, keep each origin's forecast path.

    Returns (errors per horizon, peak errors per horizon, final state): errors[h-1] are
    actual - forecast at h buckets ahead; peaks[h-1] are max(actual 1..h) - max(forecast 1..h).
    """
    state = ModelState(model)
    paths: dict[int, list[float]] = {}
    for index, value in enumerate(values):
        state.update(float(value))
        if start - 1 <= index < len(values) - 1:
            paths[index] = state.predict(horizon)
    errors: list[list[float]] = [[] for _ in range(horizon)]
    peaks: list[list[float]] = [[] for _ in range(horizon)]
    for origin, path in paths.items():
        actual = values[origin + 1: origin + 1 + horizon]
        actual_peak = -math.inf
        predicted_peak = -math.inf
        for h in range(len(actual)):
            errors[h].append(float(actual[h]) - path[h])
            actual_peak = max(actual_peak, float(actual[h]))
            predicted_peak = max(predicted_peak, path[h])
            peaks[h].append(actual_peak - predicted_peak)
    return errors, peaks, state


def _with_errors(model: FittedModel, values: np.ndarray, horizon: int, quantile: float, started: float) -> FittedModel:
    backtest_length = max(MIN_BACKTEST_ERRORS + horizon, min(len(values) // 4, int(3 * DAY_SECONDS / model.bucket_seconds)))
    start = max(1, len(values) - backtest_length)
    errors, peak_errors, _ = _backtest(model, values, horizon, start)
    uppers, lowers, peaks, maes = [], [], [], []
    spread = float(np.std(values)) if len(values) > 1 else 0.0
    for per_horizon, per_peak in zip(errors, peak_errors):
        if len(per_horizon) >= 3:
            array = np.asarray(per_horizon)
            uppers.append(float(np.quantile(array, quantile)))
            lowers.append(float(np.quantile(array, 1 - quantile)))
            peaks.append(float(np.quantile(np.asarray(per_peak), quantile)))
            maes.append(float(np.mean(np.abs(array))))
        else:  # too short to measure: a wide band from the series' own spread
            uppers.append(spread)
            lowers.append(-spread)
            peaks.append(spread)
            maes.append(math.inf)
    mae = float(np.mean(maes)) if maes else math.inf
    return _replace(model, error_quantiles=tuple(uppers), lower_quantiles=tuple(lowers), peak_quantiles=tuple(peaks),
                    backtest_mae=mae,
                    quantile=quantile, fit_seconds=time.perf_counter() - started, observations=len(values))


def _replace(model: FittedModel, **changes) -> FittedModel:
    from dataclasses import replace

    return replace(model, **changes)


def _fit_exponential_smoothing(values: np.ndarray, bucket_seconds: float, season_length: int) -> FittedModel:
    from statsmodels.tsa.holtwinters import ExponentialSmoothing

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter on flat or short series
        if season_length:
            fitted = ExponentialSmoothing(
                values, trend="add", damped_trend=True, seasonal="add", seasonal_periods=season_length,
                initialization_method="heuristic",
            ).fit()
        else:
            # Floor on the level's smoothing: on a short noisy history the optimiser likes a level
            # that never moves, and a forecaster that ignores a shift in demand is worse than none.
            fitted = ExponentialSmoothing(
                values, trend="add", damped_trend=True, initialization_method="estimated",
                bounds={"smoothing_level": (0.2, 1.0)},
            ).fit()
    params = fitted.params

    def number(key: str, default: float) -> float:
        value = params.get(key, default)
        return default if value is None or not np.isfinite(value) else float(value)

    return FittedModel(
        kind="holt-winters" if season_length else "holt",
        bucket_seconds=bucket_seconds,
        season_length=season_length,
        alpha=number("smoothing_level", 0.5),
        beta=number("smoothing_trend", 0.0),
        gamma=number("smoothing_seasonal", 0.0) if season_length else 0.0,
        phi=number("damping_trend", 0.98),
        initial_level=number("initial_level", float(values[0])),
        initial_trend=number("initial_trend", 0.0),
        initial_seasons=tuple(float(v) for v in np.asarray(params.get("initial_seasons", ()))) if season_length else (),
    )


def fit_forecaster(
    values,
    bucket_seconds: float,
    quantile: float = 0.9,
    horizon_buckets: int = 2,
    seasonality: str = "auto",
) -> FittedModel:
    """Fit the candidate models to a demand series (one value per bucket, oldest first), keep the best.

    Slow (statsmodels optimisers): call it from a worker thread.
    """
    started = time.perf_counter()
    values = np.asarray(values, dtype=float)
    values = np.nan_to_num(values[-MAX_FIT_BUCKETS:], nan=0.0)
    horizon_buckets = max(1, int(horizon_buckets))
    if len(values) < 12:
        model = FittedModel(kind="last-value", bucket_seconds=bucket_seconds,
                            initial_level=float(values[-1]) if len(values) else 0.0)
        return _with_errors(model, values, horizon_buckets, quantile, started) if len(values) > 3 else _replace(
            model, error_quantiles=(float(np.std(values)) if len(values) > 1 else 0.0,) * horizon_buckets,
            peak_quantiles=(float(np.std(values)) if len(values) > 1 else 0.0,) * horizon_buckets,
            lower_quantiles=(0.0,) * horizon_buckets, quantile=quantile, observations=len(values))
    candidates: list[FittedModel] = [FittedModel(kind="last-value", bucket_seconds=bucket_seconds)]
    season_length = detect_seasonality(values, bucket_seconds, seasonality)
    if season_length:
        candidates.append(_fit_exponential_smoothing(values, bucket_seconds, season_length))
    try:
        candidates.append(_fit_exponential_smoothing(values, bucket_seconds, 0))
    except Exception:  # a degenerate series (all zeros): the last value will do
        pass
    scored = [_with_errors(candidate, values, horizon_buckets, quantile, started) for candidate in candidates]
    best = min(scored, key=lambda model: model.backtest_mae)
    if len(values) < 2 * DAY_SECONDS / bucket_seconds and best.kind != "last-value":
        # Young history: a fitted trend has been checked against little data, so its band is
        # never allowed to be narrower than the naive model's (whose errors are just the changes).
        naive = scored[0]
        best = _replace(
            best,
            error_quantiles=tuple(max(a, b) for a, b in zip(best.error_quantiles, naive.error_quantiles)),
            peak_quantiles=tuple(max(a, b) for a, b in zip(best.peak_quantiles, naive.peak_quantiles)),
            lower_quantiles=tuple(min(a, b) for a, b in zip(best.lower_quantiles, naive.lower_quantiles)),
        )
    return _replace(best, fit_seconds=time.perf_counter() - started)


def fit_arima(values, bucket_seconds: float, quantile: float = 0.9, horizon_buckets: int = 2, order: int = 2) -> FittedModel:
    """ARIMA(order,1,0) by statsmodels, as the Dynamo-like planner's load predictor uses ARIMA."""
    from statsmodels.tsa.arima.model import ARIMA

    started = time.perf_counter()
    values = np.nan_to_num(np.asarray(values, dtype=float)[-MAX_FIT_BUCKETS:], nan=0.0)
    if len(values) < 3 * (order + 2):
        model = FittedModel(kind="last-value", bucket_seconds=bucket_seconds)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fitted = ARIMA(values, order=(order, 1, 0), trend="n").fit()
        coefficients = tuple(float(fitted.params[i]) for i in range(order))
        model = FittedModel(kind="arima", bucket_seconds=bucket_seconds, ar_coefficients=coefficients)
    return _with_errors(model, values, max(1, horizon_buckets), quantile, started)


class IncrementalForecaster:
    """Holds one fitted model and its state; fed whole bucket series, processes only the new tail."""

    def __init__(self, model: FittedModel, values) -> None:
        self.model = model
        self.state = ModelState(model)
        self.fed = 0
        self.feed(values)

    def feed(self, values) -> None:
        """`values` is the full series seen so far (the first values are the ones fitted)."""
        for value in list(values)[self.fed:]:
            self.state.update(0.0 if value is None or math.isnan(value) else float(value))
        self.fed = max(self.fed, len(values))

    def append(self, value: float) -> None:
        self.state.update(0.0 if math.isnan(value) else float(value))
        self.fed += 1

    def forecast(self, horizon_seconds: float, seconds_since_last_bucket: float = 0.0) -> Forecast:
        bucket = self.model.bucket_seconds
        horizon_buckets = max(1, math.ceil((horizon_seconds + seconds_since_last_bucket) / bucket))
        return self.state.forecast(horizon_buckets, horizon_seconds)
