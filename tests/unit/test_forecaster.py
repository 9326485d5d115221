"""The load forecaster (apps/forecasting/forecaster.py) on synthetic series whose answers are known:
a daily season plus noise, a short history, a constant series, gaps."""
from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pytest

from apps.forecasting.backtest import backtest, rolling_forecasts
from apps.forecasting.forecaster import ForecastError, LoadForecaster

STEP = pd.Timedelta("10min")
# Shorter calibration than the defaults so that a week of synthetic data has several folds.
FAST = {"calibration_window": "3D", "fold_length": "12h", "folds": 3}
HORIZONS = [pd.Timedelta("10min"), pd.Timedelta("1h"), pd.Timedelta("6h")]


def seasonal_series(days: int = 8, seed: int = 7) -> pd.Series:
    """A daily cycle of +-60 around 200 with AR(1) noise: the season is predictable, the noise is not."""
    index = pd.date_range("2024-03-04", periods=days * 144, freq=STEP)
    hours = (index - index[0]) / pd.Timedelta("1h")
    return pd.Series(200 + 60 * np.sin(2 * np.pi * hours / 24) + ar1_noise(len(index), seed), index=index)


def ar1_noise(n: int, seed: int) -> np.ndarray:
    """AR(1) noise, coefficient 0.9, innovations of sd 4: what no forecaster can predict."""
    rng = np.random.default_rng(seed)
    noise = np.zeros(n)
    for i in range(1, n):
        noise[i] = 0.9 * noise[i - 1] + rng.normal(0, 4)
    return noise


@pytest.fixture(scope="module")
def seasonal_backtest() -> dict:
    series = seasonal_series()
    return backtest(series, train_end=series.index[0] + pd.Timedelta("6D"), test_end=series.index[-1],
                    horizons=HORIZONS, **FAST)


def test_it_beats_persistence_at_one_hour_on_a_seasonal_series(seasonal_backtest):
    one_hour = seasonal_backtest["horizons"]["1h"]
    assert one_hour["n"] == 288
    assert one_hour["mae"] < 0.8 * one_hour["mae_persistence"]
    six_hours = seasonal_backtest["horizons"]["6h"]
    assert six_hours["mae"] < 0.5 * six_hours["mae_persistence"]
    assert seasonal_backtest["method"] == "prophet(daily)+correction"
    assert seasonal_backtest["refits"] >= 2
    assert seasonal_backtest["fit_s"] > 0


def test_its_bands_cover_about_80_percent(seasonal_backtest):
    coverage = {name: m["coverage80"] for name, m in seasonal_backtest["horizons"].items()}
    assert 0.7 <= coverage["10min"] <= 0.9
    assert 0.7 <= coverage["1h"] <= 0.9
    # Two days hold only about eight independent 6-hour errors: a wider tolerance, still not 0 or 1.
    assert 0.65 <= coverage["6h"] <= 0.97


def test_a_24h_path_from_one_origin_is_cheap_with_bands_at_every_horizon():
    series = seasonal_series(days=5)
    forecaster = LoadForecaster(STEP, **FAST)
    forecaster.update(series)
    horizons = [STEP * k for k in range(1, 145)]
    began = time.perf_counter()
    path = forecaster.forecast(series, horizons)
    assert time.perf_counter() - began < 0.5
    assert len(path.times) == len(path.yhat) == len(path.lower) == len(path.upper) == 144
    assert path.times[0] == series.index[-1] + STEP
    assert path.times[-1] == series.index[-1] + pd.Timedelta("1D")
    assert np.all(np.isfinite(path.yhat))
    assert np.all(path.lower <= path.upper)
    assert np.all(path.lower <= path.yhat + 1e-9)
    assert np.all(path.yhat <= path.upper + 1e-9)
    # Bands widen with the horizon, and the forecast follows the season a day ahead.
    assert (path.upper - path.lower)[-1] > (path.upper - path.lower)[0]
    truth_tomorrow = 200 + 60 * np.sin(2 * np.pi * ((path.times - series.index[0]) / pd.Timedelta("1h")) / 24)
    assert np.mean(np.abs(path.yhat - truth_tomorrow)) < np.mean(np.abs(series.iloc[-1] - truth_tomorrow))


def test_dump_and_load_give_the_same_forecast():
    series = seasonal_series(days=5)
    forecaster = LoadForecaster(STEP, **FAST)
    before = forecaster.forecast(series, HORIZONS)
    state = json.loads(json.dumps(forecaster.dump()))
    assert state["model_json"]  # the fitted Prophet travels with the state
    again = LoadForecaster.load(state)
    assert not again.update(series)  # nothing is due: the cached fit is used
    after = again.forecast(series, HORIZONS)
    assert after.method == before.method
    np.testing.assert_array_equal(after.yhat, before.yhat)
    np.testing.assert_array_equal(after.lower, before.lower)
    np.testing.assert_array_equal(after.upper, before.upper)
    assert again.fit_seconds == forecaster.fit_seconds
    assert again.prophet_model() is not None
    # Without the Prophet model (most of the state's size) the forecast is still the same.
    slim = LoadForecaster.load(json.loads(json.dumps(forecaster.dump(include_model=False))))
    np.testing.assert_array_equal(slim.forecast(series, HORIZONS).yhat, before.yhat)
    assert slim.prophet_model() is None
    with pytest.raises(ValueError, match="forecaster state version 1"):
        LoadForecaster.load({**state, "version": 1})  # an older cache: the caller starts afresh


def test_changing_data_after_the_origin_does_not_change_the_forecast():
    series = seasonal_series(days=6)
    changed = series.copy()
    cut = len(series) - 100
    changed.iloc[cut + 1:] += 500  # the future jumps; forecasts made before it must not know
    origins = range(cut - 150, cut + 1)
    a = list(rolling_forecasts(LoadForecaster(STEP, **FAST), series, origins, HORIZONS))
    b = list(rolling_forecasts(LoadForecaster(STEP, **FAST), changed, origins, HORIZONS))
    assert len(a) == len(b) == len(origins)
    for (_, pa), (_, pb) in zip(a, b, strict=True):
        np.testing.assert_array_equal(pa.yhat, pb.yhat)
        np.testing.assert_array_equal(pa.upper, pb.upper)
    # And the data after the origin is what a later forecast does use.
    later_a = LoadForecaster(STEP, **FAST).forecast(series, HORIZONS)
    later_b = LoadForecaster(STEP, **FAST).forecast(changed, HORIZONS)
    assert later_b.yhat[0] > later_a.yhat[0] + 400


def test_a_model_fitted_on_later_data_refits_before_forecasting_an_earlier_origin():
    series = seasonal_series(days=6)
    earlier = series.iloc[:-100]
    fresh = LoadForecaster(STEP, **FAST).forecast(earlier, HORIZONS)
    forecaster = LoadForecaster(STEP, **FAST)
    forecaster.update(series)
    path = forecaster.forecast(earlier, HORIZONS)
    assert forecaster.refits == 2
    np.testing.assert_allclose(path.yhat, fresh.yhat)


def test_a_short_history_falls_back_to_persistence_with_bands():
    series = seasonal_series(days=1).iloc[:100]  # 16 hours: no season can be fitted
    forecaster = LoadForecaster(STEP, **FAST)
    path = forecaster.forecast(series, HORIZONS)
    assert path.method == "persistence (short history)"
    assert forecaster.fit_seconds == 0
    assert np.all(np.isfinite(path.yhat))
    assert np.all(path.lower <= path.upper)
    assert abs(path.yhat[0] - series.iloc[-1]) < 10
    # A couple of points is still a forecast (a flat one), not a crash.
    tiny = LoadForecaster(STEP).forecast(series.iloc[:2], HORIZONS)
    assert np.all(tiny.yhat == series.iloc[1])


def test_three_days_get_the_daily_season_only():
    series = seasonal_series(days=3)
    path = LoadForecaster(STEP, **FAST).forecast(series, HORIZONS)
    assert path.method == "prophet(daily)+correction"


def test_a_constant_series_forecasts_the_constant():
    index = pd.date_range("2024-01-01", periods=3 * 144, freq=STEP)
    path = LoadForecaster(STEP, **FAST).forecast(pd.Series(8.0, index=index), HORIZONS)
    assert path.method == "persistence (constant series)"
    assert np.all(path.yhat == 8.0)
    assert np.all(path.lower == 8.0)
    assert np.all(path.upper == 8.0)
    zeros = LoadForecaster(STEP, **FAST).forecast(pd.Series(0.0, index=index), HORIZONS)
    assert np.all(zeros.yhat == 0.0)


def test_gaps_and_a_missing_last_step_are_bridged_and_counts_stay_nonnegative():
    series = seasonal_series(days=4) - 150  # dips toward 0 at night
    series = series.clip(lower=0)
    series.iloc[200:260] = np.nan
    series.iloc[-1] = np.nan
    path = LoadForecaster(STEP, **FAST).forecast(series, HORIZONS)
    assert np.all(np.isfinite(path.yhat))
    assert np.all(path.lower >= 0)
    irregular = series.dropna().iloc[::2]  # not on the step grid any more, with duplicates removed
    path = LoadForecaster(STEP, **FAST).forecast(irregular, HORIZONS)
    assert np.all(np.isfinite(path.yhat))


def test_a_horizon_between_steps_is_rounded_up_and_bad_input_is_refused():
    series = seasonal_series(days=3)
    forecaster = LoadForecaster(STEP, **FAST)
    path = forecaster.forecast(series, [pd.Timedelta("5min"), pd.Timedelta("10min")])
    assert path.times[0] == series.index[-1] + pd.Timedelta("5min")
    assert path.yhat[0] == path.yhat[1]
    with pytest.raises(ForecastError, match="horizon must be positive"):
        forecaster.forecast(series, [pd.Timedelta(0)])
    with pytest.raises(ForecastError, match="DatetimeIndex"):
        forecaster.forecast(series.reset_index(drop=True), HORIZONS)
    with pytest.raises(ForecastError, match="no values"):
        forecaster.forecast(series * np.nan, HORIZONS)
    with pytest.raises(TypeError, match="unknown LoadForecaster options: bogus"):
        LoadForecaster(STEP, bogus=1)


def test_day_profile_is_the_median_change_at_that_time_of_day_over_the_past_week_and_nothing_later():
    forecaster = LoadForecaster(STEP)  # 7 days, origins 30 minutes (3 steps) either side
    day = 144
    y = np.random.default_rng(3).normal(size=10 * day).cumsum()
    origin = 9 * day + 17
    for k in (6, 36):
        got = forecaster._lags(y, np.array([origin]), np.array([k]))["day_profile"][0]
        want = np.median([y[origin - j * day + o + k] - y[origin - j * day + o]
                          for j in range(1, 8) for o in range(-3, 4)])
        assert got == pytest.approx(want)
    # A day ahead, yesterday's origins after this one's time of day would need values after the origin:
    # they are left out, and changing everything after the origin changes nothing.
    later = y.copy()
    later[origin + 1:] += 1000
    a = forecaster._lags(y, np.array([origin]), np.array([day]))["day_profile"][0]
    assert forecaster._lags(later, np.array([origin]), np.array([day]))["day_profile"][0] == a
    want = np.median([y[origin - j * day + o + day] - y[origin - j * day + o]
                      for j in range(1, 8) for o in range(-3, 4) if j > 1 or o <= 0])
    assert a == pytest.approx(want)
    # With no day of history there is nothing to summarise: 0, not NaN.
    assert forecaster._lags(y, np.array([day - 5]), np.array([6]))["day_profile"][0] == 0.0
    with pytest.raises(ValueError, match="profile_stat must be 'median' or 'mean'"):
        LoadForecaster(STEP, profile_stat="mode")
    with pytest.raises(ValueError, match="profile_days must be at least 1"):
        LoadForecaster(STEP, profile_days=0)


def square_wave_series(days: int = 8, seed: int = 11) -> pd.Series:
    """Load that steps from 100 to 260 GPUs at 08:00 and back at 20:00 every day, with AR(1) noise: a
    daily shape with corners, which the day's past changes carry directly."""
    index = pd.date_range("2024-03-04", periods=days * 144, freq=STEP)
    hour = index.hour + index.minute / 60
    return pd.Series(np.where((hour >= 8) & (hour < 20), 260.0, 100.0) + ar1_noise(len(index), seed), index=index)


def test_the_day_profile_alone_forecasts_a_daily_shape_without_prophet_features():
    series = square_wave_series()
    kwargs = {"train_end": series.index[0] + pd.Timedelta("6D"), "test_end": series.index[-1],
              "horizons": HORIZONS, **FAST}
    with_profile = backtest(series, candidates=[("latest", "reversion", "day_profile")], **kwargs)
    without = backtest(series, candidates=[("latest", "reversion")], **kwargs)
    six = with_profile["horizons"]["6h"]
    # Persistence is off by the whole 160-GPU step for half of the 6-hour forecasts.
    assert six["mae_persistence"] > 60
    assert six["mae"] < 0.35 * six["mae_persistence"]
    assert without["horizons"]["6h"]["mae"] > 0.8 * six["mae_persistence"]


def noise_shift_series(before_sd: float, after_sd: float, days: int = 6, seed: int = 5) -> pd.Series:
    """A flat load of 200 GPUs with white noise whose scale changes from `before_sd` to `after_sd` for the
    last two days: errors after the change are not like those the bands were calibrated on."""
    rng = np.random.default_rng(seed)
    index = pd.date_range("2024-03-04", periods=days * 144, freq=STEP)
    sd = np.where(np.arange(len(index)) < (days - 2) * 144, before_sd, after_sd)
    return pd.Series(200.0 + sd * rng.normal(size=len(index)), index=index)


# No Prophet (its seasons are not what these tests are about) and one fit only, before the change.
NO_SEASONS_ONE_FIT = {**FAST, "min_daily_history": "30D", "min_weekly_history": "30D",
                      "refit_every": pd.Timedelta("30D")}


def band_coverage(series: pd.Series, tracking: float) -> float:
    """Coverage of the one-step bands over the last day, forecast from every origin of the last two days
    by a forecaster fitted once, before the change."""
    forecaster = LoadForecaster(STEP, band_tracking=tracking, **NO_SEASONS_ONE_FIT)
    n = len(series)
    inside = [path.lower[0] <= series.iloc[origin + 1] <= path.upper[0]
              for origin, path in rolling_forecasts(forecaster, series, range(n - 2 * 144 - 1, n - 1), [STEP])
              if origin + 1 >= n - 144]
    assert forecaster.refits == 1
    assert len(inside) == 144
    return float(np.mean(inside))


def test_tracked_bands_recover_80_percent_coverage_when_the_errors_grow_or_shrink():
    grows = noise_shift_series(2.0, 6.0)
    assert band_coverage(grows, tracking=0.0) < 0.5   # the bands of the quiet days cover a third of the noisy ones
    assert 0.72 <= band_coverage(grows, tracking=0.05) <= 0.88
    shrinks = noise_shift_series(6.0, 2.0)
    assert band_coverage(shrinks, tracking=0.0) > 0.97   # bands three times too wide
    assert 0.72 <= band_coverage(shrinks, tracking=0.05) <= 0.88


def test_band_tracking_only_moves_the_bands_and_survives_dump_and_load():
    series = noise_shift_series(2.0, 6.0)
    cut = len(series) - 2 * 144
    fixed = LoadForecaster(STEP, band_tracking=0.0, **NO_SEASONS_ONE_FIT)
    tracked = LoadForecaster(STEP, band_tracking=0.05, **NO_SEASONS_ONE_FIT)
    for end in range(cut, len(series) + 1, 6):
        a = fixed.forecast(series.iloc[:end], HORIZONS)
        b = tracked.forecast(series.iloc[:end], HORIZONS)
        np.testing.assert_array_equal(a.yhat, b.yhat)   # the forecast itself does not change
    # The noise tripled: wider at every horizon (slower the longer the horizon, whose errors come later).
    assert np.all(b.upper - b.lower > 1.5 * (a.upper - a.lower))
    assert tracked.tracked_origin == series.index[-1]
    again = LoadForecaster.load(json.loads(json.dumps(tracked.dump(include_model=False))))
    assert again.tracking == tracked.tracking
    np.testing.assert_array_equal(again.forecast(series, HORIZONS).upper, tracked.forecast(series, HORIZONS).upper)
    # Asked about an earlier origin, it forgets offsets learnt from later errors.
    tracked.forecast(series.iloc[:cut], HORIZONS)
    assert tracked.tracked_origin == series.index[cut - 1]
    assert tracked.tracking == {}


def test_each_error_is_scored_against_the_band_issued_with_its_forecast():
    index = pd.date_range("2024-03-04", periods=10, freq=STEP)
    history = pd.Series([200.0] * 9 + [202.5], index=index)
    forecaster = LoadForecaster(STEP)
    forecaster.calibration = {1: {"beta": [0.0] * 7, "q": [-1.0, 1.0]}}   # persistence, band +-1 (width 2)
    forecaster.tracking = {1: [1.0, 1.0]}   # today's band: +-3
    first_step = index[0].value // STEP.value
    forecaster.issued = {1: [[first_step, 0.0, 0.0]]}   # the band issued with the forecast: +-1
    # The forecast from the 9th point, 200, missed 202.5 by 2.5: outside the issued band, inside today's.
    forecaster._score(history, None, np.array([8]), np.array([1]), first_step)
    low, high = forecaster.tracking[1]
    assert high == pytest.approx(1.0 + 0.05 * (1 - 0.1))   # a miss on the upper side: out
    assert low == pytest.approx(1.0 - 0.05 * 0.1)           # no miss below: in a little


def test_a_margin_with_a_reference_horizon_grows_as_the_square_root_of_the_horizon():
    series = square_wave_series()   # the day profile beats persistence at 6 h by about two thirds
    six_hours = int(pd.Timedelta("6h") / STEP)
    flat = LoadForecaster(STEP, margin=0.2, **FAST)
    flat.update(series, horizons=HORIZONS)
    assert flat.calibration[six_hours]["features"]   # 20 % is not too much to ask at 6 h
    growing = LoadForecaster(STEP, margin=0.2, margin_reference="10min", **FAST)
    growing.update(series, horizons=HORIZONS)
    assert growing.calibration[six_hours]["features"] == []   # 20 % x sqrt(36) = 120 %: nothing passes
    assert growing.calibration[1]["features"] == flat.calibration[1]["features"]   # the same at 10 min


def test_the_track_record_scores_the_targets_that_came_in_as_a_backtest_would():
    series = seasonal_series(days=8)
    forecaster = LoadForecaster(STEP, **NO_SEASONS_ONE_FIT)
    cut = len(series) - 2 * 144
    paths = {end - 1: forecaster.forecast(series.iloc[:end], HORIZONS) for end in range(cut, len(series) + 1)}
    assert forecaster.refits == 1
    record = forecaster.track_record()
    assert set(record) == {"10min", "1h", "6h"}
    fit, last, truth = cut - 1, len(series) - 1, series.to_numpy()
    targets = range(fit + 1, last + 1)   # every target after the fit, as they came in
    for j, (label, k) in enumerate((("10min", 1), ("1h", 6), ("6h", 36))):
        scores = record[label]
        assert scores["scored"] == len(targets)
        persistence = np.mean([abs(truth[t] - truth[t - k]) for t in targets])
        assert scores["mae_persistence"] == pytest.approx(persistence, abs=1e-4)
        # Against the forecasts this loop issued. The first k targets came from origins before the fit,
        # which the record scores with the fitted correction and no band offset: at 10 min and 1 h they
        # are 1 and 5 of 288 targets, so the numbers agree closely; at 6 h, 35 of them (a quarter of a
        # day, all at one time of day), so only roughly.
        issued = [t for t in targets if t - k >= fit]
        mae = np.mean([abs(truth[t] - paths[t - k].yhat[j]) for t in issued])
        covered = np.mean([paths[t - k].lower[j] <= truth[t] <= paths[t - k].upper[j] for t in issued])
        close = k < 36
        assert scores["mae"] == pytest.approx(mae, rel=0.03 if close else 0.15)
        assert scores["coverage"] == pytest.approx(covered, abs=0.03 if close else 0.08)
        assert scores["ratio_to_persistence"] == pytest.approx(scores["mae"] / scores["mae_persistence"], abs=1e-3)
        assert scores["since"] == "2024-03-10T00:00:00"
    # The record survives dump and load; days past `record_days` fall out of it.
    again = LoadForecaster.load(json.loads(json.dumps(forecaster.dump(include_model=False))))
    assert again.track_record() == record
    short = LoadForecaster(STEP, record_days=1, **NO_SEASONS_ONE_FIT)
    for end in range(cut, len(series) + 1, 3):
        short.forecast(series.iloc[:end], HORIZONS)
    assert short.track_record()["1h"]["since"] == "2024-03-11T00:00:00"
    assert short.track_record()["1h"]["scored"] < record["1h"]["scored"]
