from django.db import models

from marketplace.core.scoping import TenantScopedQuerySet


class PlannedOperationQuerySet(TenantScopedQuerySet):
    tenant_field = "reservation__tenant"


class PlannedOperation(models.Model):
    """What the plan-only driver would have applied to a cluster (no cluster configured).

    Identity is (cluster, verb, kind, namespace, name, body hash): re-applying the same plan does
    not add rows, just as re-applying to Kubernetes does not add objects.
    """

    cluster = models.ForeignKey("inventory.Cluster", on_delete=models.PROTECT, related_name="+")
    reservation = models.ForeignKey(
        "reservations.Reservation", null=True, blank=True, on_delete=models.PROTECT, related_name="planned_operations"
    )
    verb = models.CharField(max_length=20)  # apply, patch, delete, evict, event
    kind = models.CharField(max_length=40)  # Node, Namespace, ResourceQuota, ...
    namespace = models.CharField(max_length=253, blank=True, default="")
    name = models.CharField(max_length=253)
    body = models.JSONField(default=dict)
    body_hash = models.CharField(max_length=64)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = PlannedOperationQuerySet.as_manager()

    class Meta:
        ordering = ["created_at", "id"]
        constraints = [
            models.UniqueConstraint(
                fields=["cluster", "reservation", "verb", "kind", "namespace", "name", "body_hash"],
                name="planned_operation_identity",
                violation_error_message="This operation is already in the plan.",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.verb} {self.kind} {self.namespace}/{self.name}"
