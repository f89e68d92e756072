from django.contrib import admin
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import UserAdmin

from marketplace.core.admin import AuditedAdminMixin
from marketplace.core.services import Actor
from marketplace.tenants import services
from marketplace.tenants.models import ApiToken, Membership, Tenant


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    can_delete = False
    raw_id_fields = ["user"]


@admin.register(Tenant)
class TenantAdmin(AuditedAdminMixin, admin.ModelAdmin):
    list_display = ["slug", "name", "billing_status", "gpu_quota", "is_active"]
    list_filter = ["billing_status", "is_active"]
    search_fields = ["slug", "name"]
    inlines = [MembershipInline]


@admin.register(ApiToken)
class ApiTokenAdmin(AuditedAdminMixin, admin.ModelAdmin):
    list_display = ["name", "prefix", "user", "tenant", "created_at", "last_used_at", "revoked_at"]
    # Tokens are issued (secret shown once) and revoked through the UI or API, never typed in here;
    # a revocation is never undone. The hash of the secret never goes into an audit row.
    readonly_fields = ["user", "tenant", "name", "prefix", "key_hash", "created_at", "last_used_at", "expires_at",
                       "revoked_at"]
    audit_exclude = ("key_hash",)
    actions = ["revoke"]

    @admin.action(description="Revoke selected tokens (a leaked secret, say)", permissions=["change"])
    def revoke(self, request, queryset):
        live = list(queryset.filter(revoked_at__isnull=True).select_related("tenant"))
        for token in live:
            services.api_token_revoke(actor=Actor.for_user(request.user), token_id=token.pk, tenant=token.tenant)
        self.message_user(request, f"{len(live)} token(s) revoked.")
    list_select_related = ["user", "tenant"]

    def has_add_permission(self, request):
        return False


# Users are referenced by reservations, memberships and the audit log: deactivate one (is_active),
# never delete it, and audit the change (without the password hash).
admin.site.unregister(get_user_model())


@admin.register(get_user_model())
class MarketplaceUserAdmin(AuditedAdminMixin, UserAdmin):
    audit_exclude = ("password", "last_login")
