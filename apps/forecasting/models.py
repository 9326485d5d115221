"""Load series, their forecasts, and the autoscaler's decisions.

A `Series` is one quantity over time for one scope: allocated GPUs, GPU utilization or queued GPU
demand, for the whole cluster, one rack or one team. `SeriesPoint` rows hold its values at three
resolutions (1 minute, 10 minutes, 1 hour): the minute roll-up writes 1-minute points, and the
downsampler folds old points into coarser ones and deletes what is past retention, so a series
costs a bounded number of rows. Team series are visible to that team only; cluster and rack series
are aggregates and visible to everyone signed in.
"""
from __future__ import annotations

from django.core.exceptions import ValidationError
from django.db import models

from apps.accounts.models import Team
from apps.cluster.models import GpuNode


class SeriesQuerySet(models.QuerySet):
    def visible_to(self, user) -> SeriesQuerySet:  # noqa: ANN001
        """Cluster and rack series are aggregates, open to everyone signed in; team series to the team."""
        if user.is_staff:
            return self
        from apps.accounts.permissions import team_ids_of

        return self.filter(models.Q(scope__in=["cluster", "rack"]) | models.Q(team_id__in=team_ids_of(user)))


class Series(models.Model):
    class Scope(models.TextChoices):
        CLUSTER = "cluster", "Cluster"
        RACK = "rack", "Rack"
        TEAM = "team", "Team"

    class Metric(models.TextChoices):
        ALLOCATED_GPUS = "allocated_gpus", "Allocated GPUs"
        GPU_UTILIZATION = "gpu_utilization", "GPU utilization (%)"
        QUEUED_GPUS = "queued_gpus", "Queued GPU demand"

    key = models.CharField(max_length=120, unique=True, help_text="scope:name:metric, e.g. cluster:all:allocated_gpus")
    scope = models.CharField(max_length=8, choices=Scope.choices)
    metric = models.CharField(max_length=20, choices=Metric.choices)
    rack = models.CharField(max_length=63, blank=True)
    team = models.ForeignKey(Team, null=True, blank=True, on_delete=models.CASCADE, related_name="series")
    created_at = models.DateTimeField(auto_now_add=True)

    objects = SeriesQuerySet.as_manager()

    class Meta:
        ordering = ["scope", "key"]
        verbose_name_plural = "series"

    def __str__(self) -> str:
        return self.key

    @property
    def label(self) -> str:
        where = {"cluster": "Cluster", "rack": f"Rack {self.rack}",
                 "team": f"Team {self.team.name}" if self.team_id else "Team"}[self.scope]
        return f"{where}: {self.get_metric_display()}"


class SeriesPoint(models.Model):
    """One value of a series at one resolution; `ts` is the start of its bucket (UTC)."""

    RESOLUTIONS = (60, 600, 3600)

    series = models.ForeignKey(Series, on_delete=models.CASCADE, related_name="points")
    resolution_s = models.PositiveIntegerField(default=60)
    ts = models.DateTimeField()
    value = models.FloatField()

    class Meta:
        ordering = ["ts"]
        constraints = [
            models.UniqueConstraint(fields=["series", "resolution_s", "ts"], name="one_point_per_bucket"),
        ]

    def __str__(self) -> str:
        return f"{self.series_id}@{self.resolution_s}s {self.ts:%Y-%m-%d %H:%M} = {self.value:g}"


class ForecasterState(models.Model):
    """The fitted forecaster of one series (its Prophet model and residual correction), cached between
    refreshes so that the expensive Prophet fit runs on a schedule, not on every forecast."""

    series = models.OneToOneField(Series, on_delete=models.CASCADE, related_name="forecaster")
    state = models.JSONField()
    fitted_at = models.DateTimeField()
    fit_seconds_total = models.FloatField(default=0.0)
    refits = models.PositiveIntegerField(default=0)

    def __str__(self) -> str:
        return f"forecaster of {self.series_id}"


class Forecast(models.Model):
    """One forecast path from one origin: `points` is [[iso time, yhat, lower80, upper80], ...]."""

    series = models.ForeignKey(Series, on_delete=models.CASCADE, related_name="forecasts")
    created_at = models.DateTimeField(auto_now_add=True)
    origin = models.DateTimeField()
    step_s = models.PositiveIntegerField()
    method = models.CharField(max_length=80)
    points = models.JSONField()
    compute_s = models.FloatField(default=0.0, help_text="Seconds this forecast took, a refit included.")
    refitted = models.BooleanField(default=False)
    track_record = models.JSONField(
        default=dict, blank=True,
        help_text="How this series' forecasts did over the last days, by horizon (LoadForecaster.track_record).")

    class Meta:
        ordering = ["-origin"]
        indexes = [models.Index(fields=["series", "-origin"], name="forecast_series_origin")]
        get_latest_by = "origin"

    def __str__(self) -> str:
        return f"{self.series_id} from {self.origin:%Y-%m-%d %H:%M}"

    def peak(self, within_s: int, *, band: str = "yhat") -> float | None:
        """The largest forecast value (or band edge) within `within_s` seconds of the origin."""
        column = {"yhat": 1, "lower": 2, "upper": 3}[band]
        values = [p[column] for p in self.points[: max(1, within_s // self.step_s)]]
        return max(values) if values else None


class AutoscalerPolicy(models.Model):
    """The autoscaler's switch and thresholds: one row, edited in the admin or by staff on the dashboard."""

    enabled = models.BooleanField(default=True)
    scale_up_at = models.FloatField(
        default=0.8, help_text="Bring standby nodes back above this share of active capacity.")
    scale_down_below = models.FloatField(
        default=0.5, help_text="Drain a node when the forecast stays below this share.")
    horizon_minutes = models.PositiveIntegerField(default=10)
    below_for_minutes = models.PositiveIntegerField(
        default=30, help_text="Hysteresis: the forecast must have stayed low this long before a node is drained.")
    cooldown_minutes = models.PositiveIntegerField(default=15, help_text="No scale-down this soon after any change.")
    min_active_nodes = models.PositiveIntegerField(default=1)
    webhook_url = models.URLField(blank=True, help_text="Each decision is POSTed here as JSON (optional).")
    low_since = models.DateTimeField(null=True, blank=True, editable=False)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "autoscaler policy"
        verbose_name_plural = "autoscaler policy"

    def __str__(self) -> str:
        return "autoscaler " + ("on" if self.enabled else "off")

    def clean(self) -> None:
        if not 0 < self.scale_down_below < self.scale_up_at <= 1:
            raise ValidationError({"scale_down_below": "Need 0 < scale-down share < scale-up share <= 1."})

    @classmethod
    def current(cls) -> AutoscalerPolicy:
        """The policy row, or the defaults (unsaved: reading a page must not write) before anyone set it."""
        return cls.objects.filter(pk=1).first() or cls(pk=1)


class ScalingDecisionQuerySet(models.QuerySet):
    def visible_to(self, user) -> ScalingDecisionQuerySet:  # noqa: ANN001
        """Staff see every decision; others those about their teams' nodes."""
        if user.is_staff:
            return self
        from apps.accounts.permissions import team_ids_of

        return self.filter(node__team_id__in=team_ids_of(user))


class ScalingDecision(models.Model):
    class Action(models.TextChoices):
        ACTIVATE = "activate", "Bring back from standby"
        STANDBY = "standby", "Drain to standby"

    created_at = models.DateTimeField(auto_now_add=True)
    action = models.CharField(max_length=10, choices=Action.choices)
    node = models.ForeignKey(GpuNode, null=True, on_delete=models.SET_NULL, related_name="scaling_decisions")
    node_name = models.CharField(max_length=63)
    reason = models.CharField(max_length=300)
    forecast = models.ForeignKey(Forecast, null=True, on_delete=models.SET_NULL, related_name="decisions")
    forecast_peak = models.FloatField()
    active_capacity = models.PositiveIntegerField()
    webhook_status = models.CharField(max_length=80, blank=True)

    objects = ScalingDecisionQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.action} {self.node_name} at {self.created_at:%Y-%m-%d %H:%M}"
