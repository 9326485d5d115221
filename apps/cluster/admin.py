from django.contrib import admin

from .models import Gpu, GpuNode


class GpuInline(admin.TabularInline):
    model = Gpu
    extra = 0


@admin.register(GpuNode)
class GpuNodeAdmin(admin.ModelAdmin):
    list_display = ["name", "hostname", "team", "rack", "state", "device_type", "last_heartbeat_at"]
    list_filter = ["state", "device_type", "rack", "team"]
    search_fields = ["name", "hostname", "team__name"]
    readonly_fields = ["token_hash", "last_heartbeat_at", "created_at"]
    inlines = [GpuInline]
    actions = ["drain", "activate"]

    @admin.action(description="Drain the selected nodes")
    def drain(self, request, queryset) -> None:  # noqa: ANN001
        self._set_state(request, queryset, GpuNode.State.DRAINING)

    @admin.action(description="Activate the selected nodes")
    def activate(self, request, queryset) -> None:  # noqa: ANN001
        self._set_state(request, queryset, GpuNode.State.ACTIVE)

    def _set_state(self, request, queryset, target: str) -> None:  # noqa: ANN001
        from .services import IllegalNodeTransition, set_node_state

        for node in queryset:
            try:
                set_node_state(node, target)
            except IllegalNodeTransition as exc:
                self.message_user(request, f"{node.name}: {exc}", level="warning")


@admin.register(Gpu)
class GpuAdmin(admin.ModelAdmin):
    list_display = ["node", "index", "model", "memory_mb", "uuid"]
    list_filter = ["model", "node__rack"]
    search_fields = ["node__name", "model", "uuid"]
