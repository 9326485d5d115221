"""How far a linear correction of persistence could go on the Helios "Earth" cluster sum: least-absolute-
deviation fits made on the test part itself, and scored on the same part (in-sample), print JSON.

    .venv/bin/python bench/forecast_bound.py > bench/results/forecast-bound-$(date +%F)-cpu$(nproc).json

No forecaster can reach these numbers: each is fitted on the very errors it is scored on. They are an
optimistic bound for the inputs named, which says whether a goal is out of reach of this kind of model
on this data (docs/forecasting.md, "Known limits"). Same data, 10-minute step means and split
(train to 2020-05-22, test to 05-31) as bench/forecast.py; exits 0 with a skip message without
../shared/data.

Inputs, all known at the origin t (y: 10-minute means; k: steps ahead; a day is 144 steps):
  latest      last raw 1-minute sample of the step - y(t)
  reversion   mean of the last day - y(t)
  yesterday   y(t+k-1d) - y(t-1d)
  day_profile median over 7 days and origins +-30 min of the same change (the forecaster's feature)
  intercept   a constant change (the test part's own drift: unknowable at the origin)
  exogenous   the cluster's pending GPUs (last sample, step mean), running jobs, free GPUs, mean of the
              last 6 h, the change over the last step and the last hour
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from apps.forecasting.forecaster import LoadForecaster  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "metrics" / "helios-earth-2020-05"
DAY = 144
TEST = ("2020-05-22", "2020-06-01")


def lad(x: np.ndarray, t: np.ndarray, iterations: int = 50) -> np.ndarray:
    """Plain least absolute deviations by reweighted least squares. Not the forecaster's `_lad`: that
    one has a ridge scaled to the largest input, which on raw counts (free GPUs ~ 300) would hold the
    bound back; a bound should be as optimistic as the inputs allow."""
    beta = np.linalg.lstsq(x, t, rcond=None)[0]
    for _ in range(iterations):
        w = 1.0 / np.maximum(np.abs(t - x @ beta), 1e-3)
        xw = x * w[:, None]
        beta = np.linalg.solve(x.T @ xw + 1e-9 * np.eye(x.shape[1]), xw.T @ t)
    return beta


def main() -> int:
    if not DATA.is_dir():
        print(json.dumps({"skipped": f"{DATA} is missing: the Helios data is not on this machine"}))
        return 0
    began = time.perf_counter()
    frames = [pd.read_csv(f, parse_dates=["time"]).set_index("time") for f in sorted(DATA.glob("*.csv.gz"))]
    total = sum(f[["running_gpu_num", "pending_gpu_num", "total_gpu_num", "running_job_num"]] for f in frames)
    total = total.asfreq("1min")
    raw = total["running_gpu_num"]
    y = raw.resample("10min").mean().ffill()
    last = raw.resample("10min").last().ffill()
    pending_last = total["pending_gpu_num"].resample("10min").last().ffill()
    pending_mean = total["pending_gpu_num"].resample("10min").mean().ffill()
    jobs = total["running_job_num"].resample("10min").last().ffill()
    capacity = total["total_gpu_num"].resample("10min").last().ffill()
    test = (y.index >= TEST[0]) & (y.index < TEST[1])
    sets = {
        "latest": ["latest"],
        "latest, reversion, yesterday": ["latest", "reversion", "yesterday"],
        "latest, reversion, yesterday, day_profile": ["latest", "reversion", "yesterday", "day_profile"],
        "the same and an intercept": ["latest", "reversion", "yesterday", "day_profile", "intercept"],
        "the same and the exogenous inputs": ["latest", "reversion", "yesterday", "day_profile", "intercept",
                                              "pending_last", "pending_mean", "jobs", "free", "reversion_6h",
                                              "change_1", "change_6"],
    }
    out: dict = {"bench": "forecast_bound", "series": "cluster sum of running_gpu_num, helios-earth-2020-05",
                 "test": list(TEST), "step": "10min", "in_sample": True, "horizons": {}}
    for name, k in (("10min", 1), ("1h", 6), ("6h", 36)):
        change = (y.shift(-k) - y).rename("target")
        # yesterday and day_profile exactly as the forecaster computes them (0 where history is short).
        origins = np.arange(len(y))
        lags = LoadForecaster(pd.Timedelta("10min"))._lags(y.to_numpy(), origins, np.full(len(y), k))
        short = origins < 7 * DAY + 3  # not a full week of profile yet: left out
        features = pd.DataFrame({
            "latest": last - y, "reversion": y.rolling(DAY).mean() - y,
            "yesterday": np.where(short, np.nan, lags["yesterday"]),
            "day_profile": np.where(short, np.nan, lags["day_profile"]), "intercept": 1.0,
            "pending_last": pending_last, "pending_mean": pending_mean, "jobs": jobs, "free": capacity - last,
            "reversion_6h": y.rolling(36).mean() - y, "change_1": y - y.shift(1), "change_6": y - y.shift(6),
        })
        keep = test & features.notna().all(axis=1).to_numpy() & change.notna().to_numpy()
        target = change[keep].to_numpy()
        persistence = float(np.mean(np.abs(target)))
        rows = {}
        for label, columns in sets.items():
            x = features.loc[keep, columns].to_numpy()
            rows[label] = round(float(np.mean(np.abs(target - x @ lad(x, target)))) / persistence, 4)
        out["horizons"][name] = {"n": int(keep.sum()), "mae_persistence": round(persistence, 3),
                                 "in_sample_ratio_to_persistence": rows}
    out["wall_s"] = round(time.perf_counter() - began, 1)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
