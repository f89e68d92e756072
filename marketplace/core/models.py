from django.conf import settings
from django.db import models

from marketplace.core.scoping import TenantScopedQuerySet


class AuditLog(models.Model):
    """Who changed what, when, with the state before and after. Append-only."""

    at = models.DateTimeField(auto_now_add=True, db_index=True)
    # Not indexed: nothing lists audit rows by user id (the actor column names them), and every change
    # writes audit rows. Deleting a user (protected) scans instead: rare, ops only.
    actor_user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+", db_index=False
    )
    # "user:alice", "task:scheduler.provision", "system": set even when there is no user.
    actor = models.CharField(max_length=200)
    # Indexed by audit_tenant_at_idx (tenant first): every change writes audit rows, so no spare index.
    tenant = models.ForeignKey("tenants.Tenant", null=True, blank=True, on_delete=models.PROTECT, related_name="+",
                               db_index=False)
    # One index serves both equality and prefix filters (audit_action_idx), not Django's usual two.
    action = models.CharField(max_length=100)
    object_type = models.CharField(max_length=100)
    object_id = models.CharField(max_length=64)
    before = models.JSONField(null=True, blank=True)
    after = models.JSONField(null=True, blank=True)
    message = models.TextField(blank=True, default="")

    objects = TenantScopedQuerySet.as_manager()

    class Meta:
        ordering = ["-at", "-id"]
        indexes = [
            models.Index(fields=["object_type", "object_id"], name="audit_object_idx"),
            models.Index(fields=["tenant", "-at"], name="audit_tenant_at_idx"),
            models.Index(fields=["action"], name="audit_action_idx", opclasses=["varchar_pattern_ops"]),
        ]

    def __str__(self) -> str:
        return f"{self.at:%Y-%m-%d %H:%M:%S} {self.actor} {self.action} {self.object_type}:{self.object_id}"
