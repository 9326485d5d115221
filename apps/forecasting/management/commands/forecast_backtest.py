"""`manage.py forecast_backtest SERIES.csv --time-col C --value-col V --resample 10min --train-end T
--test-end T --horizons 10min,1h,6h --json`: rolling-origin backtest of the load forecaster."""
from __future__ import annotations

import json
import time

import pandas as pd
from django.core.management.base import BaseCommand, CommandError, CommandParser

from apps.forecasting.backtest import BacktestInputError, backtest, load_series, parse_horizons, parse_step, parse_time


class Command(BaseCommand):
    help = ("Rolling-origin backtest of the load forecaster on a CSV series: MAE, MAPE, persistence and "
            "seasonal-naive MAE and 80 % band coverage per horizon.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("series", help="CSV with a time column and a numeric value column")
        parser.add_argument("--time-col", default="time", help="time column (ISO times, UTC unless an offset is given)")
        parser.add_argument("--value-col", required=True, help="value column")
        parser.add_argument("--resample", default="10min", help="step of the series (mean of each step)")
        parser.add_argument("--train-end", required=True, help="first test time; a bare date means its midnight")
        parser.add_argument("--test-end", required=True, help="last test time; a bare date includes that whole day")
        parser.add_argument("--horizons", default="10min,1h,6h", help="comma-separated multiples of the step")
        parser.add_argument("--refit-every", default="1D", help="Prophet refit schedule (default 1D)")
        parser.add_argument("--max-history", default="28D", help="Prophet fits on at most this much data")
        parser.add_argument("--no-latest", action="store_true",
                            help="ignore the last raw sample inside each step (use the step means only)")
        parser.add_argument("--json", action="store_true", help="print one JSON object")

    def handle(self, *args, **options) -> None:
        began = time.perf_counter()
        try:
            step = parse_step(options["resample"])
            horizons = parse_horizons(options["horizons"], step)
            train_end, _ = parse_time(options["train_end"], "--train-end")
            test_end, bare = parse_time(options["test_end"], "--test-end")
            if bare:
                test_end = test_end + pd.Timedelta("1D") - step  # the last step that starts on that day
            if test_end <= train_end:
                raise BacktestInputError(
                    f"--test-end {options['test_end']} is not after --train-end {options['train_end']}")
            refit_every = parse_step(options["refit_every"], "--refit-every")
            max_history = parse_step(options["max_history"], "--max-history")
            series, latest = load_series(options["series"], options["time_col"], options["value_col"], step)
            result = backtest(series, train_end=train_end, test_end=test_end, horizons=horizons,
                              latest=None if options["no_latest"] else latest,
                              refit_every=refit_every, max_history=max_history)
        except BacktestInputError as exc:
            raise CommandError(str(exc), returncode=2) from None
        result["series"] = {"file": str(options["series"]), "value_col": options["value_col"],
                            "points": int(series.notna().sum()), "start": str(series.index[0]),
                            "end": str(series.index[-1])}
        result["wall_s"] = round(time.perf_counter() - began, 3)
        if options["json"]:
            self.stdout.write(json.dumps(result))
            return
        self.stdout.write(f"{result['method']}: {result['n_origins']} origins, {result['refits']} refits, "
                          f"Prophet fits {result['fit_s']:.1f} s, wall {result['wall_s']:.1f} s")
        for name, m in result["horizons"].items():
            if not m.get("n"):
                self.stdout.write(f"{name:>6}: no targets")
                continue
            self.stdout.write(
                f"{name:>6}: MAE {m['mae']:.3f} (persistence {m['mae_persistence']:.3f}, ratio "
                f"{m['ratio_to_persistence']}; seasonal naive {m['mae_seasonal_naive']}), "
                f"80% coverage {m['coverage80']:.3f}, n {m['n']}")
