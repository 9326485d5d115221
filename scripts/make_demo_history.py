"""Make apps/forecasting/data/helios-earth-demo.csv.gz, the demo history that `seed_history` loads.

It is the real Helios "Earth" cluster of May 2020 (S-Lab HeliosArtifact, MIT; Hu et al., SC'21),
summed over its 16 tenants and averaged to 10 minutes: running and pending GPUs as shares of the
cluster's GPUs, so the seed can scale them to whatever cluster it lands on.

    python scripts/make_demo_history.py [../shared/data/metrics/helios-earth-2020-05]
"""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT.parent / "shared" / "data" / "metrics" / "helios-earth-2020-05"
OUT = ROOT / "apps" / "forecasting" / "data" / "helios-earth-demo.csv.gz"


def main() -> int:
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else SOURCE
    files = sorted(source.glob("*.csv.gz"))
    if not files:
        print(f"no tenant files (*.csv.gz) in {source}", file=sys.stderr)
        return 2
    frames = [pd.read_csv(f, parse_dates=["time"], index_col="time") for f in files]
    total = sum(f[["running_gpu_num", "pending_gpu_num", "total_gpu_num"]] for f in frames)
    tenmin = total.resample("10min").mean().dropna()
    capacity = tenmin["total_gpu_num"].max()
    out = pd.DataFrame({
        "running_share": (tenmin["running_gpu_num"] / capacity).round(4),
        "pending_share": (tenmin["pending_gpu_num"] / capacity).round(4),
    })
    out.index.name = "time"
    OUT.parent.mkdir(parents=True, exist_ok=True)
    out.to_csv(OUT, compression={"method": "gzip", "mtime": 0})
    print(f"{OUT.relative_to(ROOT)}: {len(out)} rows from {len(files)} tenants, {capacity:.0f} GPUs at most")
    return 0


if __name__ == "__main__":
    sys.exit(main())
