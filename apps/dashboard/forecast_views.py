"""The forecasts page (every series the user may see, with its forecast and bands; the autoscaler's
decisions) and the staff-only autoscaler switch."""
from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from apps.forecasting.models import AutoscalerPolicy

from .load import all_charts, autoscaler_policy, recent_decisions


@login_required
def forecasts(request: HttpRequest) -> HttpResponse:
    policy = autoscaler_policy()
    return render(request, "dashboard/forecasts.html", {
        "charts": all_charts(request.user, policy),
        "decisions": recent_decisions(request.user, limit=50),
        "autoscaler": policy,
    })


@login_required
@require_POST
def autoscaler_switch(request: HttpRequest) -> HttpResponse:
    if not request.user.is_staff:
        raise PermissionDenied
    enabled = request.POST.get("enabled")
    if enabled not in ("on", "off"):
        messages.error(request, "Choose on or off.")
        return redirect("forecasts")
    policy, _ = AutoscalerPolicy.objects.update_or_create(pk=1, defaults={"enabled": enabled == "on"})
    messages.success(request, f"The autoscaler is {'on' if policy.enabled else 'off'}.")
    return redirect("forecasts")
