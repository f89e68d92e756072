from django.db import transaction
from django.utils import timezone

from marketplace.core.exceptions import Conflict
from marketplace.core.services import Actor, audit_record
from marketplace.reservations.models import Reservation
from marketplace.reservations.status import can_transition


class IllegalTransition(Conflict):
    code = "illegal_transition"


def reservation_transition(*, reservation: Reservation, to: str, actor: Actor, reason: str = "") -> Reservation:
    """Move a reservation to ``to`` if the transition table allows it, and write the audit row.

    Locks the row for the rest of the caller's transaction; ``reservation`` is refreshed from the
    locked row so the check sees the current state, not a stale copy.
    """
    with transaction.atomic():
        locked = Reservation.objects.select_for_update().get(pk=reservation.pk)
        current = locked.status
        if not can_transition(current, to):
            raise IllegalTransition(
                f"A {current} reservation cannot become {to}.",
                fields={"status": [f"{current} → {to} is not allowed"]},
            )
        now = timezone.now()
        Reservation.objects.filter(pk=locked.pk).update(
            status=to, status_reason=reason, status_changed_at=now, updated_at=now
        )
        audit_record(
            actor=actor, action=f"reservation.{to}", obj=locked, tenant_id=locked.tenant_id,
            before={"status": current}, after={"status": to, "reason": reason},
        )
    reservation.status, reservation.status_reason, reservation.status_changed_at = to, reason, now
    return reservation
