from django.contrib import admin, messages

from marketplace.core.admin import AuditedAdminMixin
from marketplace.core.exceptions import ServiceError
from marketplace.core.services import Actor
from marketplace.inventory import services
from marketplace.inventory.models import Cluster, GpuModel, GpuPrice, MaintenanceWindow, Node, Region


class GpuPriceInline(admin.TabularInline):
    model = GpuPrice
    extra = 0
    can_delete = False


@admin.register(Region)
class RegionAdmin(AuditedAdminMixin, admin.ModelAdmin):
    list_display = ["code", "name"]


@admin.register(GpuModel)
class GpuModelAdmin(AuditedAdminMixin, admin.ModelAdmin):
    list_display = ["name", "vendor", "memory_gb", "gpus_per_node"]
    inlines = [GpuPriceInline]


@admin.register(Cluster)
class ClusterAdmin(AuditedAdminMixin, admin.ModelAdmin):
    list_display = ["name", "region", "connection", "status"]
    list_filter = ["region", "connection", "status"]


class MaintenanceWindowInline(admin.TabularInline):
    # Read-only here: windows are planned and cancelled through the service, which checks bookings.
    model = MaintenanceWindow
    extra = 0
    can_delete = False
    fields = ["starts_at", "ends_at", "reason", "cancelled_at"]
    readonly_fields = fields

    def has_add_permission(self, request, obj=None):
        return False


def _status_action(status: str, label: str):
    def set_status(modeladmin, request, queryset):
        try:
            change = services.node_bulk_set_status(actor=Actor.for_user(request.user),
                                                   node_ids=list(queryset.values_list("pk", flat=True)),
                                                   status=status, reason="Django admin")
        except ServiceError as error:
            modeladmin.message_user(request, " ".join([error.message, *error.fields.get("node_ids", [])]),
                                    messages.ERROR)
        else:
            modeladmin.message_user(request, f"{len(change.nodes)} node(s) now {status}.", messages.SUCCESS)

    set_status.__name__ = f"set_{status}"
    set_status.short_description = label
    return set_status


@admin.register(Node)
class NodeAdmin(AuditedAdminMixin, admin.ModelAdmin):
    list_display = ["name", "cluster", "gpu_model", "gpu_count", "topology_domain", "status", "health"]
    list_filter = ["status", "health", "gpu_model", "cluster__region", "cluster"]
    search_fields = ["name", "topology_domain"]
    list_select_related = ["cluster", "gpu_model"]
    inlines = [MaintenanceWindowInline]
    # Status changes go through the service so that booked nodes are refused with the bookings named.
    readonly_fields = ["status", "health", "health_checked_at"]
    # A node's identity: its name is the Kubernetes node's, its cluster and model are what its
    # bookings were priced and provisioned on. Set when it is added, never edited (as in the API).
    identity_fields = ["name", "cluster", "gpu_model"]
    actions = [_status_action(status, f"Set selected nodes to {label.lower()}") for status, label in Node.Status.choices]

    def get_readonly_fields(self, request, obj=None):
        return [*self.readonly_fields, *(self.identity_fields if obj is not None else [])]


@admin.action(description="Cancel selected maintenance windows")
def cancel_windows(modeladmin, request, queryset):
    for window_id in queryset.filter(cancelled_at__isnull=True).values_list("pk", flat=True):
        try:
            services.maintenance_window_cancel(actor=Actor.for_user(request.user), window_id=window_id,
                                               reason="Django admin")
        except ServiceError as error:
            modeladmin.message_user(request, f"Window {window_id}: {error.message}", messages.ERROR)


@admin.register(MaintenanceWindow)
class MaintenanceWindowAdmin(AuditedAdminMixin, admin.ModelAdmin):
    """Browse and cancel. Planning a window checks bookings, so it is done in the ops pages or the API."""

    list_display = ["node", "starts_at", "ends_at", "reason", "cancelled_at"]
    list_filter = ["cancelled_at"]
    list_select_related = ["node__cluster"]
    search_fields = ["node__name", "reason"]
    readonly_fields = ["node", "starts_at", "ends_at", "reason", "created_by", "created_at", "cancelled_at"]
    actions = [cancel_windows]

    def has_add_permission(self, request):
        return False
