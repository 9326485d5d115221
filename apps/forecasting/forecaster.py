"""Load forecaster: Prophet's seasons, the latest observations for the level, empirical 80 % bands.

Pure pandas/numpy/Prophet (no Django), so the backtest, the benches and the autoscaler replay use the
very code the web process runs.

Method (docs/forecasting.md, "Forecaster and backtest", has the measurements behind each choice):

- Prophet (multiplicative seasonality, daily and weekly) is fitted on a schedule (`refit_every`, a
  day by default) on at most `max_history` of data up to the refit time. Between refits only its
  seasonal term M(t) is used, kept as a lookup table over one period: Prophet's trend is stale hours
  after a fit (a Prophet fitted once and never updated is 4-30x worse than persistence on the Helios
  series), while the seasons stay valid.
- The level comes from the latest observation y(t). Per horizon h (k steps) the forecast is
  y(t) + x(t, h) . beta_k, with x drawn from (FEATURES; the defaults use all but the long reversion
  and last week):
      seasonal     L(t) * (M(t+h) - M(t))  the change Prophet's seasons expect (L: mean of the last day)
      latest       last raw sample inside the last step - y(t)   (when the caller has finer data)
      yesterday    y(t+h-1d) - y(t-1d)     the same change a day earlier (h <= 1 day)
      reversion    L(t) - y(t)             pull toward the last day's mean
      day_profile  median of y(s+h) - y(s) over the last 7 days, s within 30 min of t's time of day
  beta_k is a least-absolute-deviation fit on the origins of the last `calibration_window` whose
  targets are observed, shrunk toward persistence (beta = 0) by a weight chosen on rolling
  out-of-sample folds. Per horizon the folds also choose among the `candidates` feature sets
  (Prophet's seasons without, then with `reversion`; then a set without Prophet): a set is used only
  if it beats the best so far on the pooled folds by `margin` and persistence in `fold_wins` of
  them. Where nothing beats persistence, the forecast is persistence.
- The 80 % band is yhat + the 10 % and 90 % quantiles of the out-of-sample fold errors (split
  conformal, widened for the effective number of errors when they overlap), per calibrated horizon;
  other horizons interpolate in log h, longer ones widen with sqrt(h). Between refits each edge
  tracks the misses of the forecasts made since the fit (adaptive conformal, `band_tracking`).
- Short or flat history degrades instead of failing: weekly seasonality needs `min_weekly_history`,
  daily `min_daily_history`; without either, or on a constant series, there is no Prophet and the
  forecast is persistence (plus the other corrections where the folds show they help), with
  empirical bands.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

STATE_VERSION = 4  # 2: six features in FEATURES order; 3: seven (day_profile); 4: tracked band offsets
REFIT_EVERY = pd.Timedelta("1D")
MAX_HISTORY = pd.Timedelta("28D")
FEATURES = ("seasonal", "latest", "yesterday", "reversion", "reversion_long", "last_week", "day_profile")
SHRINK_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
DAY_NS = pd.Timedelta("1D").value
ISSUED_RESOLUTION = 0.01   # the issued band offsets are kept when they move by more than this (band widths)

DEFAULT_OPTIONS: dict[str, Any] = {
    # The correction's candidate inputs (of FEATURES), simplest first; each horizon uses the best on the folds.
    "candidates": (("seasonal", "latest", "yesterday", "day_profile"),
                   ("seasonal", "reversion", "latest", "yesterday", "day_profile"),
                   ("latest", "reversion", "day_profile")),
    "calibration_window": "14D",   # origins used to fit the per-horizon correction and its bands
    "fold_length": "2D",           # length of each rolling out-of-sample fold
    "folds": 4,                    # at most this many folds (fewer on short history)
    "loss": "lad",                 # "lad" (median: what MAE rewards) or "ls" (least squares)
    "margin": 0.02,                # a correction must beat persistence on the pooled folds by 2 %
    "margin_reference": None,      # if a duration: the margin grows as sqrt(horizon / it) past it
    "fold_wins": 0.75,             # and in at least this share of the folds
    "coverage": 0.8,               # nominal band coverage
    "band_coverage": None,         # quantile level of the bands (None: `coverage`)
    "finite_sample": True,         # widen the band quantiles for the effective number of errors
    "band_tracking": 0.05,         # adaptive conformal step at one step ahead, in band widths (0: fixed bands)
    "tracking_power": 0.5,         # k steps ahead, the step is band_tracking / k ** tracking_power
    "tracking_window": "7D",       # at most this much history is scored when tracking starts or resumes
    "record_horizons": ("10min", "1h", "6h"),  # the track record: MAE against persistence and coverage,
    "record_days": 7,              # over the targets of this many days (UTC), scored as they arrive
    "min_daily_history": "2D",     # Prophet's daily season needs this much data
    "min_weekly_history": "14D",   # and its weekly season this much
    "reversion_window": "1D",      # the level the reversion feature pulls toward
    "long_reversion_window": "3D",  # and the optional long one
    "profile_days": 7,             # day_profile: the same change over this many past days,
    "profile_spread": "30min",     # at origins up to this far either side of the same time of day,
    "profile_stat": "median",      # summarised by their "median" (or "mean")
    "ladder": 16,                  # horizons calibrated at each refit, log-spaced up to a day
    "nonnegative": None,           # clip at 0; None: when the history has no negative value
}

log = logging.getLogger(__name__)


class ForecastError(ValueError):
    """The history cannot be forecast (not a series on a regular time grid, no values at all)."""


@dataclass
class ForecastPath:
    """One forecast from one origin."""

    origin: pd.Timestamp          # the last observed time used
    times: pd.DatetimeIndex       # origin + horizon, one per requested horizon
    yhat: np.ndarray
    lower: np.ndarray             # 80 % band (the forecaster's `coverage`)
    upper: np.ndarray
    method: str                   # e.g. "prophet(daily+weekly)+correction", "persistence (short history)"
    horizons: list[pd.Timedelta] = field(default_factory=list)


def _quiet_prophet() -> None:
    """Silence cmdstanpy's INFO lines (two per fit). Its logger installs its own handler, and resets its
    level, the first time it is used, so it is made to do that first."""
    from cmdstanpy.utils import get_logger

    get_logger()
    for name in ("cmdstanpy", "prophet", "prophet.plot"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _td(value: Any) -> pd.Timedelta:
    return value if isinstance(value, pd.Timedelta) else pd.Timedelta(value)


def _lad(x: np.ndarray, t: np.ndarray, iterations: int = 25) -> np.ndarray:
    """Least absolute deviations by iteratively reweighted least squares, with a tiny ridge so that an
    all-zero feature (no latest sample, no season) gets a zero coefficient instead of a singular solve."""
    n, p = x.shape
    if n == 0 or p == 0:
        return np.zeros(p)
    ridge = np.eye(p) * (1e-6 * n * (np.mean(x * x, axis=0).max() + 1e-12))
    floor = 1e-3 * (np.mean(np.abs(t)) + 1e-9)
    weights = np.ones(n)
    beta = np.zeros(p)
    for _ in range(iterations):
        xw = x * weights[:, None]
        beta = np.linalg.solve(x.T @ xw + ridge, xw.T @ t)
        weights = 1.0 / np.maximum(np.abs(t - x @ beta), floor)
        weights /= weights.mean()
    return beta


def _autocorrelation_time(x: np.ndarray, max_lag: int) -> float:
    x = x - x.mean()
    var = float(x @ x)
    if var == 0:
        return 1.0
    tau = 1.0
    for lag in range(1, min(max_lag, len(x) - 1) + 1):
        rho = float(x[:-lag] @ x[lag:]) / var
        if rho <= 0:
            break
        tau += 2 * rho
    return tau


def _trailing_mean(values: np.ndarray, window: int) -> np.ndarray:
    return pd.Series(values).rolling(window, min_periods=1).mean().to_numpy()


class LoadForecaster:
    """Prophet seasons + latest observations, refitted on a schedule, with conformal 80 % bands.

    `update(history)` refits when due; between refits `forecast(history, horizons)` is a table lookup
    and a dot product per horizon (about 10 ms for the dashboard's 112 horizons over 28 days of history).
    """

    def __init__(self, step: pd.Timedelta, *, refit_every: pd.Timedelta = REFIT_EVERY,
                 max_history: pd.Timedelta | None = MAX_HISTORY, **options: Any) -> None:
        self.step = _td(step)
        if self.step <= pd.Timedelta(0):
            raise ValueError(f"step must be positive, not {step}")
        self.refit_every = _td(refit_every)
        self.max_history = None if max_history is None else _td(max_history)
        unknown = set(options) - set(DEFAULT_OPTIONS)
        if unknown:
            raise TypeError(f"unknown LoadForecaster options: {', '.join(sorted(unknown))}")
        self.options = {**DEFAULT_OPTIONS, **options}
        if self.options["profile_stat"] not in ("median", "mean"):
            raise ValueError(f"profile_stat must be 'median' or 'mean', not {self.options['profile_stat']!r}")
        if int(self.options["record_days"]) < 1:
            raise ValueError("record_days must be at least 1")
        if int(self.options["profile_days"]) < 1 or _td(self.options["profile_spread"]) < pd.Timedelta(0):
            raise ValueError("profile_days must be at least 1 and profile_spread not negative")
        self.fit_seconds = 0.0          # total Prophet fit time so far
        self.calibration_seconds = 0.0  # total time spent fitting the corrections and bands
        self.refits = 0
        self.fit_origin: pd.Timestamp | None = None
        self.method = "unfitted"
        self.model_json: str | None = None
        self.season: np.ndarray | None = None       # M(t) over one period, from season_anchor at `step`
        self.season_anchor: pd.Timestamp | None = None
        self.season_period = pd.Timedelta(0)
        self.calibration: dict[int, dict[str, Any]] = {}   # steps ahead -> beta, band quantiles, ...
        self.tracking: dict[int, list[float]] = {}   # steps ahead -> [lower, upper] band offsets, in band widths
        self.tracked_origin: pd.Timestamp | None = None   # the origin of the last tracking pass
        self.issued: dict[int, list[list]] = {}   # steps ahead -> [[steps since the epoch, lower, upper], ...]
        # steps ahead -> [[day since the epoch, scored, sum |error|, sum |persistence error|, covered], ...]
        self.record: dict[int, list[list]] = {}
        self.nonnegative = bool(self.options["nonnegative"])

    # -- history handling ------------------------------------------------------------------------
    def _regular(self, history: pd.Series, latest: pd.Series | None = None) -> tuple[pd.Series, pd.Series | None]:
        if not isinstance(history, pd.Series) or not isinstance(history.index, pd.DatetimeIndex):
            raise ForecastError("history must be a pandas Series with a DatetimeIndex")
        if len(history) == 0 or not history.notna().any():
            raise ForecastError("history has no values")
        index = history.index
        if index.tz is not None:
            history = history.tz_convert("UTC").tz_localize(None)
            index = history.index
        span = index[-1] - index[0]
        if not index.is_monotonic_increasing or span != self.step * (len(index) - 1):
            if index.has_duplicates or not index.is_monotonic_increasing:
                history = history[~index.duplicated(keep="last")].sort_index()
            grid = pd.date_range(history.index[0], history.index[-1], freq=self.step)
            if len(grid) == 0 or grid[-1] != history.index[-1]:
                raise ForecastError(f"history is not on a regular grid of {self.step}")
            history = history.reindex(grid)
        history = history.astype(float)
        if latest is not None:
            if latest.index.tz is not None:
                latest = latest.tz_convert("UTC").tz_localize(None)
            latest = latest.astype(float).reindex(history.index)
        return history, latest

    def _lags(self, y: np.ndarray, idx: np.ndarray, ks: np.ndarray) -> dict[str, np.ndarray]:
        """The change the same k steps saw one period earlier: y(t+k-P) - y(t-P), for P a day and a week;
        0 where the history does not reach back, or where t+k-P would be after the origin (k > P). And
        `day_profile`: the median (or mean) of y(s+k) - y(s) over s = t - j days + o, j = 1 ..
        `profile_days`, |o| <= `profile_spread`, leaving out any s + k after t; 0 where there is none."""
        out = {}
        for name, period in (("yesterday", "1D"), ("last_week", "7D")):
            p = max(1, int(pd.Timedelta(period) / self.step))
            ok = (idx - p >= 0) & (ks <= p)
            delta = np.zeros(len(idx))
            delta[ok] = y[idx[ok] + ks[ok] - p] - y[idx[ok] - p]
            out[name] = delta
        # day_profile: the median of that change over the last `profile_days` days and over origins up to
        # `profile_spread` either side of the same time of day (those the history holds).
        p = max(1, int(pd.Timedelta("1D") / self.step))
        spread = int(_td(self.options["profile_spread"]) / self.step)
        samples = np.full((len(idx), int(self.options["profile_days"]) * (2 * spread + 1)), np.nan)
        column = 0
        for j in range(1, int(self.options["profile_days"]) + 1):
            for offset in range(-spread, spread + 1):
                then = idx - j * p + offset
                ok = (then >= 0) & (ks <= p) & (then + ks <= idx)
                samples[ok, column] = y[then[ok] + ks[ok]] - y[then[ok]]
                column += 1
        missing = np.isnan(samples)
        full, part = ~missing.any(axis=1), missing.any(axis=1) & ~missing.all(axis=1)
        median = self.options["profile_stat"] == "median"
        profile = np.zeros(len(idx))
        if full.any():  # most origins: every day is there (np.median is several times faster than nanmedian)
            profile[full] = (np.median if median else np.mean)(samples[full], axis=1)
        if part.any():
            profile[part] = (np.nanmedian if median else np.nanmean)(samples[part], axis=1)
        out["day_profile"] = profile
        return out

    def _window(self, option: str) -> int:
        return max(1, int(_td(self.options[option]) / self.step))

    def _arrays(self, history: pd.Series, latest: pd.Series | None, *, tail_only: bool = False,
                ) -> dict[str, np.ndarray]:
        """The inputs of the features at every point of `history` (or at its last point only): the value
        (gaps carried forward), the last raw sample, and the trailing means the reversions pull toward."""
        raw = history.to_numpy(dtype=float)
        filled = pd.Series(raw).ffill().bfill().to_numpy()
        if latest is None:
            last = filled
        else:
            last = latest.to_numpy(dtype=float)
            last = np.where(np.isnan(last), filled, last)
        short, long = self._window("reversion_window"), self._window("long_reversion_window")
        if tail_only:
            return {"y": filled[-1:], "last": last[-1:], "level": np.array([filled[-short:].mean()]),
                    "level_long": np.array([filled[-long:].mean()])}
        return {"raw": raw, "y": filled, "last": last, "level": _trailing_mean(filled, short),
                "level_long": _trailing_mean(filled, long)}

    # -- refits ------------------------------------------------------------------------------------
    def due(self, origin: pd.Timestamp) -> bool:
        """A refit is due on the first call, every `refit_every`, and when asked for an origin before the
        last fit (its model saw data after that origin)."""
        return (self.fit_origin is None or origin < self.fit_origin
                or origin - self.fit_origin >= self.refit_every)

    def update(self, history: pd.Series, latest: pd.Series | None = None,
               horizons: Sequence[pd.Timedelta] | None = None) -> bool:
        """Refit Prophet and the corrections if due (`history`: tz-naive UTC, regular at `step`, NaN
        allowed; `latest`: optional last raw sample inside each step, same index). Returns whether it
        refitted."""
        history, latest = self._regular(history, latest)
        origin = history.index[-1]
        if not self.due(origin):
            return False
        self._refit(history, latest, horizons)
        return True

    def _refit(self, history: pd.Series, latest: pd.Series | None,
               horizons: Sequence[pd.Timedelta] | None) -> None:
        began = time.perf_counter()
        origin = history.index[-1]
        if self.options["nonnegative"] is None:
            self.nonnegative = bool(np.nanmin(history.to_numpy()) >= 0)
        self._fit_prophet(history)
        self.fit_origin = origin
        self.refits += 1
        calibration_began = time.perf_counter()
        self._calibrate(history, latest, horizons)
        self.calibration_seconds += time.perf_counter() - calibration_began
        log.debug("refit at %s (%s) in %.2f s", origin, self.method, time.perf_counter() - began)

    def _fit_prophet(self, history: pd.Series) -> None:
        fit_data = history if self.max_history is None else history.loc[history.index[-1] - self.max_history:]
        observed = fit_data.dropna()
        span = observed.index[-1] - observed.index[0] if len(observed) else pd.Timedelta(0)
        daily = span >= _td(self.options["min_daily_history"]) and self.step < pd.Timedelta("1D")
        weekly = span >= _td(self.options["min_weekly_history"])
        values = observed.to_numpy()
        flat = len(values) == 0 or float(np.nanmax(values) - np.nanmin(values)) == 0.0
        self.model_json = None
        self.season = None
        self.season_anchor = None
        if flat or not (daily or weekly):
            reason = "constant series" if flat else "short history"
            self.method = f"persistence ({reason})"
            return
        from prophet import Prophet
        from prophet.serialize import model_to_json

        _quiet_prophet()  # after the import: cmdstanpy sets its own level when first imported

        model = Prophet(seasonality_mode="multiplicative", daily_seasonality=daily, weekly_seasonality=weekly,
                        yearly_seasonality=False, uncertainty_samples=0)
        began = time.perf_counter()
        try:
            model.fit(pd.DataFrame({"ds": observed.index, "y": values}))
        except Exception as exc:  # a Stan failure on an odd series must degrade, not stop the forecasts
            self.fit_seconds += time.perf_counter() - began
            log.warning("Prophet fit failed (%s); forecasting by persistence", exc)
            self.method = "persistence (Prophet fit failed)"
            return
        self.fit_seconds += time.perf_counter() - began
        self.season_period = pd.Timedelta("7D") if weekly else pd.Timedelta("1D")
        anchor = history.index[-1]
        points = max(1, math.ceil(self.season_period / self.step))
        times = pd.date_range(anchor, periods=points, freq=self.step)
        terms = model.predict(pd.DataFrame({"ds": times}))["multiplicative_terms"].to_numpy(dtype=float)
        self.season = np.nan_to_num(terms)
        self.season_anchor = anchor
        self.model_json = model_to_json(model)
        seasons = "+".join(name for name, on in (("daily", daily), ("weekly", weekly)) if on)
        self.method = f"prophet({seasons})+correction"

    def seasonal_terms(self, times: pd.DatetimeIndex | np.ndarray) -> np.ndarray:
        """Prophet's multiplicative seasonal term M at `times` (0 without a model)."""
        times = pd.DatetimeIndex(times)
        if self.season is None or self.season_anchor is None:
            return np.zeros(len(times))
        phase = ((times - self.season_anchor) % self.season_period) / self.step
        index = np.rint(np.asarray(phase, dtype=float)).astype(np.int64) % len(self.season)
        return self.season[index]

    # -- correction and bands ------------------------------------------------------------------------
    def _ladder(self, horizons: Sequence[pd.Timedelta] | None) -> list[int]:
        day = max(1, int(pd.Timedelta("1D") / self.step))
        asked = sorted({self._steps(h) for h in horizons or ()})
        top = max([day, *asked])
        ladder = np.unique(np.rint(np.geomspace(1, top, int(self.options["ladder"]))).astype(int))
        # The track record's horizons too: only calibrated horizons are scored (and the record then says
        # how the served forecast did at 1 h, not at an interpolation between two other horizons).
        return sorted({*ladder.tolist(), *asked, *self._record_steps().values()})

    def _steps(self, horizon: pd.Timedelta) -> int:
        horizon = _td(horizon)
        if horizon <= pd.Timedelta(0):
            raise ForecastError(f"horizon must be positive, not {horizon}")
        return max(1, math.ceil(horizon / self.step - 1e-9))

    def _features(self, arrays: dict[str, np.ndarray], idx: np.ndarray | int, season_now: np.ndarray | float,
                  season_then: np.ndarray | float, lags: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """The correction's inputs (columns in FEATURES order) at origins `idx`, for
        targets whose seasonal terms are `season_then`. Used by both the calibration and the forecast."""
        y = arrays["y"][idx]
        columns = {
            "seasonal": arrays["level"][idx] * (season_then - season_now),
            "reversion": arrays["level"][idx] - y,
            "reversion_long": arrays["level_long"][idx] - y,
            "latest": arrays["last"][idx] - y,
            "yesterday": (lags or {}).get("yesterday", 0.0),
            "last_week": (lags or {}).get("last_week", 0.0),
            "day_profile": (lags or {}).get("day_profile", 0.0),
        }
        shape = np.broadcast(*columns.values()).shape
        return np.column_stack([np.broadcast_to(columns[name], shape) for name in FEATURES])

    def _calibrate(self, history: pd.Series, latest: pd.Series | None,
                   horizons: Sequence[pd.Timedelta] | None) -> None:
        arrays = self._arrays(history, latest)
        n = len(history)
        ladder = self._ladder(horizons)
        times = pd.date_range(history.index[0], periods=n + max(ladder), freq=self.step)
        season = self.seasonal_terms(times)
        window = max(1, int(_td(self.options["calibration_window"]) / self.step))
        fold = max(1, int(_td(self.options["fold_length"]) / self.step))
        alpha = (1 - float(self.options["band_coverage"] or self.options["coverage"])) / 2
        self.calibration = {}
        for k in ladder:
            self.calibration[k] = self._calibrate_horizon(arrays, season, n, k, window, fold, alpha)

    def _calibrate_horizon(self, arrays: dict[str, np.ndarray], season: np.ndarray, n: int, k: int,
                           window: int, fold: int, alpha: float) -> dict[str, Any]:
        origins = np.arange(max(0, n - 1 - k - window), n - k)
        target = arrays["raw"][origins + k] if len(origins) else np.array([])
        keep = ~np.isnan(target)
        origins, target = origins[keep], target[keep]
        change = target - arrays["y"][origins]
        if len(origins) < 2:
            return {"beta": [0.0] * len(FEATURES), "weight": 0.0, "q": [0.0, 0.0], "n": int(len(origins)),
                    "folds": 0, "mae_ratio": 1.0, "features": []}
        x_all = self._features(arrays, origins, season[origins], season[origins + k],
                               self._lags(arrays["y"], origins, np.full(len(origins), k)))
        # Rolling folds: the last `folds` blocks of `fold` origins, each predicted by a fit on the origins
        # whose targets were observed before the block began (no look-ahead inside the calibration).
        blocks = []
        end = len(origins)
        for _ in range(int(self.options["folds"])):
            start = end - fold
            if start <= 0 or start - k < max(fold // 2, 10):
                break
            blocks.append((start, end))
            end = start
        if not blocks:
            # Too short to validate anything: persistence, with its own in-sample errors as the band.
            q = self._band(change, alpha, k)
            return {"beta": [0.0] * len(FEATURES), "weight": 0.0, "q": q.tolist(), "n": int(len(origins)),
                    "folds": 0, "mae_ratio": 1.0, "features": []}
        held = np.concatenate([change[a:b] for a, b in blocks])
        fold_id = np.concatenate([np.full(b - a, i) for i, (a, b) in enumerate(blocks)])
        persistence_mae = float(np.mean(np.abs(held)))
        fold_persistence = [np.mean(np.abs(held[fold_id == i])) for i in range(len(blocks))]
        margin = float(self.options["margin"])
        if self.options["margin_reference"] is not None:
            # Errors k steps ahead overlap over k steps, so the folds hold fewer independent ones the
            # longer the horizon, and their MAE is noisier in proportion to sqrt(k).
            reference = _td(self.options["margin_reference"]) / self.step
            margin *= max(1.0, math.sqrt(k / reference))
        best = {"mae": persistence_mae, "weight": 0.0, "features": (), "pred": np.zeros(len(held))}
        # Candidate feature sets, simplest first: a richer one must beat the best so far by `margin` on
        # the pooled folds, and persistence in `fold_wins` of the folds.
        for subset in self.options["candidates"]:
            mask = np.array([name in subset for name in FEATURES], dtype=float)
            x = x_all * mask
            pred = np.concatenate([x[a:b] @ self._fit(x[:a - k], change[:a - k]) for a, b in blocks])
            maes = [float(np.mean(np.abs(held - w * pred))) for w in SHRINK_GRID]
            i = int(np.argmin(maes))
            if SHRINK_GRID[i] == 0 or maes[i] > (1 - margin) * best["mae"]:
                continue
            w = SHRINK_GRID[i]
            wins = [np.mean(np.abs(held[fold_id == f] - w * pred[fold_id == f])) < fold_persistence[f]
                    for f in range(len(blocks))]
            if np.mean(wins) < float(self.options["fold_wins"]):
                continue
            best = {"mae": maes[i], "weight": w, "features": tuple(subset), "pred": w * pred}
        if best["weight"] > 0:
            mask = np.array([name in best["features"] for name in FEATURES], dtype=float)
            beta = best["weight"] * self._fit(x_all * mask, change)
        else:
            beta = np.zeros(len(FEATURES))
        q = self._band(held - best["pred"], alpha, k)
        return {"beta": beta.tolist(), "weight": best["weight"], "q": q.tolist(), "n": int(len(origins)),
                "folds": len(blocks), "features": list(best["features"]),
                "mae_ratio": best["mae"] / persistence_mae if persistence_mae > 0 else 1.0}

    def _fit(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        if self.options["loss"] == "lad":
            return _lad(x, t)
        ridge = np.eye(x.shape[1]) * (1e-6 * len(t) * (np.mean(x * x, axis=0).max() + 1e-12))
        return np.linalg.solve(x.T @ x + ridge, x.T @ t)

    def _band(self, residual: np.ndarray, alpha: float, k: int) -> np.ndarray:
        """The (alpha, 1 - alpha) quantiles of the errors, with the split-conformal finite-sample
        correction for the effective number of errors: errors of forecasts k steps ahead from consecutive
        origins overlap, so n errors hold about n / tau independent ones, tau the integrated
        autocorrelation time (sum of the initial positive autocorrelations, at most 2k lags)."""
        level = 1 - alpha
        if self.options["finite_sample"] and len(residual) > 2:
            n_eff = len(residual) / _autocorrelation_time(residual, 2 * k)
            level = min(1.0, math.ceil((n_eff + 1) * level) / n_eff)
        return np.quantile(residual, [1 - level, level])

    def _edges(self, k: int) -> tuple[float, float]:
        """The band's quantiles at a calibrated k, moved by the tracked offsets (in band widths)."""
        lo, hi = self.calibration[k]["q"]
        d_lo, d_hi = self.tracking.get(k, (0.0, 0.0))
        width = hi - lo
        return lo - d_lo * width, hi + d_hi * width

    def _calibration_at(self, k: int) -> tuple[np.ndarray, float, float]:
        """beta and band quantiles for k steps ahead: calibrated, interpolated in log k between the two
        nearest calibrated horizons, or the longest one widened by sqrt(k / k_max)."""
        if k in self.calibration:
            return np.asarray(self.calibration[k]["beta"]), *self._edges(k)
        ks = sorted(self.calibration)
        if not ks:
            return np.zeros(len(FEATURES)), 0.0, 0.0
        if k > ks[-1]:
            lo, hi = self._edges(ks[-1])
            widen = math.sqrt(k / ks[-1])
            return np.asarray(self.calibration[ks[-1]]["beta"]), lo * widen, hi * widen
        if k < ks[0]:
            return np.asarray(self.calibration[ks[0]]["beta"]), *self._edges(ks[0])
        hi = next(i for i in ks if i > k)
        lo = max(i for i in ks if i < k)
        f = (math.log(k) - math.log(lo)) / (math.log(hi) - math.log(lo))
        (a_lo, a_hi), (b_lo, b_hi) = self._edges(lo), self._edges(hi)
        beta = (1 - f) * np.asarray(self.calibration[lo]["beta"]) + f * np.asarray(self.calibration[hi]["beta"])
        return beta, (1 - f) * a_lo + f * b_lo, (1 - f) * a_hi + f * b_hi

    def _track(self, history: pd.Series, latest: pd.Series | None) -> None:
        """Adaptive conformal bands (Gibbs and Candes, 2021): score each calibrated horizon's forecasts
        whose targets were observed since the last pass and after the last fit (so out of sample, with
        today's coefficients) against the band that was issued with them, and move each band edge by
        step * (misses on its side - a * scored) band widths, a = (1 - coverage) / 2, step =
        `band_tracking` / k ** `tracking_power`: out after misses, in a little otherwise, so that over
        time each side misses a of the time whatever the errors do. Errors k steps ahead arrive k steps
        late and overlap, hence the smaller step for longer horizons; scoring them against today's
        offsets instead of the issued ones undercounts the misses of a run (they were already widened
        for) and left 6-hour bands covering 0.78 where 0.8 was asked. Offsets stay within [-0.5, 3]
        band widths and survive refits; an origin earlier than the last pass clears them."""
        eta = float(self.options["band_tracking"])
        if eta <= 0 or not self.calibration or self.fit_origin is None:
            return
        origin, n = history.index[-1], len(history)
        if self.tracked_origin is not None and origin < self.tracked_origin:
            self.tracking, self.issued, self.record = {}, {}, {}   # asked about an earlier time: these saw the future
            self.tracked_origin = None
        # Targets after the last pass (at most `tracking_window` back) and after the fit: out of sample.
        scored_through = n - 1 - self._window("tracking_window")
        if self.tracked_origin is not None:
            scored_through = max(scored_through, n - 1 - int((origin - self.tracked_origin) / self.step))
        first_target = max(scored_through, n - 1 - int((origin - self.fit_origin) / self.step)) + 1
        self.tracked_origin = origin
        now = origin.value // self.step.value   # steps since the epoch: the issued offsets' clock
        pairs = [(t - k, k) for k in sorted(self.calibration) for t in range(max(first_target, k), n)]
        if pairs:
            self._score(history, latest, *(np.array(column) for column in zip(*pairs, strict=True)), now - (n - 1))
        issued = {}
        for k in self.calibration:   # the offsets the forecasts issued now use, for when their errors come
            d = self.tracking.get(k, [0.0, 0.0])
            entries = self.issued.get(k, [])   # in time order
            expired = sum(e[0] <= now - k for e in entries)
            kept = entries[max(0, expired - 1):]   # the one in force k steps ago is still to be looked up
            if not kept or max(abs(d[0] - kept[-1][1]), abs(d[1] - kept[-1][2])) > ISSUED_RESOLUTION:
                kept.append([int(now), round(d[0], 5), round(d[1], 5)])
            issued[k] = kept
        self.issued = issued   # horizons a refit no longer calibrates are dropped
        self.tracking = {k: d for k, d in self.tracking.items() if k in self.calibration}

    def _score(self, history: pd.Series, latest: pd.Series | None, origins: np.ndarray, ks: np.ndarray,
               first_step: int) -> None:
        """Move the tracked offsets by the misses of the forecasts from `origins`, `ks` steps ahead (the
        positions in `history`, whose first point is `first_step` steps since the epoch)."""
        arrays = self._arrays(history, latest)
        target = arrays["raw"][origins + ks]
        x = self._features(arrays, origins, self.seasonal_terms(history.index[origins]),
                           self.seasonal_terms(history.index[origins + ks]), self._lags(arrays["y"], origins, ks))
        beta = np.array([self.calibration[k]["beta"] for k in ks])
        error = target - (arrays["y"][origins] + np.sum(x * beta, axis=1))
        alpha = (1 - float(self.options["coverage"])) / 2
        record_ks = set(self._record_steps().values())
        for k in map(int, np.unique(ks)):
            mine = (ks == k) & ~np.isnan(error)
            if not mine.any():
                continue
            step = float(self.options["band_tracking"]) / k ** float(self.options["tracking_power"])
            lo, hi = self.calibration[k]["q"]
            width = hi - lo
            issued = self.issued.get(k, [])
            at = np.searchsorted([e[0] for e in issued], origins[mine] + first_step, side="right") - 1
            d_lo = np.array([issued[i][1] if i >= 0 else 0.0 for i in at])
            d_hi = np.array([issued[i][2] if i >= 0 else 0.0 for i in at])
            low = error[mine] < lo - d_lo * width
            high = error[mine] > hi + d_hi * width
            low_miss, high_miss = np.sum(low), np.sum(high)
            d = self.tracking.get(k, [0.0, 0.0])
            scored = int(mine.sum())
            self.tracking[k] = [min(3.0, max(-0.5, d[0] + step * (low_miss - alpha * scored))),
                                min(3.0, max(-0.5, d[1] + step * (high_miss - alpha * scored)))]
            if k in record_ks:
                persistence = target[mine] - arrays["y"][origins[mine]]
                day = (origins[mine] + k + first_step) * self.step.value // DAY_NS
                self._add_to_record(k, day, np.abs(error[mine]), np.abs(persistence), ~(low | high))

    def _record_steps(self) -> dict[str, int]:
        """The track record's horizons that are whole steps, by their label."""
        steps = {}
        for label in self.options["record_horizons"]:
            k = _td(label) / self.step
            if k >= 1 and k == int(k):
                steps[label] = int(k)
        return steps

    def _add_to_record(self, k: int, day: np.ndarray, error: np.ndarray, persistence: np.ndarray,
                       covered: np.ndarray) -> None:
        buckets = {int(b[0]): b for b in self.record.get(k, [])}
        for d in map(int, np.unique(day)):
            on = day == d
            bucket = buckets.setdefault(d, [d, 0, 0.0, 0.0, 0])
            bucket[1] += int(on.sum())
            bucket[2] += float(error[on].sum())
            bucket[3] += float(persistence[on].sum())
            bucket[4] += int(covered[on].sum())
        keep = max(buckets) - int(self.options["record_days"]) + 1
        self.record[k] = [buckets[d] for d in sorted(buckets) if d >= keep]

    def track_record(self) -> dict[str, dict[str, Any]]:
        """How the forecasts did on the targets that arrived over the last `record_days` days (UTC), per
        horizon: scored, MAE, persistence's MAE, their ratio and the band's coverage. The forecasts are
        recomputed at scoring time with the correction then in force (the same except across a refit);
        only targets after a fit are scored. Empty until band tracking has scored something (it is the
        same pass; `band_tracking=0` keeps no record)."""
        out = {}
        for label, k in self._record_steps().items():
            buckets = self.record.get(k, [])
            n = sum(b[1] for b in buckets)
            if not n:
                continue
            mae, mae_persistence = sum(b[2] for b in buckets) / n, sum(b[3] for b in buckets) / n
            out[label] = {"scored": n, "mae": round(mae, 4), "mae_persistence": round(mae_persistence, 4),
                          "ratio_to_persistence": round(mae / mae_persistence, 4) if mae_persistence > 0 else None,
                          "coverage": round(sum(b[4] for b in buckets) / n, 4),
                          "days": len(buckets), "since": pd.Timestamp(buckets[0][0] * DAY_NS).isoformat()}
        return out

    # -- forecasts -----------------------------------------------------------------------------------
    def forecast(self, history: pd.Series, horizons: Sequence[pd.Timedelta],
                 latest: pd.Series | None = None) -> ForecastPath:
        """Forecast `horizons` ahead of the last point of `history`, using nothing after it. Refits first
        if due. Horizons are rounded up to whole steps."""
        if len(horizons) == 0:
            raise ForecastError("no horizons asked")
        horizons = [_td(h) for h in horizons]
        ks = [self._steps(h) for h in horizons]
        history, latest = self._regular(history, latest)
        origin = history.index[-1]
        if self.due(origin):
            self._refit(history, latest, horizons)
        self._track(history, latest)
        filled = history.ffill().bfill().to_numpy()
        lags = self._lags(filled, np.full(len(ks), len(filled) - 1), np.asarray(ks))
        arrays = self._arrays(history, latest, tail_only=True)
        season_now = self.seasonal_terms(pd.DatetimeIndex([origin]))
        season_then = self.seasonal_terms(pd.DatetimeIndex([origin + self.step * k for k in ks]))
        x = self._features(arrays, np.zeros(len(ks), dtype=int), season_now, season_then, lags)
        calibrated = [self._calibration_at(k) for k in ks]
        beta = np.array([c[0] for c in calibrated])
        yhat = arrays["y"][0] + np.sum(x * beta, axis=1)
        lower = yhat + np.array([c[1] for c in calibrated])
        upper = yhat + np.array([c[2] for c in calibrated])
        if self.nonnegative:
            yhat, lower, upper = (np.maximum(a, 0.0) for a in (yhat, lower, upper))
        times = pd.DatetimeIndex([origin + h for h in horizons])
        return ForecastPath(origin=origin, times=times, yhat=yhat, lower=lower, upper=upper,
                            method=self.method, horizons=horizons)

    # -- state -----------------------------------------------------------------------------------
    def dump(self, *, include_model: bool = True) -> dict[str, Any]:
        """JSON-serialisable state: options, the fitted Prophet model (prophet.serialize JSON; most of the
        size, about 1.5 MB for 28 days at 5 minutes, and not needed to forecast: `include_model=False`
        leaves it out), its seasonal table, the per-horizon corrections and bands, and the bands'
        tracked offsets (with those issued over the last k steps, whose errors are still to come)."""
        def ts(value: pd.Timestamp | None) -> str | None:
            return None if value is None else value.isoformat()

        return {
            "version": STATE_VERSION,
            "features": list(FEATURES),
            "step_s": self.step.total_seconds(),
            "refit_every_s": self.refit_every.total_seconds(),
            "max_history_s": None if self.max_history is None else self.max_history.total_seconds(),
            "options": dict(self.options),
            "fit_seconds": self.fit_seconds,
            "calibration_seconds": self.calibration_seconds,
            "refits": self.refits,
            "fit_origin": ts(self.fit_origin),
            "method": self.method,
            "nonnegative": self.nonnegative,
            "model_json": self.model_json if include_model else None,
            "season": None if self.season is None else self.season.tolist(),
            "season_anchor": ts(self.season_anchor),
            "season_period_s": self.season_period.total_seconds(),
            "calibration": {str(k): v for k, v in self.calibration.items()},
            "tracking": {str(k): v for k, v in self.tracking.items()},
            "tracked_origin": ts(self.tracked_origin),
            "issued": {str(k): v for k, v in self.issued.items()},
            "record": {str(k): v for k, v in self.record.items()},
        }

    @classmethod
    def load(cls, state: dict[str, Any]) -> LoadForecaster:
        """The forecaster `dump()` saved. A state from another version raises ValueError: start afresh."""
        if state.get("version") != STATE_VERSION or state.get("features") != list(FEATURES):
            raise ValueError(f"forecaster state version {state.get('version')!r}, expected {STATE_VERSION}")
        max_history = state["max_history_s"]
        self = cls(pd.Timedelta(seconds=state["step_s"]), refit_every=pd.Timedelta(seconds=state["refit_every_s"]),
                   max_history=None if max_history is None else pd.Timedelta(seconds=max_history),
                   **state["options"])
        self.fit_seconds = float(state["fit_seconds"])
        self.calibration_seconds = float(state.get("calibration_seconds", 0.0))
        self.refits = int(state.get("refits", 0))
        self.fit_origin = None if state["fit_origin"] is None else pd.Timestamp(state["fit_origin"])
        self.method = state["method"]
        self.nonnegative = bool(state["nonnegative"])
        self.model_json = state["model_json"]
        self.season = None if state["season"] is None else np.asarray(state["season"], dtype=float)
        self.season_anchor = None if state["season_anchor"] is None else pd.Timestamp(state["season_anchor"])
        self.season_period = pd.Timedelta(seconds=state["season_period_s"])
        self.calibration = {int(k): v for k, v in state["calibration"].items()}
        self.tracking = {int(k): list(v) for k, v in state["tracking"].items()}
        self.tracked_origin = None if state["tracked_origin"] is None else pd.Timestamp(state["tracked_origin"])
        self.issued = {int(k): v for k, v in state["issued"].items()}
        self.record = {int(k): v for k, v in state.get("record", {}).items()}  # absent before the record
        return self

    def prophet_model(self) -> Any:
        """The fitted Prophet model (deserialised on demand), or None."""
        if self.model_json is None:
            return None
        from prophet.serialize import model_from_json

        return model_from_json(self.model_json)
