from django.contrib import admin, messages

from .models import Allocation, AttemptRun, Job, JobArtifact, JobEvent, ModelUpload


class JobEventInline(admin.TabularInline):
    """The history is append-only: shown, never edited."""

    model = JobEvent
    extra = 0
    can_delete = False
    fields = ["ts", "kind", "attempt", "from_state", "to_state", "message", "actor"]
    readonly_fields = fields
    ordering = ["ts", "id"]

    def has_add_permission(self, request, obj=None) -> bool:  # noqa: ANN001
        return False

    def has_change_permission(self, request, obj=None) -> bool:  # noqa: ANN001
        return False


class AllocationInline(admin.TabularInline):
    model = Allocation
    extra = 0
    can_delete = False
    readonly_fields = ["attempt", "gpu", "node", "created_at", "released_at"]

    def has_add_permission(self, request, obj=None) -> bool:  # noqa: ANN001
        return False


class AttemptRunInline(admin.TabularInline):
    """Where each attempt ran: written by dispatch and the workers' reports, never by hand."""

    model = AttemptRun
    extra = 0
    can_delete = False
    fields = ["attempt", "rank", "node", "dispatched_at", "dispatch_count", "started_at", "seen_at", "finished_at",
              "status", "exit_code", "pid"]
    readonly_fields = fields

    def has_add_permission(self, request, obj=None) -> bool:  # noqa: ANN001
        return False


class JobArtifactInline(admin.TabularInline):
    model = JobArtifact
    extra = 0
    fields = ["attempt", "name", "size", "sha256", "node", "created_at", "file"]
    readonly_fields = fields

    def has_add_permission(self, request, obj=None) -> bool:  # noqa: ANN001
        return False


@admin.register(Job)
class JobAdmin(admin.ModelAdmin):
    list_display = ["id", "name", "team", "kind", "priority", "gpus", "nodes", "state", "held", "attempt",
                    "submitted_at"]
    list_filter = ["state", "held", "kind", "priority", "team"]
    search_fields = ["name", "team__name", "submitter__username"]
    date_hierarchy = "submitted_at"
    list_select_related = ["team"]
    # State changes go through the state machine (services), never through a form field.
    # depends_on too: as a form field it would be a multi-select of every job in the database; and a hold,
    # which goes through services.hold_job / release_job (an event, a pass) like the API's.
    readonly_fields = ["state", "attempt", "pending_reason", "result", "error", "submitted_at", "started_at",
                       "finished_at", "submitter", "depends_on", "held", "held_by"]
    inlines = [AllocationInline, AttemptRunInline, JobArtifactInline, JobEventInline]
    actions = ["hold_jobs", "release_jobs"]

    @admin.action(description="Hold the selected queued jobs")
    def hold_jobs(self, request, queryset) -> None:  # noqa: ANN001
        self._hold(request, queryset, hold=True)

    @admin.action(description="Release the selected held jobs")
    def release_jobs(self, request, queryset) -> None:  # noqa: ANN001
        self._hold(request, queryset, hold=False)

    def _hold(self, request, queryset, *, hold: bool) -> None:  # noqa: ANN001
        from .services import hold_job, release_job
        from .states import IllegalTransition

        done, skipped = 0, []
        for job in queryset.order_by("id"):
            try:
                (hold_job if hold else release_job)(job, actor=request.user)
                done += 1
            except IllegalTransition as exc:
                skipped.append(f"#{job.pk} ({exc.current})")
        verb = "Held" if hold else "Released"
        self.message_user(request, f"{verb} {done} job{'s' if done != 1 else ''}.", messages.SUCCESS)
        if skipped:
            self.message_user(request, "Not queued, left as they were: " + ", ".join(skipped[:20])
                              + (" …" if len(skipped) > 20 else ""), messages.WARNING)


@admin.register(JobEvent)
class JobEventAdmin(admin.ModelAdmin):
    list_display = ["ts", "job", "kind", "from_state", "to_state", "attempt", "message"]
    list_filter = ["kind", "to_state"]
    search_fields = ["job__name", "message"]
    list_select_related = ["job"]

    def has_add_permission(self, request) -> bool:  # noqa: ANN001
        return False

    def has_change_permission(self, request, obj=None) -> bool:  # noqa: ANN001
        return False

    def has_delete_permission(self, request, obj=None) -> bool:  # noqa: ANN001
        return False


@admin.register(ModelUpload)
class ModelUploadAdmin(admin.ModelAdmin):
    """Teams' uploaded weights; they are added through the API (which checks the file), not here."""

    list_display = ("name", "arch", "team", "size", "tensors", "uploaded_by", "created_at")
    list_filter = ("arch", "team")
    search_fields = ("name", "sha256")
    readonly_fields = ("team", "uploaded_by", "name", "arch", "file", "size", "sha256", "tensors", "created_at")

    def has_add_permission(self, request) -> bool:  # noqa: ANN001
        return False
