"""Every REST endpoint under /api/v1/, as DESIGN.md §3 names them."""
from django.urls import include, path, re_path
from rest_framework.routers import DefaultRouter

from apps.accounts.api.views import MeView, TeamViewSet, TokenView, UserViewSet
from apps.cluster.api.agent import AgentHeartbeatView, AgentOfflineView, AgentRegisterView
from apps.cluster.api.views import NodeViewSet
from apps.forecasting.api.views import ForecastViewSet, ScalingDecisionViewSet
from apps.scheduling.api.agent import (
    AgentArtifactView,
    AgentAttemptsStatusView,
    AgentAttemptStatusView,
    AgentModelWeightsView,
    AgentProgressView,
    AgentResultView,
)
from apps.scheduling.api.artifacts import JobArtifactDownloadView, JobArtifactListView
from apps.scheduling.api.queue import QueueViewSet
from apps.scheduling.api.uploads import ModelUploadViewSet
from apps.scheduling.api.usage import UsageViewSet
from apps.scheduling.api.views import JobViewSet

router = DefaultRouter()
router.register("teams", TeamViewSet, basename="team")
router.register("users", UserViewSet, basename="user")
router.register("nodes", NodeViewSet, basename="node")
router.register("jobs", JobViewSet, basename="job")
router.register("models", ModelUploadViewSet, basename="model-upload")
router.register("queue", QueueViewSet, basename="queue")
router.register("usage", UsageViewSet, basename="usage")
router.register("forecasts", ForecastViewSet, basename="forecast")
router.register("scaling-decisions", ScalingDecisionViewSet, basename="scaling-decision")

# The agent API (node token only; apps/cluster/authentication.py). The trailing slash is optional:
# agents are not browsers and a POST cannot follow APPEND_SLASH's redirect.
ATTEMPT = r"^agent/jobs/(?P<job_id>[0-9]{1,18})/attempts/(?P<attempt>[0-9]{1,9})"
agent_urls = [
    re_path(r"^agent/register/?$", AgentRegisterView.as_view(), name="agent-register"),
    re_path(r"^agent/heartbeat/?$", AgentHeartbeatView.as_view(), name="agent-heartbeat"),
    re_path(r"^agent/offline/?$", AgentOfflineView.as_view(), name="agent-offline"),
    re_path(r"^agent/attempts/?$", AgentAttemptsStatusView.as_view(), name="agent-attempts"),
    re_path(ATTEMPT + r"/?$", AgentAttemptStatusView.as_view(), name="agent-attempt"),
    re_path(ATTEMPT + r"/progress/?$", AgentProgressView.as_view(), name="agent-progress"),
    re_path(ATTEMPT + r"/result/?$", AgentResultView.as_view(), name="agent-result"),
    re_path(ATTEMPT + r"/artifacts/?$", AgentArtifactView.as_view(), name="agent-artifacts"),
    re_path(ATTEMPT + r"/weights/?$", AgentModelWeightsView.as_view(), name="agent-weights"),
]

urlpatterns = [
    path("auth/token/", TokenView.as_view(), name="api-token"),
    path("me/", MeView.as_view(), name="api-me"),
    *agent_urls,
    # Before the router, whose jobs/{pk}/ route would otherwise not reach these.
    re_path(r"^jobs/(?P<job_id>[0-9]{1,18})/artifacts/$", JobArtifactListView.as_view(), name="job-artifacts"),
    re_path(r"^jobs/(?P<job_id>[0-9]{1,18})/artifacts/(?P<artifact_id>[0-9]{1,18})/$",
            JobArtifactDownloadView.as_view(), name="job-artifact-download"),
    path("", include(router.urls)),
]
