"""Every REST endpoint under /api/v1/, as DESIGN.md §3 names them."""
from django.urls import include, path
from rest_framework.routers import DefaultRouter

from apps.accounts.api.views import MeView, TeamViewSet, TokenView, UserViewSet
from apps.cluster.api.views import NodeViewSet
from apps.scheduling.api.queue import QueueViewSet
from apps.scheduling.api.views import JobViewSet

router = DefaultRouter()
router.register("teams", TeamViewSet, basename="team")
router.register("users", UserViewSet, basename="user")
router.register("nodes", NodeViewSet, basename="node")
router.register("jobs", JobViewSet, basename="job")
router.register("queue", QueueViewSet, basename="queue")

urlpatterns = [
    path("auth/token/", TokenView.as_view(), name="api-token"),
    path("me/", MeView.as_view(), name="api-me"),
    path("", include(router.urls)),
]
