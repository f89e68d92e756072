from django.contrib import admin

from marketplace.core.admin import NoDeleteAdminMixin
from marketplace.tenants.models import ApiToken, Membership, Tenant


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    raw_id_fields = ["user"]


@admin.register(Tenant)
class TenantAdmin(NoDeleteAdminMixin, admin.ModelAdmin):
    list_display = ["slug", "name", "billing_status", "gpu_quota", "is_active"]
    list_filter = ["billing_status", "is_active"]
    search_fields = ["slug", "name"]
    inlines = [MembershipInline]


@admin.register(ApiToken)
class ApiTokenAdmin(NoDeleteAdminMixin, admin.ModelAdmin):
    list_display = ["name", "prefix", "user", "tenant", "created_at", "last_used_at", "revoked_at"]
    readonly_fields = ["prefix", "key_hash", "created_at", "last_used_at"]
    list_select_related = ["user", "tenant"]
