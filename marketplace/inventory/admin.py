from django.contrib import admin

from marketplace.core.admin import AuditedAdminMixin
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
    model = MaintenanceWindow
    extra = 0
    can_delete = False
    fields = ["starts_at", "ends_at", "reason", "cancelled_at"]


@admin.register(Node)
class NodeAdmin(AuditedAdminMixin, admin.ModelAdmin):
    list_display = ["name", "cluster", "gpu_model", "gpu_count", "topology_domain", "status", "health"]
    list_filter = ["status", "health", "gpu_model", "cluster__region", "cluster"]
    search_fields = ["name", "topology_domain"]
    list_select_related = ["cluster", "gpu_model"]
    inlines = [MaintenanceWindowInline]


@admin.register(MaintenanceWindow)
class MaintenanceWindowAdmin(AuditedAdminMixin, admin.ModelAdmin):
    list_display = ["node", "starts_at", "ends_at", "reason", "cancelled_at"]
    list_select_related = ["node__cluster"]
    raw_id_fields = ["node"]
