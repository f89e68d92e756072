import hashlib
import json
import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F, Q

from marketplace.core.exceptions import Conflict, NotFound, PolicyViolation
from marketplace.core.services import Actor, audit_record
from marketplace.inventory.models import Cluster, Node
from marketplace.pools import selectors
from marketplace.pools.models import (
    Downtime, PlannedOperation, Pool, PoolNotice, SchedulerAttempt, TenantClusterLease,
)
from marketplace.reservations.models import Allocation, Reservation, ReservationEvent
from marketplace.reservations.selectors import cleaning_gap
from marketplace.reservations.services import reservation_event_due_times, reservation_transition
from marketplace.reservations.status import ReservationStatus as S


def planned_operation_record(
    *, cluster: str, verb: str, kind: str, name: str, body: dict, namespace: str = "", reservation_id: str | None = None
) -> PlannedOperation:
    """Record one operation of the plan-only driver; recording the same one again changes nothing."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    body_hash = hashlib.sha256(canonical.encode()).hexdigest()
    cluster_id = Cluster.objects.values_list("pk", flat=True).get(name=cluster)
    operation, _ = PlannedOperation.objects.get_or_create(
        cluster_id=cluster_id, reservation_id=reservation_id, verb=verb, kind=kind, namespace=namespace, name=name,
        body_hash=body_hash, defaults={"body": json.loads(canonical)},
    )
    return operation


# --- Scheduler state -------------------------------------------------------------------------
# Every write the scheduler makes to the database is here, each in its own short transaction:
# the scheduler claims in one, calls the cluster with no transaction open, and records here.

logger = logging.getLogger(__name__)
SCHEDULER = Actor.task("scheduler")
Event = ReservationEvent


def _setting(key: str):
    return settings.MARKETPLACE[key]


def retry_delay(attempt: int) -> timedelta:
    """Exponential backoff: base, 2×base, 4×base … capped."""
    base, cap = _setting("RETRY_BACKOFF"), _setting("RETRY_BACKOFF_MAX")
    return min(base * (2 ** max(attempt - 1, 0)), cap)


def _attempt(*, reservation_id, action: str, outcome: str, message: str, now: datetime) -> None:
    SchedulerAttempt.objects.create(
        reservation_id=reservation_id, action=action, outcome=outcome, message=message[:4000], at=now
    )


def pool_get_or_create(*, reservation_id) -> Pool:
    pool, _ = Pool.objects.get_or_create(reservation_id=reservation_id)
    return pool


# --- Due events: claim and record -------------------------------------------------------------

@dataclass(frozen=True)
class EventClaim:
    event_id: int
    token: str


def _claimable(now: datetime) -> Q:
    stale = now - _setting("CLAIM_TIMEOUT")
    # Pending and due, or claimed so long ago that its worker must have died.
    return Q(status=Event.Status.PENDING, due_at__lte=now) | Q(status=Event.Status.CLAIMED, claimed_at__lt=stale)


def event_claim_due(*, now: datetime, worker: str = "", limit: int = 200, on_claimed=None) -> list[EventClaim]:
    """Claim due events in one short transaction; each claim gets its own token.

    ``select_for_update(skip_locked=True)`` keeps two concurrent sweeps on disjoint rows, and the
    conditional UPDATE makes a claim count only if the row is still claimable (SQLite, which has no
    row locks, serialises write transactions instead). ``on_claimed(claim)`` runs after commit.
    """
    claims: list[EventClaim] = []
    with transaction.atomic():
        candidates = list(
            Event.objects.select_for_update(skip_locked=True).filter(_claimable(now))
            .order_by("due_at", "pk").values_list("pk", "status", "reservation_id", "kind")[:limit]
        )
        for pk, status, reservation_id, kind in candidates:
            token = uuid.uuid4().hex
            claimed = Event.objects.filter(_claimable(now), pk=pk).update(
                status=Event.Status.CLAIMED, claimed_at=now, claimed_by=f"{worker}:{token}"[-200:],
                attempts=F("attempts") + 1,
            )
            if not claimed:
                continue
            claims.append(EventClaim(pk, f"{worker}:{token}"[-200:]))
            # A claim whose worker died is taken over: the audit log says so.
            reclaimed = status == Event.Status.CLAIMED
            audit_record(
                actor=SCHEDULER, action="reservation_event.reclaimed" if reclaimed else "reservation_event.claimed",
                obj=Event(pk=pk), before={"status": status}, after={"status": Event.Status.CLAIMED, "by": worker},
                message=f"{kind} event of {reservation_id}" + (" reclaimed after the claim timeout" if reclaimed else ""),
            )
        if on_claimed is not None:
            for claim in claims:
                transaction.on_commit(lambda claim=claim: on_claimed(claim))
    return claims


def event_for_claim(*, claim: EventClaim) -> Event | None:
    """The event if ``claim`` still holds it (else None: gone, done, or reclaimed by another worker)."""
    return (
        Event.objects.select_related("reservation").filter(
            pk=claim.event_id, status=Event.Status.CLAIMED, claimed_by=claim.token
        ).first()
    )


def event_record(*, claim: EventClaim, now: datetime, done: bool, error: str = "",
                 retry_in: timedelta | None = None) -> bool:
    """Record how a claimed event went: done, or back to pending after ``retry_in``.

    Conditional on still holding the claim, so a worker that lost its claim records nothing.
    """
    with transaction.atomic():
        event = Event.objects.select_for_update().filter(
            pk=claim.event_id, status=Event.Status.CLAIMED, claimed_by=claim.token
        ).first()
        if event is None:
            return False
        before = {"status": event.status, "due_at": event.due_at.isoformat()}
        if done:
            event.status, event.done_at = Event.Status.DONE, now
        else:
            event.status, event.due_at = Event.Status.PENDING, now + (retry_in or timedelta(0))
        event.last_error = error[:4000]
        event.claimed_by = ""
        event.save(update_fields=["status", "done_at", "due_at", "last_error", "claimed_by"])
        audit_record(
            actor=SCHEDULER, action=f"reservation_event.{'done' if done else 'retry'}", obj=event,
            before=before, after={"status": event.status, "due_at": event.due_at.isoformat(), "error": error[:500]},
        )
    return True


def event_due_at(*, reservation: Reservation, kind: str) -> datetime:
    return reservation_event_due_times(reservation)[kind]


def reservation_events_ensure(*, reservation_id, kinds: list[str], now: datetime,
                              requeue_finished: bool = True) -> list[str]:
    """Level-based safety net: each named event exists and is live (pending, or claimed recently).

    A missing event is created (due when it should be); a claim older than the claim timeout is
    put back to pending; with ``requeue_finished`` a done or cancelled event is pending again
    (its work is evidently not finished: the reservation is still waiting for it). Returns what
    was changed (for the log).
    """
    changed = []
    stale = now - _setting("CLAIM_TIMEOUT")
    with transaction.atomic():
        reservation = Reservation.objects.get(pk=reservation_id)
        for kind in kinds:
            event, created = Event.objects.get_or_create(
                reservation=reservation, kind=kind, defaults={"due_at": event_due_at(reservation=reservation, kind=kind)}
            )
            if created:
                changed.append(f"{kind}: created")
                audit_record(actor=SCHEDULER, action="reservation_event.created", obj=event,
                             tenant_id=reservation.tenant_id, after={"kind": kind, "due_at": event.due_at.isoformat()})
                continue
            requeue = (
                (event.status == Event.Status.CLAIMED and event.claimed_at and event.claimed_at < stale)
                or (requeue_finished and event.status in (Event.Status.DONE, Event.Status.CANCELLED))
            )
            if requeue:
                updated = Event.objects.filter(pk=event.pk, status=event.status, claimed_by=event.claimed_by).update(
                    status=Event.Status.PENDING, claimed_by="", done_at=None,
                )
                if updated:
                    changed.append(f"{kind}: {event.status} → pending")
                    audit_record(actor=SCHEDULER, action="reservation_event.requeued", obj=event,
                                 tenant_id=reservation.tenant_id, before={"status": event.status},
                                 after={"status": Event.Status.PENDING})
    return changed


# --- Pool lease: one worker calls the cluster for a pool at a time ------------------------------

def pool_lease_acquire(*, reservation_id, token: str, now: datetime) -> bool:
    pool_get_or_create(reservation_id=reservation_id)
    free = Q(lease_until__isnull=True) | Q(lease_until__lt=now) | Q(lease_token=token)
    return bool(
        Pool.objects.filter(free, pk=reservation_id).update(
            lease_token=token, lease_until=now + _setting("CLAIM_TIMEOUT")
        )
    )


def pool_lease_release(*, reservation_id, token: str) -> None:
    Pool.objects.filter(pk=reservation_id, lease_token=token).update(lease_token="", lease_until=None)


def tenant_lease_acquire(*, tenant_id, cluster_id, token: str, now: datetime, ttl: timedelta) -> bool:
    """Claim the tenant's objects in a cluster for one call (see ``TenantClusterLease``)."""
    TenantClusterLease.objects.get_or_create(tenant_id=tenant_id, cluster_id=cluster_id)
    free = Q(lease_until__isnull=True) | Q(lease_until__lt=now) | Q(lease_token=token)
    return bool(TenantClusterLease.objects.filter(free, tenant_id=tenant_id, cluster_id=cluster_id).update(
        lease_token=token, lease_until=now + ttl
    ))


def tenant_lease_release(*, tenant_id, cluster_id, token: str) -> None:
    TenantClusterLease.objects.filter(tenant_id=tenant_id, cluster_id=cluster_id, lease_token=token).update(
        lease_token="", lease_until=None
    )


# --- Provision --------------------------------------------------------------------------------

def reservation_provision_begin(*, reservation_id, now: datetime) -> Reservation | None:
    """confirmed → provisioning (and the pool marked on the cluster before anything is created).

    Returns the reservation when it is to be provisioned now, None when there is nothing to do.
    """
    with transaction.atomic():
        reservation = Reservation.objects.select_for_update().filter(
            pk=reservation_id
        ).first()
        if reservation is None or reservation.status not in (S.CONFIRMED, S.PROVISIONING):
            return None
        Pool.objects.filter(pk=reservation_id, on_cluster=False).update(on_cluster=True, cleaned_at=None)
        if reservation.status == S.CONFIRMED:
            reservation_transition(reservation=reservation, to=S.PROVISIONING, actor=SCHEDULER,
                                   reason="The window starts soon: provisioning the node pool.")
    return reservation


def reservation_provision_record_ready(*, reservation_id, readiness: dict, passed_at: datetime,
                                       now: datetime) -> bool:
    """The readiness check passed: store it, start billing (ready_at), provisioning → active.

    False, changing nothing, when the reservation is no longer provisioning, or when the check
    passed only after the window ended (nothing was delivered; the caller gives up).
    """
    with transaction.atomic():
        reservation = Reservation.objects.select_for_update().get(pk=reservation_id)
        if reservation.status != S.PROVISIONING or passed_at >= reservation.ends_at:
            return False
        # Billing starts when the pool passed its check, never before the booked window.
        ready_at = max(passed_at, reservation.starts_at)
        Reservation.objects.filter(pk=reservation_id).update(readiness=readiness, ready_at=ready_at, updated_at=now)
        Pool.objects.filter(pk=reservation_id).update(last_error="")
        audit_record(actor=SCHEDULER, action="reservation.ready", obj=reservation, tenant_id=reservation.tenant_id,
                     before={"ready_at": None}, after={"ready_at": ready_at.isoformat(), "readiness_passed": True})
        reservation_transition(reservation=reservation, to=S.ACTIVE, actor=SCHEDULER,
                               reason="The pool passed its readiness and isolation check.")
        _attempt(reservation_id=reservation_id, action=SchedulerAttempt.Action.PROVISION,
                 outcome=SchedulerAttempt.Outcome.OK, message="ready", now=now)
    return True


def reservation_provision_record_problem(*, reservation_id, message: str, now: datetime,
                                         readiness: dict | None = None) -> int:
    """A provisioning attempt did not succeed; returns how many attempts have failed so far."""
    with transaction.atomic():
        pool = Pool.objects.select_for_update(of=("self",)).select_related("reservation").get(pk=reservation_id)
        pool.provision_attempts += 1
        pool.last_error = message[:4000]
        pool.save(update_fields=["provision_attempts", "last_error", "updated_at"])
        if readiness is not None:
            Reservation.objects.filter(pk=reservation_id).update(readiness=readiness, updated_at=now)
        audit_record(actor=SCHEDULER, action="reservation.provision_problem", obj=pool.reservation,
                     tenant_id=pool.reservation.tenant_id, after={"attempt": pool.provision_attempts,
                                                                  "problem": message[:500]})
        _attempt(reservation_id=reservation_id, action=SchedulerAttempt.Action.PROVISION,
                 outcome=SchedulerAttempt.Outcome.RETRY, message=message, now=now)
    return pool.provision_attempts


def reservation_fail(*, reservation_id, reason: str, now: datetime, actor: Actor = SCHEDULER) -> bool:
    """Provisioning gave up: → failed with the reason, allocations cancelled (the nodes are free
    again), remaining events cancelled, nothing billed (ready_at stays empty)."""
    with transaction.atomic():
        reservation = Reservation.objects.select_for_update().get(pk=reservation_id)
        if reservation.status not in (S.PENDING, S.CONFIRMED, S.PROVISIONING):
            return False
        allocations = list(
            Allocation.objects.select_for_update().filter(reservation_id=reservation_id, state=Allocation.State.ACTIVE)
        )
        ids = [allocation.pk for allocation in allocations]
        Allocation.objects.filter(pk__in=ids).update(state=Allocation.State.CANCELLED)
        pool = pool_get_or_create(reservation_id=reservation_id)
        Pool.objects.filter(pk=reservation_id).update(freed_allocations=ids, last_error=reason[:4000])
        Event.objects.filter(reservation_id=reservation_id, status=Event.Status.PENDING).update(
            status=Event.Status.CANCELLED, last_error=reason[:4000]
        )
        audit_record(actor=actor, action="reservation.nodes_freed", obj=reservation, tenant_id=reservation.tenant_id,
                     after={"cancelled_allocations": ids, "on_cluster": pool.on_cluster})
        reservation_transition(reservation=reservation, to=S.FAILED, actor=actor, reason=reason)
        _attempt(reservation_id=reservation_id, action=SchedulerAttempt.Action.PROVISION,
                 outcome=SchedulerAttempt.Outcome.GAVE_UP, message=reason, now=now)
    return True


def pool_record_cleaned(*, reservation_id, now: datetime, action: str = SchedulerAttempt.Action.CLEANUP) -> bool:
    """Labels, taints and the tenant's quota share of a reservation that is over are gone."""
    with transaction.atomic():
        pool = Pool.objects.select_for_update(of=("self",)).select_related("reservation").get(pk=reservation_id)
        if not pool.on_cluster or pool.reservation.status in (S.PROVISIONING, S.ACTIVE, S.DEGRADED):
            return False
        Pool.objects.filter(pk=reservation_id).update(on_cluster=False, cleaned_at=now)
        audit_record(actor=SCHEDULER, action="pool.cleaned", obj=pool.reservation,
                     tenant_id=pool.reservation.tenant_id, before={"on_cluster": True}, after={"on_cluster": False})
        _attempt(reservation_id=reservation_id, action=action, outcome=SchedulerAttempt.Outcome.OK,
                 message="cluster objects removed", now=now)
    return True


def scheduler_attempt_record(*, reservation_id, action: str, outcome: str, message: str, now: datetime) -> None:
    _attempt(reservation_id=reservation_id, action=action, outcome=outcome, message=message, now=now)


# --- Notice before the end --------------------------------------------------------------------

def reservation_end_notice_record(*, reservation_id, now: datetime) -> PoolNotice | None:
    """Record the notice that the window ends soon; None when the pool is not running.

    One notice per reservation, stating the current end: after an extension its message is
    rewritten and it is to be posted again (``posted_to_cluster_at`` cleared), since the notice on
    the cluster states the old end.
    """
    with transaction.atomic():
        reservation = Reservation.objects.select_for_update().get(pk=reservation_id)
        if reservation.status not in (S.PROVISIONING, S.ACTIVE, S.DEGRADED):
            return None
        message = (
            f"Reservation {reservation.pk} ends at {reservation.ends_at:%Y-%m-%d %H:%M} UTC. Your pods on pool "
            f"{reservation.pool_name} will then be evicted; save your work before then."
        )
        notice, created = PoolNotice.objects.select_for_update().get_or_create(
            reservation=reservation, kind=PoolNotice.Kind.END_SOON, defaults={"message": message, "created_at": now}
        )
        if not created and notice.message == message:
            return notice
        before = None if created else {"message": notice.message}
        if not created:
            notice.message, notice.posted_to_cluster_at = message, None
            notice.save(update_fields=["message", "posted_to_cluster_at"])
        Reservation.objects.filter(pk=reservation_id).update(end_notice_at=now, updated_at=now)
        audit_record(actor=SCHEDULER, action="reservation.end_notice", obj=reservation, tenant_id=reservation.tenant_id,
                     before=before, after={"end_notice_at": now.isoformat(), "message": message})
    return notice


NOTICED_STATUSES = (S.PENDING, S.CONFIRMED, S.PROVISIONING, S.ACTIVE, S.DEGRADED)


def reservation_withdrawn_nodes_notice_refresh(*, actor: Actor, reservation_ids, now: datetime) -> None:
    """Bring each reservation's notice of its booked nodes that ops took out of service up to date.

    Level-based: the notice lists every node of the booking that is out of service now, or has
    maintenance planned in what is left of the window, whatever change triggered it; once none is
    left it says they are back. Called after the node change has committed (best effort: the change
    stands whatever happens here, and the next change refreshes the notice again).
    """
    for reservation_id in sorted({str(pk) for pk in reservation_ids}):
        try:
            _refresh_withdrawn_nodes_notice(actor=actor, reservation_id=reservation_id, now=now)
        except Exception:  # noqa: BLE001 - a notice must not turn a committed change into an error
            logger.exception("could not refresh the withdrawn-nodes notice of reservation %s", reservation_id)


def _refresh_withdrawn_nodes_notice(*, actor: Actor, reservation_id, now: datetime) -> None:
    with transaction.atomic():
        reservation = Reservation.objects.select_for_update().filter(pk=reservation_id).first()
        if reservation is None or reservation.status not in NOTICED_STATUSES:
            return  # over, or being released: nothing of it is still to come
        allocations = list(reservation.allocations.filter(state=Allocation.State.ACTIVE).select_related("node")
                           .order_by("node__name"))
        windows = selectors.maintenance_spans(node_ids=[a.node_id for a in allocations],
                                              starts_at=max(now, reservation.starts_at), ends_at=reservation.ends_at)
        withdrawn = []
        for allocation in allocations:
            node = allocation.node
            if node.status != Node.Status.AVAILABLE:
                withdrawn.append(f"{node.name} ({node.get_status_display().lower()})")
            elif node.pk in windows:
                first, last = windows[node.pk]
                withdrawn.append(f"{node.name} (maintenance {first.astimezone(UTC):%Y-%m-%d %H:%M} – "
                                 f"{last.astimezone(UTC):%Y-%m-%d %H:%M} UTC)")
        notice = PoolNotice.objects.select_for_update().filter(
            reservation=reservation, kind=PoolNotice.Kind.NODE_WITHDRAWN).first()
        if withdrawn:
            message = (
                f"Ops have taken node(s) of this reservation out of service: {'; '.join(withdrawn)}. The scheduler "
                "replaces such a node with a free one of the same model; while none is free the pool runs without "
                "it, degraded, and its time is not billed (a node whose maintenance is still ahead serves until it "
                "begins). If no booked node can serve when the window starts, the reservation fails and nothing is "
                "billed."
            )
        elif notice is None:
            return
        else:
            message = "The nodes of this reservation that ops had taken out of service are back in service."
        if notice is not None and notice.message == message:
            return
        if notice is None:
            PoolNotice.objects.create(reservation=reservation, kind=PoolNotice.Kind.NODE_WITHDRAWN, message=message,
                                      created_at=now)
        else:
            notice.message, notice.created_at = message, now
            notice.save(update_fields=["message", "created_at"])
        audit_record(actor=actor, action="reservation.node_withdrawn_notice", obj=reservation,
                     tenant_id=reservation.tenant_id, after={"message": message})


def pool_notice_mark_posted(*, notice_id, now: datetime) -> None:
    PoolNotice.objects.filter(pk=notice_id, posted_to_cluster_at__isnull=True).update(posted_to_cluster_at=now)


# --- Release ----------------------------------------------------------------------------------

def reservation_release_begin(*, reservation_id, now: datetime) -> Reservation | None:
    """active/degraded (or a provisioning that ran out of window) → releasing; the drain clock starts."""
    with transaction.atomic():
        reservation = Reservation.objects.select_for_update().filter(
            pk=reservation_id
        ).first()
        if reservation is None:
            return None
        if reservation.status in (S.ACTIVE, S.DEGRADED, S.PROVISIONING):
            if reservation.ends_at > now:
                return None  # extended after its end came due: it ends at the new end
            reservation_transition(reservation=reservation, to=S.RELEASING, actor=SCHEDULER,
                                   reason="The window ended: draining and releasing the node pool.")
        elif reservation.status != S.RELEASING:
            return None
        pool_get_or_create(reservation_id=reservation_id)
        Pool.objects.filter(pk=reservation_id, drain_started_at__isnull=True).update(drain_started_at=now)
    return reservation


def pool_is_on_cluster(*, reservation_id) -> bool:
    return Pool.objects.filter(pk=reservation_id, on_cluster=True).exists()


def pool_drain_started_at(*, reservation_id) -> datetime | None:
    return Pool.objects.filter(pk=reservation_id).values_list("drain_started_at", flat=True).first()


def reservation_release_record_done(*, reservation_id, now: datetime) -> bool:
    """Drained, unlabelled, quota shrunk: allocations released, downtimes closed, → completed."""
    with transaction.atomic():
        reservation = Reservation.objects.select_for_update().get(pk=reservation_id)
        if reservation.status != S.RELEASING:
            return False
        released = Allocation.objects.filter(reservation_id=reservation_id, state=Allocation.State.ACTIVE).update(
            state=Allocation.State.RELEASED
        )
        Downtime.objects.filter(reservation_id=reservation_id, ended_at__isnull=True).update(
            ended_at=now, resolution="reservation released"
        )
        Reservation.objects.filter(pk=reservation_id).update(released_at=now, updated_at=now)
        Pool.objects.filter(pk=reservation_id).update(on_cluster=False, cleaned_at=now, last_error="")
        audit_record(actor=SCHEDULER, action="reservation.released", obj=reservation, tenant_id=reservation.tenant_id,
                     after={"released_at": now.isoformat(), "allocations_released": released})
        reservation_transition(reservation=reservation, to=S.COMPLETED, actor=SCHEDULER,
                               reason="The node pool was released; the nodes return to the idle inventory "
                                      "after the cleaning gap.")
        _attempt(reservation_id=reservation_id, action=SchedulerAttempt.Action.RELEASE,
                 outcome=SchedulerAttempt.Outcome.OK, message="released", now=now)
    return True


# --- Health and healing -----------------------------------------------------------------------

def node_health_record(*, node_ids: list[int], health: str, now: datetime) -> int:
    """Record observed node health; a change of health is audited."""
    changed = list(Node.objects.filter(pk__in=node_ids).exclude(health=health).values_list("pk", "health"))
    Node.objects.filter(pk__in=node_ids).update(health=health, health_checked_at=now)
    for pk, before in changed:
        audit_record(actor=SCHEDULER, action="node.health", obj=Node(pk=pk), before={"health": before},
                     after={"health": health})
    return len(changed)


def reservation_degrade(*, reservation_id, node_id, reason: str, now: datetime) -> bool:
    """A pool node is unusable: a downtime opened for it (once) and active → degraded."""
    with transaction.atomic():
        reservation = Reservation.objects.select_for_update().get(pk=reservation_id)
        if reservation.status not in (S.ACTIVE, S.DEGRADED):
            return False
        if not Downtime.objects.filter(reservation_id=reservation_id, node_id=node_id, ended_at__isnull=True).exists():
            downtime = Downtime.objects.create(reservation_id=reservation_id, node_id=node_id, started_at=now,
                                               reason=reason[:500])
            audit_record(actor=SCHEDULER, action="downtime.opened", obj=downtime, tenant_id=reservation.tenant_id,
                         after={"node": node_id, "reason": reason[:500]})
        if reservation.status == S.ACTIVE:
            reservation_transition(reservation=reservation, to=S.DEGRADED, actor=SCHEDULER, reason=reason)
    return True


def allocation_swap(*, reservation_id, allocation_id, now: datetime) -> Allocation | None:
    """Replace the allocation's node with a free node of the same model (same topology domain when
    the booking asked for one), from now to the end of the allocation.

    The database's exclusion constraint guards double booking: a node taken meanwhile raises
    IntegrityError and the next candidate is tried. Returns the new allocation, or None.
    """
    old = Allocation.objects.select_related("node", "reservation").get(pk=allocation_id)
    reservation = old.reservation
    start = max(now, old.starts_at)
    if start >= old.ends_at:
        return None
    for node in selectors.swap_candidates(reservation=reservation, failed_node=old.node, starts_at=start,
                                          blocked_until=old.blocked_until):
        try:
            with transaction.atomic():
                locked = Reservation.objects.select_for_update().get(pk=reservation_id)
                current = Allocation.objects.select_for_update().get(pk=allocation_id)
                if locked.status not in (S.PROVISIONING, S.ACTIVE, S.DEGRADED) or current.state != Allocation.State.ACTIVE:
                    return None
                # SQLite has no exclusion constraint; its write transactions are serialised, so
                # this check runs alone. On PostgreSQL the constraint decides.
                if not selectors.node_is_free(node_id=node.pk, starts_at=start, blocked_until=old.blocked_until):
                    continue
                if now <= current.starts_at:
                    current.state = Allocation.State.CANCELLED  # never used: frees its period entirely
                else:
                    current.state = Allocation.State.REPLACED
                    current.ends_at = now
                    # The node leaves the pool as at any end: blocked for the cleaning gap, while
                    # heal drains the tenant's pods off it, so no booking or swap takes it meanwhile.
                    current.blocked_until = min(now + cleaning_gap(), current.blocked_until)
                current.save(update_fields=["state", "ends_at", "blocked_until"])
                new = Allocation.objects.create(
                    reservation_id=reservation_id, node=node, starts_at=start, ends_at=old.ends_at,
                    blocked_until=old.blocked_until,
                )
                audit_record(
                    actor=SCHEDULER, action="allocation.swapped", obj=new, tenant_id=locked.tenant_id,
                    before={"allocation": current.pk, "node": old.node.name, "state": current.state},
                    after={"allocation": new.pk, "node": node.name, "starts_at": start.isoformat()},
                )
                _attempt(reservation_id=reservation_id, action=SchedulerAttempt.Action.HEAL,
                         outcome=SchedulerAttempt.Outcome.OK, message=f"{old.node.name} replaced by {node.name}",
                         now=now)
                return new
        except IntegrityError:
            continue  # taken by a booking at the same moment: try the next candidate
    return None


def reservation_recover(*, reservation_id, node_ids: list[int] | None, now: datetime, resolution: str) -> bool:
    """Close the open downtimes (of ``node_ids``, or all); with none left open, degraded → active."""
    with transaction.atomic():
        reservation = Reservation.objects.select_for_update().get(pk=reservation_id)
        downtimes = Downtime.objects.filter(reservation_id=reservation_id, ended_at__isnull=True)
        if node_ids is not None:
            downtimes = downtimes.filter(node_id__in=node_ids)
        for downtime in downtimes:
            Downtime.objects.filter(pk=downtime.pk).update(ended_at=now, resolution=resolution[:200])
            audit_record(actor=SCHEDULER, action="downtime.closed", obj=downtime, tenant_id=reservation.tenant_id,
                         after={"ended_at": now.isoformat(), "resolution": resolution})
        still_open = Downtime.objects.filter(reservation_id=reservation_id, ended_at__isnull=True).exists()
        if reservation.status == S.DEGRADED and not still_open:
            reservation_transition(reservation=reservation, to=S.ACTIVE, actor=SCHEDULER, reason=resolution)
            return True
    return False


# --- Ops: retry a failed reservation ----------------------------------------------------------

def reservation_retry(*, reservation_id, actor: Actor, now: datetime) -> Reservation:
    """Ops retry: allocate the freed nodes again (if still free) and go back to confirmed, so the
    start event provisions the pool again."""
    with transaction.atomic():
        reservation = Reservation.objects.select_for_update().filter(pk=reservation_id).first()
        if reservation is None:
            raise NotFound("No such reservation.")
        if reservation.status != S.FAILED:
            raise Conflict(f"Only a failed reservation can be retried; this one is {reservation.status}.",
                           code="not_failed")
        if reservation.ends_at <= now:
            raise PolicyViolation("The reservation's window is over; it cannot be provisioned any more.",
                                  code="window_over")
        pool = pool_get_or_create(reservation_id=reservation_id)
        freed = list(Allocation.objects.filter(pk__in=pool.freed_allocations).select_related("node"))
        if not freed:
            raise Conflict("This reservation has no freed nodes to allocate again.", code="no_nodes")
        created = []
        for old in freed:
            if not selectors.node_is_free(node_id=old.node_id, starts_at=old.starts_at,
                                          blocked_until=old.blocked_until):
                raise Conflict(f"Node {old.node.name} has been booked by another reservation meanwhile; "
                               "book again instead.", code="node_taken")
            try:
                with transaction.atomic():
                    created.append(Allocation.objects.create(
                        reservation=reservation, node_id=old.node_id, starts_at=old.starts_at, ends_at=old.ends_at,
                        blocked_until=old.blocked_until,
                    ))
            except IntegrityError:
                raise Conflict(f"Node {old.node.name} has been booked by another reservation meanwhile; "
                               "book again instead.", code="node_taken") from None
        for event in Event.objects.filter(reservation=reservation):
            due = event_due_at(reservation=reservation, kind=event.kind)
            Event.objects.filter(pk=event.pk).update(
                status=Event.Status.PENDING, due_at=min(due, now) if event.kind == Event.Kind.START else due,
                attempts=0, claimed_at=None, claimed_by="", done_at=None, last_error="",
            )
        Pool.objects.filter(pk=reservation_id).update(provision_attempts=0, freed_allocations=[], last_error="")
        Reservation.objects.filter(pk=reservation_id).update(readiness=None, updated_at=now)
        audit_record(actor=actor, action="reservation.retry", obj=reservation, tenant_id=reservation.tenant_id,
                     after={"allocations": [allocation.pk for allocation in created]})
        reservation_transition(reservation=reservation, to=S.CONFIRMED, actor=actor,
                               reason="Retried by operations: nodes allocated again.")
    return reservation
