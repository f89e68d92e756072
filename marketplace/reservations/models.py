from django.conf import settings
from django.contrib.postgres.constraints import ExclusionConstraint
from django.contrib.postgres.fields import RangeBoundary, RangeOperators
from django.db import models
from django.db.models import F, Q

from marketplace.core.db import TsTzRange
from marketplace.core.ids import uuid7
from marketplace.core.scoping import TenantScopedQuerySet
from marketplace.reservations.status import ReservationStatus


class Reservation(models.Model):
    """A tenant's booking of whole nodes of one GPU model, in one cluster, for [starts_at, ends_at)."""

    Status = ReservationStatus

    # Time-ordered: each booking inserts next to the last one in the primary key and in
    # allocation_reservation_idx, instead of on a random page of each.
    id = models.UUIDField(primary_key=True, default=uuid7, editable=False)
    # Indexed by reservation_tenant_start_idx (tenant first): no index of its own to write per booking.
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.PROTECT, related_name="reservations",
                               db_index=False)
    # No index on who booked or on the GPU model: nothing looks reservations up by either, and every
    # booking would write both. Deleting a user or a model (protected) scans instead: rare, ops only.
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+",
                                   db_index=False)
    gpu_model = models.ForeignKey("inventory.GpuModel", on_delete=models.PROTECT, related_name="+", db_index=False)
    # Indexed by reservation_cluster_recent_idx (cluster first).
    cluster = models.ForeignKey("inventory.Cluster", on_delete=models.PROTECT, related_name="reservations",
                                db_index=False)
    gpus = models.PositiveIntegerField()
    same_domain = models.BooleanField(default=False)
    starts_at = models.DateTimeField()
    ends_at = models.DateTimeField()
    status = models.CharField(max_length=20, choices=ReservationStatus, default=ReservationStatus.PENDING)
    status_reason = models.TextField(blank=True, default="")
    status_changed_at = models.DateTimeField(auto_now_add=True)

    # Price locked at booking time: unit price per GPU-hour and the total for the booked window.
    currency = models.CharField(max_length=3)
    unit_price = models.DecimalField(max_digits=12, decimal_places=4)
    total_price = models.DecimalField(max_digits=16, decimal_places=2)

    # Idempotency-Key of the create request; a retry with the same key returns this reservation.
    idempotency_key = models.CharField(max_length=200, blank=True, default="")
    request_fingerprint = models.CharField(max_length=64, blank=True, default="")

    # Readiness and isolation check: when it passed, billing starts (ready_at).
    readiness = models.JSONField(null=True, blank=True)
    ready_at = models.DateTimeField(null=True, blank=True)
    end_notice_at = models.DateTimeField(null=True, blank=True)
    released_at = models.DateTimeField(null=True, blank=True)

    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = TenantScopedQuerySet.as_manager()

    class Meta:
        ordering = ["-starts_at", "-created_at"]
        constraints = [
            models.CheckConstraint(
                condition=Q(ends_at__gt=F("starts_at")), name="reservation_ends_after_start",
                violation_error_message="A reservation must end after it starts.",
            ),
            models.CheckConstraint(
                condition=Q(gpus__gt=0), name="reservation_gpus_positive",
                violation_error_message="A reservation books at least one GPU.",
            ),
            models.CheckConstraint(
                condition=Q(unit_price__gte=0) & Q(total_price__gte=0), name="reservation_price_non_negative",
                violation_error_message="Prices cannot be negative.",
            ),
            models.UniqueConstraint(
                fields=["tenant", "idempotency_key"], condition=~Q(idempotency_key=""),
                name="reservation_tenant_idempotency_key_unique",
                violation_error_message="This Idempotency-Key was already used by this tenant.",
            ),
        ]
        indexes = [
            models.Index(fields=["tenant", "-starts_at"], name="reservation_tenant_start_idx"),
            models.Index(fields=["status", "starts_at"], name="reservation_status_start_idx"),
            # A cluster's latest bookings: where a booking's walk over the topology domains starts.
            models.Index(fields=["cluster", "gpu_model", "-created_at"], name="reservation_cluster_recent_idx"),
            # The quota check reads a tenant's holding reservations that end after a moment; the
            # condition keeps years of completed history out of that index.
            models.Index(
                fields=["tenant", "ends_at"], name="reservation_tenant_holding_idx",
                condition=Q(status__in=["pending", "confirmed", "provisioning", "active", "degraded", "releasing"]),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.tenant} {self.gpus}×{self.gpu_model} {self.starts_at:%Y-%m-%d %H:%M}"

    @property
    def pool_name(self) -> str:
        """Deterministic name of the Kubernetes node pool for this reservation."""
        return f"r-{self.id.hex[:12]}"


class AllocationQuerySet(TenantScopedQuerySet):
    # Allocations belong to a tenant through their reservation.
    tenant_field = "reservation__tenant"


class Allocation(models.Model):
    """One node held by one reservation for [starts_at, ends_at), kept free until blocked_until.

    blocked_until = ends_at + cleaning gap. The exclusion constraint makes two non-cancelled
    allocations of one node with overlapping [starts_at, blocked_until) impossible.
    """

    class State(models.TextChoices):
        ACTIVE = "active", "Active"  # holds the node (now or in the future)
        RELEASED = "released", "Released"  # the window ended; the period stays as history
        REPLACED = "replaced", "Replaced"  # swapped out (node failed); period trimmed to the swap
        CANCELLED = "cancelled", "Cancelled"  # never used; frees the period entirely

    # Each booking writes every index of this table once per node, so there are no redundant ones:
    # reservation is indexed by allocation_reservation_idx, node by allocation_node_busy_idx.
    reservation = models.ForeignKey(Reservation, on_delete=models.PROTECT, related_name="allocations",
                                    db_index=False)
    node = models.ForeignKey("inventory.Node", on_delete=models.PROTECT, related_name="allocations", db_index=False)
    starts_at = models.DateTimeField()
    ends_at = models.DateTimeField()
    blocked_until = models.DateTimeField()
    state = models.CharField(max_length=20, choices=State, default=State.ACTIVE)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = AllocationQuerySet.as_manager()

    class Meta:
        ordering = ["starts_at", "node_id"]
        constraints = [
            models.CheckConstraint(
                condition=Q(ends_at__gt=F("starts_at")) & Q(blocked_until__gte=F("ends_at")),
                name="allocation_period_valid",
                violation_error_message="An allocation must end after it starts, and stay blocked at least until its end.",
            ),
            ExclusionConstraint(
                name="allocation_no_double_booking",
                expressions=[
                    (TsTzRange("starts_at", "blocked_until", RangeBoundary()), RangeOperators.OVERLAPS),
                    ("node", RangeOperators.EQUAL),
                ],
                condition=~Q(state="cancelled"),
                # Covering: "which nodes are busy in this window" for the whole fleet is an
                # index-only scan of this index (see selectors.allocations_overlapping).
                include=["starts_at", "blocked_until"],
                violation_error_code="node_double_booked",
                violation_error_message="This node is already allocated for an overlapping period.",
            ),
        ]
        indexes = [
            models.Index(fields=["reservation", "state"], name="allocation_reservation_idx"),
            # One more, in migration 0005 (its INCLUDE columns are PostgreSQL only): allocation_node_busy_idx
            # on (node_id, blocked_until), "is this node busy in [start, end)?" one node at a time.
        ]

    def __str__(self) -> str:
        return f"{self.node} for {self.reservation_id}"


class ReservationEventQuerySet(models.QuerySet):
    def due(self, now):
        return self.filter(status=ReservationEvent.Status.PENDING, due_at__lte=now)


class ReservationEvent(models.Model):
    """A durable due event (start, end notice, end) that the scheduler's beat sweep claims."""

    class Kind(models.TextChoices):
        START = "start", "Start (provision)"
        END_NOTICE = "end_notice", "Notice before end"
        END = "end", "End (release)"

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        CLAIMED = "claimed", "Claimed"
        DONE = "done", "Done"
        CANCELLED = "cancelled", "Cancelled"

    # Indexed by reservation_event_kind_unique (reservation first).
    reservation = models.ForeignKey(Reservation, on_delete=models.PROTECT, related_name="events", db_index=False)
    kind = models.CharField(max_length=20, choices=Kind)
    due_at = models.DateTimeField()
    status = models.CharField(max_length=20, choices=Status, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    claimed_at = models.DateTimeField(null=True, blank=True)
    claimed_by = models.CharField(max_length=200, blank=True, default="")
    done_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True, default="")

    objects = ReservationEventQuerySet.as_manager()

    class Meta:
        ordering = ["due_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["reservation", "kind"], name="reservation_event_kind_unique",
                violation_error_message="A reservation has one event of each kind.",
            ),
        ]
        indexes = [models.Index(fields=["status", "due_at"], name="reservation_event_due_idx")]

    def __str__(self) -> str:
        return f"{self.kind} of {self.reservation_id} at {self.due_at:%Y-%m-%d %H:%M}"
