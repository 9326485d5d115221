"""Rolling-origin backtest of the load forecaster over one series (pure: pandas, numpy, Prophet).

`manage.py forecast_backtest` and bench/forecast.py both call `load_series` + `backtest`, so the
numbers in bench/results are the command's numbers.

Every step of the test period is an origin; each forecast sees only the series up to its origin (the
forecaster refits on its own schedule from that prefix). A target belongs to the test when its time
is in [train_end, test_end]; origins before train_end are used for the long horizons' first targets.
"""
from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .forecaster import MAX_HISTORY, REFIT_EVERY, ForecastPath, LoadForecaster

DATE_ONLY = re.compile(r"^\s*\d{4}-\d{2}-\d{2}\s*$")
MAPE_MIN_ABS = 1.0


class BacktestInputError(ValueError):
    """Bad input to the backtest: the message is one line that says what is wrong."""


def parse_step(text: str, what: str = "--resample") -> pd.Timedelta:
    try:
        step = pd.Timedelta(str(text).strip())
    except (ValueError, TypeError):
        raise BacktestInputError(f"{what}: {text!r} is not a duration such as 5min, 10min or 1h") from None
    if pd.isna(step) or step <= pd.Timedelta(0):
        raise BacktestInputError(f"{what}: {text!r} must be a positive duration")
    return step


def parse_horizons(text: str, step: pd.Timedelta) -> list[pd.Timedelta]:
    """'10min,1h,6h' -> Timedeltas, each a positive whole multiple of `step`."""
    horizons: list[pd.Timedelta] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            raise BacktestInputError(f"--horizons: {text!r} has an empty entry")
        horizon = parse_step(part, "--horizons")
        if horizon % step != pd.Timedelta(0):
            raise BacktestInputError(f"--horizons: {part} is not a whole multiple of the resample step {_label(step)}")
        horizons.append(horizon)
    if len(set(horizons)) != len(horizons):
        raise BacktestInputError(f"--horizons: {text!r} repeats a horizon")
    return horizons


def parse_time(text: str, what: str) -> tuple[pd.Timestamp, bool]:
    """A timestamp, and whether it was a bare date (a bare --test-end includes that whole day)."""
    try:
        value = pd.Timestamp(str(text).strip())
    except (ValueError, TypeError):
        raise BacktestInputError(
            f"{what}: {text!r} is not a date or time such as 2020-05-22 or 2020-05-22T06:00") from None
    if pd.isna(value):
        raise BacktestInputError(f"{what}: {text!r} is not a date or time")
    if value.tz is not None:
        value = value.tz_convert("UTC").tz_localize(None)
    return value, bool(DATE_ONLY.match(str(text)))


def _label(delta: pd.Timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, size in (("D", 86400), ("h", 3600), ("min", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def load_series(path: str | Path, time_col: str, value_col: str, step: pd.Timedelta) -> tuple[pd.Series, pd.Series]:
    """Read a CSV and resample it to `step`: the mean of each step (the series that is forecast) and the
    last raw sample inside each step (the freshest observation at the origin). Times are read as UTC
    (offsets converted; numbers are Unix seconds)."""
    path = Path(path)
    try:
        header = pd.read_csv(path, nrows=0)
    except FileNotFoundError:
        raise BacktestInputError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise BacktestInputError(f"{path}: cannot read it as CSV ({str(exc).splitlines()[0]})") from None
    columns = [str(c) for c in header.columns]
    for option, column in (("--time-col", time_col), ("--value-col", value_col)):
        if column not in columns:
            raise BacktestInputError(f"{path}: no column {column!r} ({option}); the columns are {', '.join(columns)}")
    try:
        frame = pd.read_csv(path, usecols=[time_col, value_col], dtype={time_col: str}, keep_default_na=True)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise BacktestInputError(f"{path}: cannot read it as CSV ({str(exc).splitlines()[0]})") from None
    if frame.empty:
        raise BacktestInputError(f"{path}: no rows")
    times = _parse_times(frame[time_col], path, time_col)
    values = pd.to_numeric(frame[value_col], errors="coerce")
    bad = values.isna() & frame[value_col].notna() & (frame[value_col].astype(str).str.strip() != "")
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise BacktestInputError(
            f"{path}: column {value_col!r} has a value that is not a number: {frame[value_col].iloc[row]!r} "
            f"(line {row + 2})")
    raw = pd.Series(values.to_numpy(dtype=float), index=pd.DatetimeIndex(times)).sort_index()
    raw = raw[raw.notna()]
    if raw.empty:
        raise BacktestInputError(f"{path}: column {value_col!r} has no values")
    resampler = raw.resample(step)
    return resampler.mean().asfreq(step), resampler.last().asfreq(step)


def _parse_times(column: pd.Series, path: Path, name: str) -> pd.DatetimeIndex:
    text = column.astype("string").str.strip()
    missing = text.isna() | (text == "")
    if missing.any():
        row = int(np.flatnonzero(missing.to_numpy())[0])
        raise BacktestInputError(f"{path}: column {name!r} has an empty time (line {row + 2})")
    numeric = pd.to_numeric(text, errors="coerce")
    if numeric.notna().all():
        parsed = pd.to_datetime(numeric, unit="s", utc=True)
    else:
        parsed = pd.to_datetime(text, errors="coerce", utc=True)
        if parsed.isna().any():
            parsed = pd.to_datetime(text, errors="coerce", utc=True, format="mixed")
    if parsed.isna().any():
        row = int(np.flatnonzero(parsed.isna().to_numpy())[0])
        raise BacktestInputError(
            f"{path}: column {name!r} has a time that cannot be parsed: {text.iloc[row]!r} (line {row + 2})")
    return pd.DatetimeIndex(parsed).tz_localize(None)


def _seasonal_period(series: pd.Series, first_target: pd.Timestamp) -> pd.Timedelta:
    week = pd.Timedelta("7D")
    return week if first_target - week >= series.index[0] else pd.Timedelta("1D")


def rolling_forecasts(forecaster: LoadForecaster, series: pd.Series, origins: Iterable[int],
                      horizons: Sequence[pd.Timedelta], latest: pd.Series | None = None,
                      ) -> Iterator[tuple[int, ForecastPath]]:
    """One forecast per origin (a position in `series`), each given only the series up to that origin."""
    for origin in origins:
        history = series.iloc[: origin + 1]
        if not history.notna().any():
            continue
        yield origin, forecaster.forecast(history, horizons,
                                          latest=None if latest is None else latest.iloc[: origin + 1])


def backtest(series: pd.Series, *, train_end: pd.Timestamp, test_end: pd.Timestamp,
             horizons: Sequence[pd.Timedelta], latest: pd.Series | None = None,
             refit_every: pd.Timedelta = REFIT_EVERY, max_history: pd.Timedelta | None = MAX_HISTORY,
             coverage: float = 0.8, **forecaster_options: Any) -> dict[str, Any]:
    """Rolling-origin backtest over targets in [train_end, test_end] (`series` regular, with a freq).
    Returns the metrics per horizon and the cost."""
    began = time.perf_counter()
    step = series.index.freq and pd.Timedelta(series.index.freq) or pd.Timedelta(series.index[1] - series.index[0])
    horizons = [pd.Timedelta(h) for h in horizons]
    ks = [int(h / step) for h in horizons]
    index = series.index
    first = int(index.searchsorted(train_end, side="left"))
    last = int(index.searchsorted(test_end, side="right")) - 1
    if first <= 0:
        raise BacktestInputError(f"--train-end {train_end} leaves no training data (the series starts {index[0]})")
    if first > last:
        raise BacktestInputError(
            f"no test data between --train-end {train_end} and --test-end {test_end} (the series ends {index[-1]})")
    values = series.to_numpy(dtype=float)
    filled = series.ffill().to_numpy(dtype=float)
    period = _seasonal_period(series, index[first])
    period_steps = max(1, int(round(period / step)))
    forecaster = LoadForecaster(step, refit_every=refit_every, max_history=max_history, coverage=coverage,
                                **forecaster_options)
    kmax, kmin = max(ks), min(ks)
    origins = range(max(0, first - kmax), last - kmin + 1)
    records = {k: {"yhat": [], "lower": [], "upper": [], "truth": [], "persistence": [], "seasonal": []} for k in ks}
    methods: dict[str, int] = {}
    for origin, path in rolling_forecasts(forecaster, series, origins, horizons, latest):
        methods[path.method] = methods.get(path.method, 0) + 1
        for j, k in enumerate(ks):
            target = origin + k
            if target < first or target > last or math.isnan(values[target]):
                continue
            back = target - period_steps * math.ceil(k / period_steps)
            rec = records[k]
            rec["yhat"].append(path.yhat[j])
            rec["lower"].append(path.lower[j])
            rec["upper"].append(path.upper[j])
            rec["truth"].append(values[target])
            rec["persistence"].append(filled[origin])
            rec["seasonal"].append(filled[back] if back >= 0 else np.nan)
    per_horizon = {}
    for horizon, k in zip(horizons, ks, strict=True):
        per_horizon[_label(horizon)] = _metrics({name: np.asarray(v, dtype=float) for name, v in records[k].items()},
                                                coverage)
    return {
        "method": max(methods, key=methods.get) if methods else forecaster.method,
        "methods": methods,
        "step": _label(step),
        "train_end": str(index[first]),
        "test_end": str(index[last]),
        "n_origins": len(origins),
        "horizons": per_horizon,
        "seasonal_naive": f"value {_label(period)} before the target",
        "mape_definition": f"mean |error|/|actual| in percent over targets with |actual| >= {MAPE_MIN_ABS:g}",
        "coverage_nominal": coverage,
        "refits": forecaster.refits,
        "fit_s": round(forecaster.fit_seconds, 3),
        "fit_s_per_refit": round(forecaster.fit_seconds / max(1, forecaster.refits), 3),
        "calibration_s": round(forecaster.calibration_seconds, 3),
        "latest_sample": latest is not None,
        "backtest_s": round(time.perf_counter() - began, 3),
    }


def _metrics(r: dict[str, np.ndarray], coverage: float) -> dict[str, Any]:
    truth = r["truth"]
    if len(truth) == 0:
        return {"n": 0}
    error = np.abs(r["yhat"] - truth)
    mae = float(error.mean())
    mae_persistence = float(np.abs(r["persistence"] - truth).mean())
    seasonal_ok = ~np.isnan(r["seasonal"])
    mae_seasonal = float(np.abs(r["seasonal"] - truth)[seasonal_ok].mean()) if seasonal_ok.any() else None
    big = np.abs(truth) >= MAPE_MIN_ABS
    mape = float(100 * np.mean(error[big] / np.abs(truth[big]))) if big.any() else None
    total = float(np.abs(truth).sum())
    inside = (truth >= r["lower"]) & (truth <= r["upper"])
    coverage_key = "coverage80" if abs(coverage - 0.8) < 1e-9 else f"coverage{round(coverage * 100)}"

    def ratio(a: float, b: float | None) -> float | None:
        if b is None:
            return None
        return round(a / b, 4) if b > 0 else (1.0 if a == 0 else None)

    return {
        "n": int(len(truth)),
        "mae": round(mae, 4),
        "mape": None if mape is None else round(mape, 3),
        "wape": round(float(error.sum()) / total, 4) if total > 0 else None,
        "mae_persistence": round(mae_persistence, 4),
        "mae_seasonal_naive": None if mae_seasonal is None else round(mae_seasonal, 4),
        coverage_key: round(float(inside.mean()), 4),
        "band_width": round(float(np.mean(r["upper"] - r["lower"])), 4),
        "ratio_to_persistence": ratio(mae, mae_persistence),
        "ratio_to_seasonal_naive": ratio(mae, mae_seasonal),
    }


def static_prophet_mae(series: pd.Series, *, train_end: pd.Timestamp, test_end: pd.Timestamp) -> dict[str, Any]:
    """The reference the issue quotes: Prophet (multiplicative, daily + weekly) fitted once on the
    training part and never updated, scored on the same targets."""
    from prophet import Prophet

    from .forecaster import _quiet_prophet

    _quiet_prophet()

    train = series[series.index < train_end].dropna()
    test = series[(series.index >= train_end) & (series.index <= test_end)].dropna()
    model = Prophet(seasonality_mode="multiplicative", daily_seasonality=True, weekly_seasonality=True,
                    yearly_seasonality=False, uncertainty_samples=0)
    began = time.perf_counter()
    model.fit(pd.DataFrame({"ds": train.index, "y": train.to_numpy()}))
    fit_s = time.perf_counter() - began
    yhat = model.predict(pd.DataFrame({"ds": test.index}))["yhat"].to_numpy()
    return {"mae": round(float(np.mean(np.abs(yhat - test.to_numpy()))), 4), "fit_s": round(fit_s, 3)}
