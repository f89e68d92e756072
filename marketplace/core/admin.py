from django.contrib import admin

from marketplace.core.models import AuditLog


class NoDeleteAdminMixin:
    """Business records are never hard-deleted: the admin offers no delete, not even in bulk."""

    def has_delete_permission(self, request, obj=None):
        return False

    def get_actions(self, request):
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)
        return actions


class ReadOnlyAdminMixin(NoDeleteAdminMixin):
    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(AuditLog)
class AuditLogAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["at", "actor", "action", "object_type", "object_id", "tenant"]
    list_filter = ["action", "object_type"]
    search_fields = ["object_id", "actor", "action"]
    date_hierarchy = "at"
    list_select_related = ["tenant"]
