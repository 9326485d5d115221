"""What a sign-in refused by django-axes (too many failures for a username from one address) answers.

The API gets a 429 with a JSON `detail` and Retry-After; a page gets the sign-in form again, with the
reason. settings.AXES_LOCKOUT_CALLABLE points here; AxesMiddleware calls it for the login page and the
admin's, and TokenView for the API (DRF keeps axes' flag on its own request object, which the
middleware does not see).
"""
from __future__ import annotations

from django.conf import settings
from django.contrib.auth.forms import AuthenticationForm
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render


def lockout_message() -> tuple[str, int]:
    seconds = int(settings.AXES_COOLOFF_TIME.total_seconds())
    return (f"Too many failed sign-ins for this username from your address: try again in "
            f"{max(1, round(seconds / 60))} minutes.", seconds)


def lockout_response(request: HttpRequest, original_response: HttpResponse | None = None,
                     credentials: dict | None = None) -> HttpResponse:
    message, seconds = lockout_message()
    if request.path.startswith("/api/"):
        return JsonResponse({"detail": message}, status=429, headers={"Retry-After": str(seconds)})
    username = (credentials or {}).get("username") or request.POST.get("username", "")
    form = AuthenticationForm(request, initial={"username": username})
    response = render(request, "registration/login.html",
                      {"form": form, "lockout": message, "next": request.POST.get("next", "")}, status=429)
    response["Retry-After"] = str(seconds)
    return response
