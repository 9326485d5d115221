"""Which parts of the load forecaster earn their place: the same backtests as bench/forecast.py under
alternative forecaster options, printed as JSON (docs/forecasting.md, "Forecaster and backtest").

    .venv/bin/python bench/forecast_ablation.py --json > bench/results/forecast-ablation-$(date +%F)-cpu$(nproc).json

A Prophet fit depends only on the data up to its refit time, never on the options compared here, so
each fit is made once per (series, refit time) and reused across the configurations (`prophet_fits`
and `prophet_fit_s` in the JSON count the real fits). Everything else is the code of
`manage.py forecast_backtest`. Reads ../shared/data like bench/forecast.py; exits 0 with a skip
message without it.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import forecast as bench  # noqa: E402

from apps.forecasting import forecaster as forecaster_module  # noqa: E402
from apps.forecasting.backtest import backtest, load_series, parse_horizons  # noqa: E402

CHOSEN = [list(c) for c in forecaster_module.DEFAULT_OPTIONS["candidates"]]
# The defaults until 2026-11-30, which the rows of bench/results/forecast-ablation-2026-11-28-cpu2.json
# vary: Prophet's seasons, latest and yesterday, without and then with reversion.
PREVIOUS = [["seasonal", "latest", "yesterday"], ["seasonal", "reversion", "latest", "yesterday"]]
FOUR = ["seasonal", "latest", "yesterday", "reversion"]
NO_PROPHET = ["latest", "reversion", "day_profile"]


def without(name: str, sets: list[list[str]] = CHOSEN) -> list[list[str]]:
    return [[f for f in c if f != name] for c in sets]


def plus(name: str, sets: list[list[str]] = PREVIOUS) -> list[list[str]]:
    return [[*c, name] for c in sets]


CONFIGS: dict[str, dict[str, Any]] = {
    "chosen (defaults)": {},
    "persistence (no correction)": {"candidates": []},
    # Variations of the current defaults (2026-11-30).
    "previous defaults (no day_profile)": {"candidates": PREVIOUS},
    "without the set without Prophet": {"candidates": plus("day_profile")},
    "without day_profile in the Prophet sets": {"candidates": [*PREVIOUS, NO_PROPHET]},
    "day_profile as a mean at the same time of day only": {"profile_stat": "mean", "profile_spread": "0min"},
    "day_profile as a median at the same time of day only": {"profile_spread": "0min"},
    "day_profile over 14 days": {"profile_days": 14},
    "day_profile over 3 days": {"profile_days": 3},
    "without latest": {"candidates": without("latest")},
    "without yesterday": {"candidates": without("yesterday")},
    "only the set without Prophet": {"candidates": [NO_PROPHET]},
    "beat persistence in every fold (fold_wins 1)": {"fold_wins": 1.0},
    "a 5 % margin": {"margin": 0.05},
    # Variations of the previous defaults (the 2026-11-28 table in docs/forecasting.md).
    "previous: one set: seasonal, latest, yesterday, reversion": {"candidates": [FOUR]},
    "previous: one set: seasonal, latest, yesterday": {"candidates": [PREVIOUS[0]]},
    "previous: one set: seasonal": {"candidates": [["seasonal"]]},
    "previous: without latest": {"candidates": without("latest", PREVIOUS)},
    "previous: without yesterday": {"candidates": without("yesterday", PREVIOUS)},
    "previous: without seasonal": {"candidates": without("seasonal", PREVIOUS)},
    "previous: plus last_week": {"candidates": plus("last_week")},
    "previous: plus a set with reversion_long (3 days)": {"candidates": [*PREVIOUS, [*FOUR, "reversion_long"]]},
    "previous: reversion toward the last 6 h (not the last day)": {"candidates": PREVIOUS, "reversion_window": "6h"},
    "previous: plus a set with reversion_long toward the last 6 h": {
        "candidates": [*PREVIOUS, [*FOUR, "reversion_long"]], "long_reversion_window": "6h"},
    "previous: pooled folds only (fold_wins 0)": {"candidates": PREVIOUS, "fold_wins": 0.0},
    "previous: bands without finite-sample widening": {"candidates": PREVIOUS, "finite_sample": False},
    "previous: least squares instead of LAD": {"candidates": PREVIOUS, "loss": "ls"},
    "margin growing as sqrt(horizon) past 1 h": {"margin_reference": "1h"},
    "margin growing as sqrt(horizon) past 10 min": {"margin_reference": "10min"},
    "fixed bands (no band tracking)": {"band_tracking": 0.0},
    "band tracking 0.01 at every horizon": {"band_tracking": 0.01, "tracking_power": 0.0},
    "band tracking 0.03 over sqrt(k)": {"band_tracking": 0.03},
    "band tracking 0.08 over sqrt(k)": {"band_tracking": 0.08},
    "band tracking 0.2 over k": {"band_tracking": 0.2, "tracking_power": 1.0},
    "pooled folds only (fold_wins 0)": {"fold_wins": 0.0},
    "bands without finite-sample widening": {"finite_sample": False},
    "least squares instead of LAD": {"loss": "ls"},
}


class FitMemo:
    """Reuse Prophet's seasonal table for the same data; count and time the real fits."""

    def __init__(self) -> None:
        self.cache: dict[tuple, tuple] = {}
        self.key: tuple = ()
        self.fits = 0
        self.fit_s = 0.0
        self.original = forecaster_module.LoadForecaster._fit_prophet
        memo = self

        def fit(model: forecaster_module.LoadForecaster, history: pd.Series) -> None:
            key = (*memo.key, str(history.index[-1]), str(model.max_history))
            if key in memo.cache:
                model.method, model.season, model.season_anchor, model.season_period = memo.cache[key]
                model.model_json = None
                return
            before = model.fit_seconds
            memo.original(model, history)
            memo.fits += 1
            memo.fit_s += model.fit_seconds - before
            memo.cache[key] = (model.method, model.season, model.season_anchor, model.season_period)

        forecaster_module.LoadForecaster._fit_prophet = fit


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--configs", help="comma-separated subset of the configuration names")
    args = parser.parse_args()
    if not bench.DATA.is_dir():
        message = {"skipped": f"{bench.DATA} is missing: the Helios data is not on this machine"}
        print(json.dumps(message) if args.json else message["skipped"])
        return 0
    wanted = CONFIGS if not args.configs else {k: CONFIGS[k] for k in args.configs.split(",")}
    memo = FitMemo()
    began = time.perf_counter()
    out: dict[str, Any] = {"bench": "forecast_ablation", "horizons": bench.HORIZONS, "configs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "helios-earth-cluster-sum.csv"
        bench.write_cluster_csv(csv)
        runs = bench.series_runs(csv)
        loaded = {}
        for config, options in wanted.items():
            rows = {}
            for name, path, column, split, latest in runs:
                if (path, column) not in loaded:
                    loaded[path, column] = load_series(path, "time", column, bench.STEP)
                series, last = loaded[path, column]
                memo.key = (str(path), column)
                train_end, test_end = bench.SPLITS[split]
                result = backtest(series, train_end=pd.Timestamp(train_end),
                                  test_end=pd.Timestamp(test_end) + pd.Timedelta("1D") - bench.STEP,
                                  horizons=parse_horizons(bench.HORIZONS, bench.STEP),
                                  latest=last if latest else None, **options)
                rows[name] = {"ratios": {h: m["ratio_to_persistence"] for h, m in result["horizons"].items()},
                              "coverage80": {h: m["coverage80"] for h, m in result["horizons"].items()},
                              "band_width": {h: m["band_width"] for h, m in result["horizons"].items()}}
            out["configs"][config] = {"options": options, "series": rows, "summary": _summary(rows)}
            print(f"{config:40s} {json.dumps(out['configs'][config]['summary'])}", file=sys.stderr, flush=True)
    out["prophet_fits"] = memo.fits
    out["prophet_fit_s"] = round(memo.fit_s, 1)
    out["wall_s"] = round(time.perf_counter() - began, 1)
    print(json.dumps(out, indent=1) if args.json else json.dumps({k: v["summary"] for k, v in out["configs"].items()},
                                                                 indent=1))
    return 0


def _summary(rows: dict[str, Any]) -> dict[str, Any]:
    horizons = list(next(iter(rows.values()))["ratios"])
    cluster = [n for n in rows if n.startswith("cluster/running/") and "no-latest" not in n]
    summary: dict[str, Any] = {"cluster_sum_issue_split": rows["cluster/running/issue"]["ratios"],
                               "cluster_sum_issue_split_coverage80": rows["cluster/running/issue"]["coverage80"]}
    for h in horizons:
        ratios = [r["ratios"][h] for r in rows.values()]
        summary[f"{h}_geomean_ratio_all"] = round(math.exp(sum(math.log(x) for x in ratios) / len(ratios)), 4)
        summary[f"{h}_worst_ratio_all"] = max(ratios)
        summary[f"{h}_mean_ratio_cluster_splits"] = round(sum(rows[n]["ratios"][h] for n in cluster) / len(cluster), 4)
        covered = [r["coverage80"][h] for r in rows.values()]
        summary[f"{h}_coverage_in_range_share"] = round(sum(0.75 <= c <= 0.85 for c in covered) / len(covered), 3)
        summary[f"{h}_coverage_mean_abs_error"] = round(sum(abs(c - 0.8) for c in covered) / len(covered), 4)
        summary[f"{h}_coverage_worst_abs_error"] = round(max(abs(c - 0.8) for c in covered), 4)
    return summary


if __name__ == "__main__":
    raise SystemExit(main())
