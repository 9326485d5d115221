from django.apps import AppConfig


class DashboardConfig(AppConfig):
    name = "apps.dashboard"
    verbose_name = "Dashboard"

    def ready(self) -> None:
        from django.contrib.auth import get_user_model
        from django.db.models.signals import post_delete, post_save

        from apps.accounts.models import Membership
        from apps.cluster.signals import node_changed
        from apps.scheduling.signals import job_changed

        from .fanout import on_job_changed, on_membership_changed, on_node_changed, on_user_saved

        # Both signals are sent after the commit; the fan-out publishes the change to the live pages.
        job_changed.connect(on_job_changed, dispatch_uid="dashboard-live-job-changed")
        node_changed.connect(on_node_changed, dispatch_uid="dashboard-live-node-changed")
        # A user's teams or standing changed: their open sockets re-read their groups (after the commit).
        post_save.connect(on_membership_changed, sender=Membership, dispatch_uid="dashboard-live-membership-saved")
        post_delete.connect(on_membership_changed, sender=Membership, dispatch_uid="dashboard-live-membership-deleted")
        post_save.connect(on_user_saved, sender=get_user_model(), dispatch_uid="dashboard-live-user-saved")
