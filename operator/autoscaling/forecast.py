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

The upper band has two candidates: the split-conformal band above, and a linear quantile
regression (statsmodels QuantReg) of the horizon's peak on the recent values, their spread and
the same hours a day and a week earlier. The regression can widen the band where spikes come
(busy hours, after a jump) and narrow it elsewhere; the conformal band is one width for all. On
held-out data, the one with the lower pinball loss at `quantile` is used.
"""
from __future__ import annotations

import math
import time
import warnings
from array import array
from dataclasses import dataclass, field

import numpy as np

DAY_SECONDS = 86400.0
WEEK_SECONDS = 7 * DAY_SECONDS
# Past this many buckets the oldest do not improve a fit, only slow it down.
MAX_FIT_BUCKETS = 6048  # three weeks of 5-minute buckets
MIN_BACKTEST_ERRORS = 12
SEASONAL_ACF_THRESHOLD = 0.3
# The recent buckets the upper-band regression reads (an hour of 5-minute buckets).
RECENT_BUCKETS = 12
# Rows the regression is fitted on at most (two weeks of 5-minute buckets): fit time, not accuracy.
MAX_REGRESSION_ROWS = 4032
# Expected exceedances of the upper quantile on the held-out day needed to compare two bands.
MIN_HELD_OUT_EXCEEDANCES = 10


def peak_features(values, t: int, horizon: int, seasonal_lags: tuple[int, ...]) -> list[float]:
    """Regressors for the peak of values[t+1 .. t+horizon], from what is known at t.

    The last three values, the mean, highest value and spread of the last hour, and for each
    seasonal lag (a day, a week) the peak over the same buckets one lag earlier and how far the
    level is from where it was one lag earlier.
    """
    first = max(0, t - RECENT_BUCKETS + 1)
    recent = values[first:t + 1]
    mean = sum(recent) / len(recent)
    spread = math.sqrt(sum((v - mean) ** 2 for v in recent) / len(recent))
    row = [1.0, values[t], values[max(0, t - 1)], values[max(0, t - 2)], mean, max(recent), spread]
    for lag in seasonal_lags:
        row.append(max(values[t + 1 - lag:t + 1 + horizon - lag]))
        row.append(values[t] - values[t - lag])
    return row


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
    # The upper band by quantile regression, when it beat the conformal band on held-out data:
    # [h-1] are the coefficients for the peak over 1..h buckets (see `peak_features`).
    upper_regression: tuple[tuple[float, ...], ...] = ()
    seasonal_lags: tuple[int, ...] = ()  # in buckets: the lags `peak_features` reads

    @property
    def name(self) -> str:
        if self.kind == "holt-winters":
            period = self.season_length * self.bucket_seconds
            label = "weekly" if period >= WEEK_SECONDS else "daily" if period >= DAY_SECONDS else f"{int(period)}s"
            return f"holt-winters-{label}"
        if self.kind == "arima":
            return f"arima({len(self.ar_coefficients)},1,0)"
        return self.kind

    @property
    def name_with_band(self) -> str:
        return f"{self.name}+quantile-regression" if self.upper_regression else self.name

    @property
    def memory_buckets(self) -> int:
        """How many recent values the running state keeps for the upper-band regression."""
        if not self.upper_regression:
            return 0
        return max((*self.seasonal_lags, RECENT_BUCKETS)) + len(self.upper_regression) + 1


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
        # The last values, for last-value, ARIMA and the band regression (up to a week and more of
        # them for the regression: an array of doubles, not a list of float objects).
        self.recent = array("d")
        self.keep = max(2, len(model.ar_coefficients) + 2, model.memory_buckets)

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
        if len(self.recent) > 2 * self.keep:  # trim in batches: deleting the head is a copy
            del self.recent[: len(self.recent) - self.keep]
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
        regression = self._regressed_peak(horizon_buckets)
        if regression is not None:
            upper = regression
        elif model.peak_quantiles:
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
            model=model.name_with_band,
            path=tuple(max(0.0, v) for v in path),
        )

    def _regressed_peak(self, horizon_buckets: int) -> float | None:
        coefficients = self.model.upper_regression
        if not coefficients or len(self.recent) < self.model.memory_buckets - 1:
            return None
        horizon = min(horizon_buckets, len(coefficients))
        row = peak_features(self.recent, len(self.recent) - 1, horizon, self.model.seasonal_lags)
        return sum(c * x for c, x in zip(coefficients[horizon - 1], row))


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
    best = _with_upper_regression(best, values, horizon_buckets, quantile, seasonality != "none")
    return _replace(best, fit_seconds=time.perf_counter() - started)


def _pinball(actual: np.ndarray, predicted: np.ndarray, quantile: float) -> float:
    difference = actual - predicted
    return float(np.mean(np.maximum(quantile * difference, (quantile - 1.0) * difference)))


def _regression_rows(values: np.ndarray, first: int, last: int, horizon: int, lags: tuple[int, ...]):
    """Features and peak targets for the origins first..last-1 (each needs `horizon` values after it)."""
    rows, targets = [], []
    series = values.tolist()
    for t in range(first, min(last, len(values) - horizon)):
        rows.append(peak_features(series, t, horizon, lags))
        targets.append(max(series[t + 1:t + 1 + horizon]))
    return np.asarray(rows), np.asarray(targets)


def _fit_peak_regression(x: np.ndarray, y: np.ndarray, quantile: float) -> np.ndarray | None:
    from statsmodels.regression.quantile_regression import QuantReg

    if len(y) < 10 * x.shape[1]:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # iteration-limit and collinearity chatter
        try:
            params = QuantReg(y, x).fit(q=quantile, max_iter=2000).params
        except (ValueError, np.linalg.LinAlgError):
            return None
    return np.asarray(params) if np.all(np.isfinite(params)) else None


def _with_upper_regression(model: FittedModel, values: np.ndarray, horizon: int, quantile: float,
                           seasonal: bool = True) -> FittedModel:
    """Add the quantile-regression upper band when it beats the conformal one on held-out data.

    Held-out: the last `test` origins. The regression is fitted on the origins before them; the
    conformal band is calibrated on the same number of origins just before them (as the fit does).
    Both are scored by pinball loss at `quantile` on the peak over the whole horizon.
    """
    bucket = model.bucket_seconds
    daily = int(round(DAY_SECONDS / bucket))
    # The day and week before, whenever the history is long enough (even when the autocorrelation
    # found no season to fit: the regression weighs them by what they are worth for the peak).
    lags = tuple(lag for lag in (daily, int(round(WEEK_SECONDS / bucket))) if seasonal and len(values) >= 3 * lag)
    if len(values) < 2 * daily or daily < RECENT_BUCKETS:
        return model
    earliest = max(lags + (RECENT_BUCKETS,))
    test = min(len(values) // 4, int(DAY_SECONDS / bucket))
    split = len(values) - test
    if split - test <= earliest or test * (1.0 - quantile) < MIN_HELD_OUT_EXCEEDANCES:
        # Too few peaks above a high quantile in a day to tell two bands apart (at q = 0.99, about
        # three): keep the conformal band rather than pick one on noise.
        return model
    # Conformal band: the `quantile` of the point model's peak errors at the `test` origins just
    # before the split, added to its peaks after it. Its loss there depends only on the errors.
    _, peak_errors, _ = _backtest(model, values, horizon, split - test)
    errors = np.asarray(peak_errors[horizon - 1])  # origins split - test - 1 ...
    calibration, held_out = errors[:test], errors[test + 1:]  # ... before, and from `split` on
    if len(calibration) < MIN_BACKTEST_ERRORS or not len(held_out):
        return model
    offset = float(np.quantile(calibration, quantile))
    x_train, y_train = _regression_rows(values, max(earliest, split - MAX_REGRESSION_ROWS), split, horizon, lags)
    coefficients = _fit_peak_regression(x_train, y_train, quantile) if len(y_train) else None
    if coefficients is None:
        return model
    x_test, y_test = _regression_rows(values, split, len(values), horizon, lags)
    if _pinball(y_test, x_test @ coefficients, quantile) >= _pinball(held_out, np.full(len(held_out), offset), quantile):
        return model
    # It wins: refit on everything recent, one regression per horizon.
    per_horizon = []
    for h in range(1, horizon + 1):
        x, y = _regression_rows(values, max(earliest, len(values) - MAX_REGRESSION_ROWS), len(values), h, lags)
        fitted = _fit_peak_regression(x, y, quantile)
        if fitted is None:
            return model
        per_horizon.append(tuple(float(c) for c in fitted))
    return _replace(model, upper_regression=tuple(per_horizon), seasonal_lags=lags)


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
