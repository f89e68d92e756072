from django.contrib import admin
from django.contrib.admin.options import ActionLocation
from django.db import transaction

from marketplace.core.models import AuditLog
from marketplace.core.services import Actor, audit_record, snapshot


class NoDeleteAdminMixin:
    """Business records are never hard-deleted: the admin offers no delete, not even in bulk."""

    def has_delete_permission(self, request, obj=None):
        return False

    def get_actions(self, request, action_location=ActionLocation.CHANGE_LIST):
        actions = super().get_actions(request, action_location=action_location)
        actions.pop("delete_selected", None)
        return actions


def _editable_fields(obj, exclude=()) -> list[str]:
    return [f.name for f in obj._meta.concrete_fields if f.editable and not f.primary_key and f.name not in exclude]


def _audited_save(request, obj, save, exclude=()) -> None:
    """Saves ``obj`` and writes the audit row: edits in the admin are state changes by a person too."""
    fields = _editable_fields(obj, exclude)
    with transaction.atomic():
        before = None
        if obj.pk is not None:
            old = type(obj)._base_manager.filter(pk=obj.pk).first()
            before = snapshot(old, fields) if old is not None else None
        save()
        after = snapshot(obj, fields)
        if before != after:
            tenant_id = getattr(obj, "tenant_id", None)
            if tenant_id is None and obj._meta.label_lower == "tenants.tenant":
                tenant_id = obj.pk
            verb = "create" if before is None else "update"
            audit_record(actor=Actor.for_user(request.user), action=f"{obj._meta.model_name}.admin_{verb}", obj=obj,
                         before=before, after=after, tenant_id=tenant_id, message="Changed in the Django admin.")


class AuditedAdminMixin(NoDeleteAdminMixin):
    """Admin edits (including inline rows) go to the audit log with before/after; nothing is deleted."""

    audit_exclude: tuple[str, ...] = ()  # fields never written to the audit log (secrets)

    def save_model(self, request, obj, form, change):
        _audited_save(request, obj, lambda: super(AuditedAdminMixin, self).save_model(request, obj, form, change),
                      self.audit_exclude)

    def save_formset(self, request, form, formset, change):
        for obj in formset.save(commit=False):
            _audited_save(request, obj, obj.save)
        formset.save_m2m()


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
