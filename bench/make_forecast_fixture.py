"""Make tests/fixtures/helios-earth-sample.csv from the real data (issue 7's forecaster tests).

    .venv/bin/python bench/make_forecast_fixture.py

The fixture is the per-minute cluster sum (over the 16 tenant files) of running_gpu_num and
pending_gpu_num of ../shared/data/metrics/helios-earth-2020-05/ from 2020-05-16 00:00 to
2020-05-21 23:59 (six days, 8640 rows), so the tests run the command on real data without ../shared.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "metrics" / "helios-earth-2020-05"
TARGET = ROOT / "tests" / "fixtures" / "helios-earth-sample.csv"
START, END = "2020-05-16 00:00", "2020-05-21 23:59"


def main() -> int:
    files = sorted(DATA.glob("*.csv.gz"))
    if not files:
        print(f"{DATA} is missing: nothing to make", file=sys.stderr)
        return 1
    frames = [pd.read_csv(f, parse_dates=["time"]).set_index("time") for f in files]
    total = sum(f[["running_gpu_num", "pending_gpu_num"]] for f in frames).loc[START:END]
    total.reset_index().to_csv(TARGET, index=False, date_format="%Y-%m-%d %H:%M:%S")
    print(f"{TARGET.relative_to(ROOT)}: {len(total)} rows from {len(files)} tenants, {TARGET.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
