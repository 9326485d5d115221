from django.contrib.auth import views as auth_views
from django.urls import path

from . import forecast_views, views

# Page names are short and distinct from the API router's (job-detail, node-list, ...).
urlpatterns = [
    path("login/", auth_views.LoginView.as_view(redirect_authenticated_user=True), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("", views.dashboard, name="dashboard"),
    path("jobs/", views.job_list, name="jobs"),
    path("jobs/new/", views.job_new, name="job-new"),
    path("jobs/<int:pk>/", views.job_detail, name="job"),
    path("jobs/<int:pk>/cancel/", views.job_cancel, name="job-cancel"),
    path("jobs/<int:pk>/hold/", views.job_hold, name="job-hold"),
    path("queue/", views.queue, name="queue"),
    path("models/", views.model_list, name="models"),
    path("nodes/", views.node_list, name="nodes"),
    path("nodes/<int:pk>/", views.node_detail, name="node"),
    path("nodes/<int:pk>/state/", views.node_set_state, name="node-state"),
    path("teams/", views.team_list, name="teams"),
    path("teams/<int:pk>/", views.team_detail, name="team"),
    path("forecasts/", forecast_views.forecasts, name="forecasts"),
    path("forecasts/autoscaler/", forecast_views.autoscaler_switch, name="autoscaler-switch"),
]
