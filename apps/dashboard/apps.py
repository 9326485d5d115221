from django.apps import AppConfig


class DashboardConfig(AppConfig):
    name = "apps.dashboard"
    verbose_name = "Dashboard"

    def ready(self) -> None:
        from apps.cluster.signals import node_changed
        from apps.scheduling.signals import job_changed

        from .fanout import on_job_changed, on_node_changed

        # Both signals are sent after the commit; the fan-out publishes the change to the live pages.
        job_changed.connect(on_job_changed, dispatch_uid="dashboard-live-job-changed")
        node_changed.connect(on_node_changed, dispatch_uid="dashboard-live-node-changed")
