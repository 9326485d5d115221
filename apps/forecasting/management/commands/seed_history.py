"""Give a fresh DeepOpt a realistic load history so the charts and the forecast mean something at once.

The history is the real Helios "Earth" cluster (apps/forecasting/data/, made by
scripts/make_demo_history.py): four weeks of its running and pending GPUs as shares of its size,
scaled to this cluster's GPUs, shifted by whole weeks so that weekdays and hours line up with now,
and written as 10-minute points of the cluster's allocated and queued series. It does nothing when
the cluster series already has points (a second `make run`), unless --force.
"""
from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pandas as pd
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django.utils import timezone

from apps.cluster.models import Gpu

from ...models import SeriesPoint
from ...series import ALLOCATED, QUEUED, SeriesBook, floor_time

DATA = Path(__file__).resolve().parents[2] / "data" / "helios-earth-demo.csv.gz"
WEEK = pd.Timedelta(days=7)


class Command(BaseCommand):
    help = "Seed four weeks of realistic cluster load history (derived from real data) if there is none."

    def add_arguments(self, parser) -> None:  # noqa: ANN001
        parser.add_argument("--days", type=int, default=28)
        parser.add_argument("--gpus", type=int, help="Scale to this many GPUs (default: the registered GPUs).")
        parser.add_argument("--force", action="store_true", help="Replace the existing history.")

    def handle(self, *args, days: int, gpus: int | None, force: bool, **options) -> None:  # noqa: ANN002, ANN003
        if not 1 <= days <= 28:
            raise CommandError("--days must be 1 to 28 (the shipped history has 31 days)")
        capacity = gpus if gpus is not None else Gpu.objects.count()
        if capacity < 1:
            raise CommandError("no GPUs registered: register a node first or pass --gpus")
        book = SeriesBook()
        allocated = book.get("cluster", ALLOCATED)
        queued = book.get("cluster", QUEUED)
        if allocated.points.exists() and not force:
            self.stdout.write("history already present; nothing seeded (use --force to replace it)")
            return
        data = pd.read_csv(DATA, parse_dates=["time"], index_col="time")
        now = pd.Timestamp(floor_time(timezone.now(), 600)).tz_convert(None)
        # Shift by whole weeks so the shipped days end at or just after now (up to a week later); the
        # window before now then holds 24 to 31 days of it, with weekdays and hours where they were.
        weeks = -int(-(now - data.index[-1]) // WEEK)
        shifted = data.set_axis(data.index + weeks * WEEK)
        shifted = shifted[(shifted.index > now - pd.Timedelta(days=days)) & (shifted.index <= now)]
        points = []
        for ts, row in shifted.iterrows():
            when = ts.tz_localize("UTC").to_pydatetime()
            points.append(SeriesPoint(series=allocated, resolution_s=600, ts=when,
                                      value=round(min(1.0, row.running_share) * capacity, 2)))
            points.append(SeriesPoint(series=queued, resolution_s=600, ts=when,
                                      value=round(row.pending_share * capacity, 2)))
        with transaction.atomic():
            if force:
                SeriesPoint.objects.filter(series__in=[allocated, queued]).delete()
            SeriesPoint.objects.bulk_create(points, batch_size=2000)
        span = (shifted.index[-1] - shifted.index[0]) + timedelta(minutes=10) if len(shifted) else timedelta(0)
        self.stdout.write(f"seeded {len(points)} points ({span.days} days, scaled to {capacity} GPUs) "
                          f"from {DATA.name}")
