from django.db.models import QuerySet

from marketplace.core.models import AuditLog


def audit_log_list(*, action: str = "", object_type: str = "", actor: str = "", tenant_slug: str = "") -> QuerySet:
    """The audit log for ops, newest first, narrowed by whichever filters are given."""
    rows = AuditLog.objects.select_related("tenant").order_by("-at", "-id")
    if action:
        rows = rows.filter(action__startswith=action)
    if object_type:
        rows = rows.filter(object_type=object_type)
    if actor:
        rows = rows.filter(actor__icontains=actor)
    if tenant_slug:
        rows = rows.filter(tenant__slug=tenant_slug)
    return rows
