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
            # NULLs are distinct in a unique constraint: operations that belong to no reservation
            # (the tenant's namespace objects, events) need their own, or concurrent workers
            # record the same operation twice.
            models.UniqueConstraint(
                fields=["cluster", "verb", "kind", "namespace", "name", "body_hash"],
                condition=models.Q(reservation__isnull=True),
                name="planned_operation_identity_clusterwide",
                violation_error_message="This operation is already in the plan.",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.verb} {self.kind} {self.namespace}/{self.name}"


class PoolQuerySet(TenantScopedQuerySet):
    tenant_field = "reservation__tenant"


class Pool(models.Model):
    """The scheduler's own state of one reservation's node pool (one row per reservation).

    ``on_cluster`` is set before the first call that may create anything on the cluster and cleared
    only after the labels, taints and the tenant's quota share are gone again, so a reconcile can
    always finish a provision or release that a killed worker left half done. ``lease_*`` is a
    short claim: at most one worker calls the cluster for a pool at a time.
    """

    reservation = models.OneToOneField(
        "reservations.Reservation", primary_key=True, on_delete=models.PROTECT, related_name="pool"
    )
    on_cluster = models.BooleanField(default=False)
    lease_token = models.CharField(max_length=64, blank=True, default="")
    lease_until = models.DateTimeField(null=True, blank=True)
    provision_attempts = models.PositiveIntegerField(default=0)
    drain_started_at = models.DateTimeField(null=True, blank=True)
    cleaned_at = models.DateTimeField(null=True, blank=True)
    # Allocation ids cancelled when provisioning gave up: an ops retry allocates these nodes again.
    freed_allocations = models.JSONField(default=list, blank=True)
    last_error = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = PoolQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["on_cluster"], name="pool_on_cluster_idx")]

    def __str__(self) -> str:
        return f"pool of {self.reservation_id}"


class DowntimeQuerySet(TenantScopedQuerySet):
    tenant_field = "reservation__tenant"

    def open(self):
        return self.filter(ended_at__isnull=True)


class Downtime(models.Model):
    """A period in which one node of an active reservation was not usable. Metering never bills it.

    Opened when the node is seen NotReady, gone or short of GPUs; closed when the node is healthy
    again or a replacement node has joined the pool. Never deleted.
    """

    reservation = models.ForeignKey(
        "reservations.Reservation", on_delete=models.PROTECT, related_name="downtimes"
    )
    node = models.ForeignKey("inventory.Node", on_delete=models.PROTECT, related_name="downtimes")
    started_at = models.DateTimeField()
    ended_at = models.DateTimeField(null=True, blank=True)
    reason = models.CharField(max_length=500)
    resolution = models.CharField(max_length=200, blank=True, default="")

    objects = DowntimeQuerySet.as_manager()

    class Meta:
        ordering = ["started_at", "id"]
        constraints = [
            models.UniqueConstraint(
                fields=["reservation", "node"], condition=models.Q(ended_at__isnull=True),
                name="downtime_one_open_per_node",
                violation_error_message="This node already has an open downtime in this reservation.",
            ),
            models.CheckConstraint(
                condition=models.Q(ended_at__isnull=True) | models.Q(ended_at__gte=models.F("started_at")),
                name="downtime_ends_after_start",
                violation_error_message="A downtime cannot end before it starts.",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.node} down from {self.started_at:%Y-%m-%d %H:%M}"


class PoolNoticeQuerySet(TenantScopedQuerySet):
    tenant_field = "reservation__tenant"


class PoolNotice(models.Model):
    """A notice to the tenant about its pool (e.g. the window ends soon). One per kind."""

    class Kind(models.TextChoices):
        END_SOON = "end_soon", "The reservation ends soon"
        NODE_WITHDRAWN = "node_withdrawn", "Ops took a booked node out of service"

    reservation = models.ForeignKey(
        "reservations.Reservation", on_delete=models.PROTECT, related_name="pool_notices"
    )
    kind = models.CharField(max_length=20, choices=Kind)
    message = models.TextField()
    created_at = models.DateTimeField()
    posted_to_cluster_at = models.DateTimeField(null=True, blank=True)

    objects = PoolNoticeQuerySet.as_manager()

    class Meta:
        ordering = ["created_at", "id"]
        constraints = [
            models.UniqueConstraint(
                fields=["reservation", "kind"], name="pool_notice_kind_unique",
                violation_error_message="This notice was already sent.",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.kind} for {self.reservation_id}"


class SchedulerAttemptQuerySet(TenantScopedQuerySet):
    tenant_field = "reservation__tenant"


class SchedulerAttempt(models.Model):
    """One call of the scheduler to a cluster for a reservation, and how it went (ops history)."""

    class Action(models.TextChoices):
        PROVISION = "provision", "Provision"
        NOTICE = "notice", "End notice"
        RELEASE = "release", "Release"
        HEAL = "heal", "Health and drift"
        CLEANUP = "cleanup", "Clean up after failure"

    class Outcome(models.TextChoices):
        OK = "ok", "Succeeded"
        RETRY = "retry", "Will retry"
        GAVE_UP = "gave_up", "Gave up"

    reservation = models.ForeignKey(
        "reservations.Reservation", on_delete=models.PROTECT, related_name="scheduler_attempts"
    )
    action = models.CharField(max_length=20, choices=Action)
    outcome = models.CharField(max_length=20, choices=Outcome)
    message = models.TextField(blank=True, default="")
    at = models.DateTimeField()

    objects = SchedulerAttemptQuerySet.as_manager()

    class Meta:
        ordering = ["-at", "-id"]
        indexes = [models.Index(fields=["outcome", "-at"], name="scheduler_attempt_outcome_idx")]

    def __str__(self) -> str:
        return f"{self.action} {self.outcome} for {self.reservation_id}"


class TenantClusterLease(models.Model):
    """A short claim on a tenant's objects in one cluster (namespace, quota, policies).

    Pools of one tenant share these objects; whoever sizes the quota (or deletes the namespace
    when nothing is left) holds this lease for the duration of that one call, so a release that
    computed "nothing left" cannot delete the namespace that a concurrent provision just made.
    It is a claim with an expiry, not a database lock: nothing is held open across the call.
    """

    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.PROTECT, related_name="+")
    cluster = models.ForeignKey("inventory.Cluster", on_delete=models.PROTECT, related_name="+")
    lease_token = models.CharField(max_length=64, blank=True, default="")
    lease_until = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tenant", "cluster"], name="tenant_cluster_lease_unique",
                                    violation_error_message="This tenant already has a lease row in this cluster."),
        ]

    def __str__(self) -> str:
        return f"{self.tenant_id}@{self.cluster_id}"
