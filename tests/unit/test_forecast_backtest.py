"""`manage.py forecast_backtest` on a real sample, and its refusals of bad input (exit 2, one line).

tests/fixtures/helios-earth-sample.csv is the per-minute cluster sum of running_gpu_num and
pending_gpu_num of the 16 tenants of ../shared/data/metrics/helios-earth-2020-05/ from 2020-05-16 to
2020-05-21, made by bench/make_forecast_fixture.py.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from django.core.management import CommandError, call_command

from apps.forecasting.backtest import BacktestInputError, load_series, parse_horizons

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "tests" / "fixtures" / "helios-earth-sample.csv"
ARGS = ["--time-col", "time", "--value-col", "running_gpu_num", "--resample", "10min",
        "--train-end", "2020-05-20", "--test-end", "2020-05-21", "--horizons", "10min,1h,6h"]


def run(capsys, *args: str) -> dict:
    call_command("forecast_backtest", *args, "--json")
    out = capsys.readouterr().out.strip()
    assert "\n" not in out
    return json.loads(out)


@pytest.fixture(scope="module")
def result() -> dict:
    import io

    out = io.StringIO()
    call_command("forecast_backtest", str(SAMPLE), *ARGS, "--json", stdout=out)
    return json.loads(out.getvalue())


def test_the_backtest_reports_the_documented_keys_with_sane_values(result):
    assert {"horizons", "fit_s", "wall_s", "n_origins", "refits", "method"} <= set(result)
    assert list(result["horizons"]) == ["10min", "1h", "6h"]
    for name, m in result["horizons"].items():
        assert {"mae", "mape", "mae_persistence", "mae_seasonal_naive", "coverage80", "ratio_to_persistence"} <= set(m)
        # 2020-05-20 and 05-21: two days of 10-minute targets, each forecast from its own origin.
        assert m["n"] == 288, name
        assert 0 < m["mae"] < 200
        assert 0 < m["mae_persistence"] < 200
        assert 0 <= m["coverage80"] <= 1
        assert 0 < m["mape"] < 50
    # Persistence on this sample: the mean step change of the summed running GPUs.
    series, _ = load_series(SAMPLE, "time", "running_gpu_num", pd.Timedelta("10min"))
    test = series.loc["2020-05-20":"2020-05-21"]
    assert result["horizons"]["10min"]["mae_persistence"] == pytest.approx(
        (test - series.shift(1).loc[test.index]).abs().mean(), rel=1e-4)
    # The sample spans six days: seasonal naive is the day before, and so is the season Prophet gets.
    assert result["seasonal_naive"] == "value 1D before the target"
    assert result["method"] == "prophet(daily)+correction"
    # The last raw minute of each step is the freshest observation: 10 minutes ahead beats persistence.
    assert result["horizons"]["10min"]["ratio_to_persistence"] < 1.0
    assert result["n_origins"] == 288 + 36 - 1
    assert result["refits"] >= 2
    assert result["fit_s"] > 0
    assert 0 < result["wall_s"] < 120


def test_without_the_latest_sample_it_is_still_a_backtest(capsys):
    out = run(capsys, str(SAMPLE), *ARGS[:-2], "--horizons", "1h", "--no-latest")
    assert out["latest_sample"] is False
    assert out["horizons"]["1h"]["n"] == 288


def expect_exit_2(*args: str) -> str:
    with pytest.raises(CommandError) as caught:
        call_command("forecast_backtest", *args, "--json")
    assert caught.value.returncode == 2
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_a_missing_column_is_named(tmp_path):
    message = expect_exit_2(str(SAMPLE), *[a if a != "running_gpu_num" else "gpus" for a in ARGS])
    assert "no column 'gpus' (--value-col)" in message
    assert "running_gpu_num" in message  # and the columns that are there
    message = expect_exit_2(str(SAMPLE), "--time-col", "ts", *ARGS[2:])
    assert "no column 'ts' (--time-col)" in message


def test_unparseable_times_are_refused_with_the_line(tmp_path):
    bad = tmp_path / "bad-times.csv"
    bad.write_text("time,v\n2020-05-01 00:00:00,1\nyesterday,2\n2020-05-01 00:02:00,3\n")
    message = expect_exit_2(str(bad), "--value-col", "v", "--train-end", "2020-05-01", "--test-end", "2020-05-02")
    assert "'yesterday'" in message
    assert "line 3" in message


def test_non_numeric_values_are_refused(tmp_path):
    bad = tmp_path / "bad-values.csv"
    bad.write_text("time,v\n2020-05-01 00:00:00,1\n2020-05-01 00:01:00,lots\n")
    message = expect_exit_2(str(bad), "--value-col", "v", "--train-end", "2020-05-01", "--test-end", "2020-05-02")
    assert "'lots'" in message
    assert "line 3" in message


@pytest.mark.parametrize(("option", "value", "says"), [
    ("--horizons", "10min,soon", "--horizons: 'soon' is not a duration"),
    ("--horizons", "15min", "not a whole multiple of the resample step 10min"),
    ("--horizons", "0min", "must be a positive duration"),
    ("--resample", "often", "--resample: 'often' is not a duration"),
    ("--train-end", "May 20th-ish", "--train-end: 'May 20th-ish' is not a date"),
    ("--test-end", "2020-05-19", "is not after --train-end"),
    ("--train-end", "2020-05-01", "leaves no training data"),
    ("--train-end", "2021-01-01", "is not after --train-end"),
])
def test_bad_option_values_are_refused(option, value, says):
    args = list(ARGS)
    args[args.index(option) + 1] = value
    assert says in expect_exit_2(str(SAMPLE), *args)


def test_a_missing_file_is_refused(tmp_path):
    assert "no such file" in expect_exit_2(str(tmp_path / "nope.csv"), *ARGS)


def test_horizons_parse_as_multiples_of_the_step():
    assert parse_horizons("10min, 1h,6h", pd.Timedelta("10min")) == [pd.Timedelta(m, "min") for m in (10, 60, 360)]
    with pytest.raises(BacktestInputError, match="repeats"):
        parse_horizons("1h,60min", pd.Timedelta("10min"))


def test_the_real_command_line_exits_2_with_one_line_on_stderr(tmp_path):
    done = subprocess.run(
        [sys.executable, "manage.py", "forecast_backtest", str(SAMPLE), "--time-col", "time", "--value-col", "gpus",
         "--train-end", "2020-05-20", "--test-end", "2020-05-21", "--json"],
        capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.strip().count("\n") == 0
    assert "no column 'gpus' (--value-col)" in done.stderr
