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
FOUR = ["seasonal", "latest", "yesterday", "reversion"]


def without(name: str) -> list[list[str]]:
    return [[f for f in c if f != name] for c in CHOSEN]


CONFIGS: dict[str, dict[str, Any]] = {
    "chosen (defaults)": {},
    "persistence (no correction)": {"candidates": []},
    "one set: seasonal, latest, yesterday, reversion": {"candidates": [FOUR]},
    "one set: seasonal, latest, yesterday": {"candidates": [CHOSEN[0]]},
    "one set: seasonal": {"candidates": [["seasonal"]]},
    "without latest": {"candidates": without("latest")},
    "without yesterday": {"candidates": without("yesterday")},
    "without seasonal": {"candidates": without("seasonal")},
    "plus last_week": {"candidates": [[*c, "last_week"] for c in CHOSEN]},
    "plus a set with reversion_long (3 days)": {"candidates": [*CHOSEN, [*FOUR, "reversion_long"]]},
    "reversion toward the last 6 h (not the last day)": {"reversion_window": "6h"},
    "plus a set with reversion_long toward the last 6 h": {"candidates": [*CHOSEN, [*FOUR, "reversion_long"]],
                                                           "long_reversion_window": "6h"},
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
                              "coverage80": {h: m["coverage80"] for h, m in result["horizons"].items()}}
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
    return summary


if __name__ == "__main__":
    raise SystemExit(main())
