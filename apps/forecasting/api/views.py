"""`/api/v1/forecasts/`: the latest forecast of each series the caller may see, with its recent history.

Cluster and rack series are aggregates and visible to everyone signed in; a team's series only to
its members (and staff). A series outside the caller's teams is a 404, like every other object.
"""
from __future__ import annotations

from datetime import timedelta

from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_field
from rest_framework import mixins, serializers, viewsets
from rest_framework.exceptions import ValidationError
from rest_framework.response import Response

from ..models import Forecast, ScalingDecision, Series
from ..series import history
from ..services import STEP, latest_forecasts


class SeriesSerializer(serializers.ModelSerializer):
    label = serializers.CharField(read_only=True)
    team = serializers.PrimaryKeyRelatedField(read_only=True)
    forecast = serializers.SerializerMethodField()

    class Meta:
        model = Series
        fields = ["id", "key", "label", "scope", "metric", "rack", "team", "forecast"]

    @extend_schema_field(OpenApiTypes.OBJECT)
    def get_forecast(self, series: Series) -> dict | None:
        forecast = getattr(series, "latest", None)
        if forecast is None:
            return None
        return {"origin": forecast.origin, "created_at": forecast.created_at, "method": forecast.method,
                "step_s": forecast.step_s, "compute_s": round(forecast.compute_s, 4), "refitted": forecast.refitted,
                "track_record": forecast.track_record,
                "points": [{"ts": ts, "yhat": y, "lower": lo, "upper": hi} for ts, y, lo, hi in forecast.points]}


class SeriesDetailSerializer(SeriesSerializer):
    history = serializers.SerializerMethodField()

    class Meta(SeriesSerializer.Meta):
        fields = [*SeriesSerializer.Meta.fields, "history"]

    @extend_schema_field(OpenApiTypes.OBJECT)
    def get_history(self, series: Series) -> list[dict]:
        hours = self.context["hours"]
        now = timezone.now()
        data = history(series, step=STEP, since=now - timedelta(hours=hours), until=now).dropna()
        return [{"ts": ts.tz_localize("UTC").isoformat(), "value": round(float(v), 3)} for ts, v in data.items()]


class ScalingDecisionSerializer(serializers.ModelSerializer):
    forecast_origin = serializers.DateTimeField(source="forecast.origin", read_only=True, default=None)

    class Meta:
        model = ScalingDecision
        fields = ["id", "created_at", "action", "node_name", "reason", "forecast_peak", "active_capacity",
                  "forecast_origin", "webhook_status"]


class ForecastViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Series with their latest forecast (5-minute steps to 2 h, then 15 minutes to 24 h, 80% bands).

    `GET /forecasts/{id}/?hours=24` adds the observed history of the last `hours` (1 to 720)."""

    filterset_fields = ["scope", "metric"]
    queryset = Series.objects.none()  # the schema generator's model; requests use get_queryset

    def get_queryset(self):  # noqa: ANN201
        if getattr(self, "swagger_fake_view", False):
            return Series.objects.none()
        return Series.objects.visible_to(self.request.user).select_related("team").order_by("scope", "key")

    def get_serializer_class(self):  # noqa: ANN201
        return SeriesDetailSerializer if self.action == "retrieve" else SeriesSerializer

    def get_serializer_context(self) -> dict:
        context = super().get_serializer_context()
        if self.action != "retrieve":  # only the detail carries history
            return context
        raw = self.request.query_params.get("hours", "24")
        try:
            hours = int(raw)
        except ValueError:
            raise ValidationError({"hours": ["A whole number of hours, 1 to 720."]}) from None
        if not 1 <= hours <= 720:
            raise ValidationError({"hours": ["A whole number of hours, 1 to 720."]})
        context["hours"] = hours
        return context

    def list(self, request, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN201
        page = self.paginate_queryset(self.filter_queryset(self.get_queryset()))
        latest = latest_forecasts([s.pk for s in page])
        for series in page:
            series.latest = latest.get(series.pk)
        return self.get_paginated_response(self.get_serializer(page, many=True).data)

    @extend_schema(parameters=[OpenApiParameter("hours", int, description="History to include, 1 to 720 hours.")])
    def retrieve(self, request, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN201
        series = self.get_object()
        series.latest = Forecast.objects.filter(series=series).order_by("-origin").first()
        return Response(self.get_serializer(series).data)


class ScalingDecisionViewSet(mixins.ListModelMixin, viewsets.GenericViewSet):
    """The autoscaler's decisions, newest first: staff see all, others those about their teams' nodes."""

    serializer_class = ScalingDecisionSerializer
    queryset = ScalingDecision.objects.none()

    def get_queryset(self):  # noqa: ANN201
        if getattr(self, "swagger_fake_view", False):
            return ScalingDecision.objects.none()
        return ScalingDecision.objects.visible_to(self.request.user).select_related("forecast").order_by(
            "-created_at", "-id")
