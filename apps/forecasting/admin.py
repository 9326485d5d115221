from django.contrib import admin

from .models import AutoscalerPolicy, Forecast, ScalingDecision, Series


@admin.register(Series)
class SeriesAdmin(admin.ModelAdmin):
    list_display = ["key", "scope", "metric", "rack", "team"]
    list_filter = ["scope", "metric"]
    search_fields = ["key"]


@admin.register(Forecast)
class ForecastAdmin(admin.ModelAdmin):
    list_display = ["series", "origin", "method", "compute_s", "refitted"]
    list_filter = ["refitted", "series__scope"]
    readonly_fields = [f.name for f in Forecast._meta.fields]


@admin.register(AutoscalerPolicy)
class AutoscalerPolicyAdmin(admin.ModelAdmin):
    list_display = ["__str__", "scale_up_at", "scale_down_below", "min_active_nodes", "updated_at"]

    def has_add_permission(self, request) -> bool:  # noqa: ANN001
        return not AutoscalerPolicy.objects.exists()  # one row: the policy


@admin.register(ScalingDecision)
class ScalingDecisionAdmin(admin.ModelAdmin):
    list_display = ["created_at", "action", "node_name", "forecast_peak", "active_capacity", "webhook_status"]
    list_filter = ["action"]
    readonly_fields = [f.name for f in ScalingDecision._meta.fields]

    def has_add_permission(self, request) -> bool:  # noqa: ANN001
        return False
