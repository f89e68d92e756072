"""The reservation state machine: one transition table, read by ``reservation_transition``.

Stable states wait for time or a person; transitional states are being worked on by the
scheduler and are always moved on by a sweep or reconcile, never left behind.
"""

from django.db import models


class ReservationStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    CONFIRMED = "confirmed", "Confirmed"
    PROVISIONING = "provisioning", "Provisioning"
    ACTIVE = "active", "Active"
    DEGRADED = "degraded", "Degraded"
    RELEASING = "releasing", "Releasing"
    COMPLETED = "completed", "Completed"
    CANCELLED = "cancelled", "Cancelled"
    FAILED = "failed", "Failed"


S = ReservationStatus

TRANSITIONS: dict[str, frozenset[str]] = {
    S.PENDING: frozenset({S.CONFIRMED, S.CANCELLED, S.FAILED}),
    S.CONFIRMED: frozenset({S.PROVISIONING, S.CANCELLED, S.FAILED}),
    S.PROVISIONING: frozenset({S.ACTIVE, S.FAILED, S.RELEASING}),
    S.ACTIVE: frozenset({S.DEGRADED, S.RELEASING}),
    S.DEGRADED: frozenset({S.ACTIVE, S.RELEASING}),
    S.RELEASING: frozenset({S.COMPLETED}),
    # Ops may retry a failed reservation once its nodes are allocated again.
    S.FAILED: frozenset({S.CONFIRMED}),
    S.COMPLETED: frozenset(),
    S.CANCELLED: frozenset(),
}

STABLE = frozenset({S.CONFIRMED, S.ACTIVE, S.DEGRADED, S.COMPLETED, S.CANCELLED, S.FAILED})
TRANSITIONAL = frozenset({S.PENDING, S.PROVISIONING, S.RELEASING})
TERMINAL = frozenset({S.COMPLETED, S.CANCELLED})
# States in which the reservation's nodes are held (allocations count against capacity/quota).
HOLDING = frozenset({S.PENDING, S.CONFIRMED, S.PROVISIONING, S.ACTIVE, S.DEGRADED, S.RELEASING})
# States in which the tenant has (or is about to have) the pool on the cluster.
ON_CLUSTER = frozenset({S.PROVISIONING, S.ACTIVE, S.DEGRADED, S.RELEASING})

assert set(TRANSITIONS) == set(S.values), "every state needs a row in the transition table"
assert STABLE | TRANSITIONAL == set(S.values) and not STABLE & TRANSITIONAL


def can_transition(current: str, target: str) -> bool:
    return target in TRANSITIONS[current]
