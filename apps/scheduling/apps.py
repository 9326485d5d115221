from django.apps import AppConfig


class SchedulingConfig(AppConfig):
    name = "apps.scheduling"
    verbose_name = "Jobs and scheduling"

    def ready(self) -> None:
        from django.core import checks

        from apps.cluster.signals import node_changed

        from .checks import check_scheduler_settings
        from .dispatch import on_job_changed
        from .notify import on_job_changed as notify_on_job_changed
        from .signals import job_changed, scheduling_requested
        from .triggers import on_node_changed, on_scheduling_requested

        checks.register(check_scheduler_settings)
        scheduling_requested.connect(on_scheduling_requested, dispatch_uid="scheduling-pass-on-request")
        node_changed.connect(on_node_changed, dispatch_uid="scheduling-pass-on-node-change")
        job_changed.connect(on_job_changed, dispatch_uid="dispatch-allocated-attempts")
        job_changed.connect(notify_on_job_changed, dispatch_uid="notify-finished-jobs")
