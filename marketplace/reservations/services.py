"""Writes of the booking engine: book, cancel, extend, release, and the one state-transition function."""

import functools
import hashlib
import json
import logging
import math
import re
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.db import IntegrityError, OperationalError, ProgrammingError, connection, connections, transaction
from django.utils import timezone

from marketplace.core.db import fetch_prepared
from marketplace.core.exceptions import Conflict, InvalidInput, ServiceError
from marketplace.core.ids import uuid7
from marketplace.core.models import AuditLog
from marketplace.core.services import Actor, audit_record, audit_values
from marketplace.inventory.models import Cluster, GpuModel, Node, Region
from marketplace.reservations import money, policies, selectors
from marketplace.reservations.models import Allocation, Reservation, ReservationEvent
from marketplace.reservations.status import HOLDING, ReservationStatus, can_transition
from marketplace.tenants.models import Tenant

S = ReservationStatus
logger = logging.getLogger(__name__)


class IllegalTransition(Conflict):
    code = "illegal_transition"


class InsufficientCapacity(Conflict):
    code = "insufficient_capacity"


class _NodesTaken(Exception):
    """Internal: the offer's nodes were taken by concurrent bookings; the booking retries."""


class _NothingWritten(Exception):
    """Internal: ``refusal`` was raised before the attempt wrote anything.

    The transaction then ends with COMMIT, which has nothing to keep but the locks it releases,
    rather than ROLLBACK: psycopg forgets every prepared statement of a connection on ROLLBACK, and
    the connection's next booking would plan both of its statements again (milliseconds each).
    """

    def __init__(self, refusal: Exception) -> None:
        super().__init__(str(refusal))
        self.refusal = refusal


class IdempotencyKeyReused(Conflict):
    http_status = 422
    code = "idempotency_key_reused"


def _transition_audit(*, reservation: Reservation, current: str, to: str, actor: Actor, reason: str) -> dict:
    """The transition table's verdict on ``current`` → ``to``, and the values of the audit row that records it."""
    if not can_transition(current, to):
        raise IllegalTransition(
            f"A {current} reservation cannot become {to}.",
            fields={"status": [f"{current} → {to} is not allowed"]},
        )
    return audit_values(
        actor=actor, action=f"reservation.{to}", obj=reservation, tenant_id=reservation.tenant_id,
        before={"status": current}, after={"status": to, "reason": reason},
    )


def reservation_transition(*, reservation: Reservation, to: str, actor: Actor, reason: str = "") -> Reservation:
    """Move a reservation to ``to`` if the transition table allows it, and write the audit row.

    Locks the row for the rest of the caller's transaction; ``reservation`` is refreshed from the
    locked row so the check sees the current state, not a stale copy.
    """
    with transaction.atomic():
        locked = Reservation.objects.select_for_update().get(pk=reservation.pk)
        current = locked.status
        entry = AuditLog(**_transition_audit(reservation=locked, current=current, to=to, actor=actor, reason=reason))
        now = timezone.now()
        Reservation.objects.filter(pk=locked.pk).update(
            status=to, status_reason=reason, status_changed_at=now, updated_at=now
        )
        entry.save(force_insert=True)
    reservation.status, reservation.status_reason, reservation.status_changed_at = to, reason, now
    return reservation


# --- booking ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BookingResult:
    reservation: Reservation
    created: bool  # False: an earlier request with the same Idempotency-Key already booked it


def _fingerprint(**request) -> str:
    """Identity of a create request's body, as sent (an omitted start stays "now", not a time)."""
    canonical = {key: (value.isoformat() if isinstance(value, datetime) else value) for key, value in request.items()}
    return hashlib.sha256(json.dumps(canonical, sort_keys=True, default=str).encode()).hexdigest()


def _replay(*, tenant: Tenant, idempotency_key: str, fingerprint: str) -> BookingResult | None:
    if not idempotency_key:
        return None
    existing = Reservation.objects.filter(tenant=tenant, idempotency_key=idempotency_key).first()
    if existing is None:
        return None
    if existing.request_fingerprint != fingerprint:
        raise IdempotencyKeyReused(
            "This Idempotency-Key was already used for a different request; use a new key for a new booking.",
            fields={"idempotency_key": ["already used with a different body"]},
        )
    return BookingResult(reservation=existing, created=False)


def _held_peak(*, tenant: Tenant, start: datetime, end: datetime, exclude_pk=None) -> int:
    """Most GPUs the tenant's holding reservations hold at one instant within [start, end)."""
    held = Reservation.objects.filter(tenant=tenant, status__in=HOLDING, starts_at__lt=end, ends_at__gt=start)
    if exclude_pk is not None:
        held = held.exclude(pk=exclude_pk)
    return policies.held_peak_gpus(held=list(held.values_list("starts_at", "ends_at", "gpus")), start=start, end=end)


def reservation_event_due_times(reservation: Reservation) -> dict[str, datetime]:
    """When each of the reservation's due events (start, end notice, end) falls due. The one rule,
    used by booking and by the scheduler's safety net alike."""
    lead = settings.MARKETPLACE["PROVISION_LEAD_TIME"]
    notice = settings.MARKETPLACE["END_NOTICE_LEAD_TIME"]
    return {
        ReservationEvent.Kind.START: reservation.starts_at - lead,
        ReservationEvent.Kind.END_NOTICE: max(reservation.starts_at, reservation.ends_at - notice),
        ReservationEvent.Kind.END: reservation.ends_at,
    }


def _lock_random(free_nodes, count: int) -> list[int]:
    """Up to ``count`` of these free nodes, at random, row-locked, skipping nodes locked by others.

    Random, and SKIP LOCKED on PostgreSQL: concurrent bookings of the same window take disjoint
    nodes instead of inserting clashing allocations (two transactions inserting clashing rows
    under an exclusion constraint wait on each other until the deadlock detector ends one).
    The exclusion constraint still decides if a snapshot was stale.
    """
    return list(Node.objects.filter(pk__in=free_nodes.values("pk")).order_by("?")
                .select_for_update(no_key=True, skip_locked=True).values_list("pk", flat=True)[:count])


def _first_fit(*, model: GpuModel, region: Region | None, nodes: int, start: datetime,
               end: datetime) -> tuple[selectors.Offer, list[int]] | None:
    """The cheapest cluster's first topology domain with ``nodes`` free nodes, and those nodes.

    Walks free nodes domain by domain (one index probe per node) and stops at the first domain
    that fits, so a booking does not count the whole fleet. None if no single domain fits.
    """
    gpus = nodes * model.gpus_per_node
    for cluster in selectors.priced_clusters(gpu_model=model, region=region):
        free = selectors.free_nodes(gpu_model=model, start=start, end=end, cluster_ids=[cluster.cluster_id])
        counts: dict[str, int] = {}
        for domain in free.order_by("topology_domain").values_list("topology_domain", flat=True).iterator(chunk_size=64):
            counts[domain] = counts.get(domain, 0) + 1
            if counts[domain] != nodes:
                continue
            node_ids = _lock_random(free.filter(topology_domain=domain), nodes)
            if len(node_ids) < nodes:
                continue  # concurrent bookings are taking this domain; try the next one
            offer = selectors.Offer.in_cluster(cluster=cluster, nodes=nodes, gpus=gpus, domains=(domain,),
                                               start=start, end=end)
            return offer, node_ids
    return None


def _pick_nodes(*, gpu_model: GpuModel, offer: selectors.Offer, start: datetime, end: datetime) -> list[int]:
    """Concrete free nodes for an offer spanning several domains (see _lock_random)."""
    free = selectors.free_nodes(gpu_model=gpu_model, start=start, end=end, cluster_ids=[offer.cluster_id])
    chosen: list[int] = []
    for domain in offer.domains:
        chosen += _lock_random(free.filter(topology_domain=domain), offer.nodes - len(chosen))
    return chosen if len(chosen) == offer.nodes else []


def _is_double_booking(exc: IntegrityError) -> bool:
    cause = exc.__cause__
    return getattr(getattr(cause, "diag", None), "constraint_name", None) == "allocation_no_double_booking"


def _is_deadlock(exc: OperationalError) -> bool:
    # Two bookings waiting on each other's uncommitted allocations: PostgreSQL aborts one of them.
    return getattr(exc.__cause__, "sqlstate", None) in ("40P01", "40001")


def _is_idempotency_race(exc: IntegrityError) -> bool:
    cause = exc.__cause__
    name = getattr(getattr(cause, "diag", None), "constraint_name", None)
    if name is not None:
        # Not the message: an error from the booking function quotes its whole INSERT statement.
        return name == "reservation_tenant_idempotency_key_unique"
    return "idempotency_key" in str(exc)  # SQLite names the columns, not the constraint


CONFIRMED_REASON = "nodes allocated"


def _create_audit_request(*, model_name: str, gpus: int, start: datetime, end: datetime, enforce: bool) -> dict:
    """The part of a booking's audit record that the request decides (the placement is the other)."""
    return {"gpu_model": model_name, "gpus": gpus, "start": start.isoformat(), "end": end.isoformat(),
            "policies_enforced": enforce}


def _create_audit_after(*, model_name: str, gpus: int, offer: selectors.Offer, node_ids: list[int], start: datetime,
                        end: datetime, enforce: bool) -> dict:
    # The booking function on PostgreSQL adds the same placement keys in SQL (_BOOK_FUNCTION_BODY).
    return _create_audit_request(model_name=model_name, gpus=gpus, start=start, end=end, enforce=enforce) | {
        "cluster": offer.cluster, "nodes": node_ids, "unit_price": str(offer.unit_price),
        "total_price": str(offer.total_price), "currency": offer.currency,
    }


def reservation_create(
    *, actor: Actor, tenant: Tenant, gpu_model: str, gpus: int, end: datetime, start: datetime | None = None,
    region: str | None = None, same_domain: bool = False, idempotency_key: str = "", enforce_policies: bool = True,
) -> BookingResult:
    """Book ``gpus`` GPUs of ``gpu_model`` as whole nodes of one cluster for [start, end), all or nothing.

    The price is locked on the reservation. On PostgreSQL the exclusion constraint decides races:
    a booking that collides with a concurrent one rolls back and retries on the nodes still free.
    With an Idempotency-Key, a repeated request returns the first booking instead of booking again.
    """
    idempotency_key = (idempotency_key or "").strip()
    if len(idempotency_key) > 200:
        raise InvalidInput("Idempotency-Key is at most 200 characters.", fields={"idempotency_key": ["too long"]})
    # Only a request with a key can be replayed, so only then is its body's identity needed.
    fingerprint = _fingerprint(gpu_model=gpu_model, gpus=gpus, start=start, end=end, region=region or None,
                               same_domain=bool(same_domain)) if idempotency_key else ""
    if replay := _replay(tenant=tenant, idempotency_key=idempotency_key, fingerprint=fingerprint):
        return replay
    now = timezone.now()
    start = policies.resolve_start(start, now=now)
    policies.check_window(start=start, end=end, enforce=enforce_policies, now=now)
    # PostgreSQL's path looks the model and region up in its first statement; the portable one with the ORM.
    book_once = _book_once_postgresql if connection.vendor == "postgresql" else _book_once_portable
    one_call = connection.vendor == "postgresql"

    attempts = settings.MARKETPLACE["BOOKING_RETRIES"] + 1
    for attempt in range(attempts):
        try:
            if one_call:
                booked = _book_in_one_call(
                    actor=actor, tenant=tenant, model_name=gpu_model, region_code=region or None, gpus=gpus,
                    start=start, end=end, same_domain=same_domain, idempotency_key=idempotency_key,
                    fingerprint=fingerprint, enforce=enforce_policies)
                if isinstance(booked, BookingResult):
                    return booked
                one_call = False  # Python's policies decide, in the two-statement path
                if booked == _UNPLACED:
                    # whose first statement need not walk the domains the function has just walked in vain
                    book_once = functools.partial(_book_once_postgresql, walk=False)
            with transaction.atomic():
                try:
                    return book_once(
                        actor=actor, tenant=tenant, model_name=gpu_model, region_code=region or None, gpus=gpus,
                        start=start, end=end, same_domain=same_domain, idempotency_key=idempotency_key,
                        fingerprint=fingerprint, enforce=enforce_policies,
                    )
                except _NothingWritten as unwritten:
                    refusal = unwritten.refusal  # leaves the block normally: COMMIT
            raise refusal
        except IntegrityError as exc:
            if idempotency_key and _is_idempotency_race(exc):
                # An identical request committed first; answer with its booking.
                replay = _replay(tenant=tenant, idempotency_key=idempotency_key, fingerprint=fingerprint)
                if replay:
                    return replay
            if not _is_double_booking(exc):
                raise
            # Lost a race for a node: the transaction rolled back entirely; look again.
        except OperationalError as exc:
            if not _is_deadlock(exc):
                raise
        except _NodesTaken:
            pass
    raise InsufficientCapacity(
        f"Could not book {gpus} {gpu_model} GPUs: other bookings took the free nodes at the same moment. Try again."
    )


def _book_once_portable(*, actor: Actor, tenant: Tenant, model_name: str, region_code: str | None, gpus: int,
                        start: datetime, end: datetime, same_domain: bool, idempotency_key: str, fingerprint: str,
                        enforce: bool) -> BookingResult:
    """One booking attempt, inside the caller's transaction, with the ORM (any database)."""
    model = selectors.gpu_model_by_name(model_name)
    region = selectors.region_by_code(region_code)
    nodes = policies.check_gpus(gpus=gpus, gpus_per_node=model.gpus_per_node, model_name=model.name)
    # Locking the tenant row serialises one tenant's bookings (quota, idempotency) and nothing else.
    tenant = Tenant.objects.select_for_update().get(pk=tenant.pk)
    if replay := _replay(tenant=tenant, idempotency_key=idempotency_key, fingerprint=fingerprint):
        return replay
    policies.check_tenant_standing(tenant=tenant, enforce=enforce)
    policies.check_quota(tenant=tenant, held_peak=_held_peak(tenant=tenant, start=start, end=end), gpus=gpus,
                         enforce=enforce)
    plan = _first_fit(model=model, region=region, nodes=nodes, start=start, end=end)
    if plan is None:
        # No single domain fits: the full search says why, or offers nodes across domains.
        found = selectors.availability_search(gpu_model=model, gpus=gpus, start=start, end=end, region=region,
                                              same_domain=same_domain)
        if not found.offers:
            raise InsufficientCapacity(found.reason["message"])
        plan = found.offers[0], _pick_nodes(gpu_model=model, offer=found.offers[0], start=start, end=end)
    offer, node_ids = plan
    if len(node_ids) < offer.nodes:
        raise _NodesTaken()  # concurrent bookings hold them right now: search again
    # Sorted: concurrent bookings insert allocations in one global order.
    node_ids = sorted(node_ids)
    reservation = Reservation.objects.create(
        tenant=tenant, created_by=actor.user if actor.user is not None else tenant_owner_or_error(tenant),
        gpu_model=model, cluster_id=offer.cluster_id, gpus=gpus, same_domain=same_domain,
        starts_at=start, ends_at=end, status=S.PENDING, currency=offer.currency, unit_price=offer.unit_price,
        total_price=offer.total_price, idempotency_key=idempotency_key, request_fingerprint=fingerprint,
    )
    blocked_until = end + selectors.cleaning_gap()
    Allocation.objects.bulk_create([
        Allocation(reservation=reservation, node_id=node_id, starts_at=start, ends_at=end, blocked_until=blocked_until)
        for node_id in node_ids
    ])
    ReservationEvent.objects.bulk_create([
        ReservationEvent(reservation=reservation, kind=kind, due_at=due_at)
        for kind, due_at in reservation_event_due_times(reservation).items()
    ])
    audit_record(actor=actor, action="reservation.create", obj=reservation, tenant_id=tenant.pk,
                 after=_create_audit_after(model_name=model.name, gpus=gpus, offer=offer, node_ids=node_ids,
                                           start=start, end=end, enforce=enforce))
    reservation_transition(reservation=reservation, to=S.CONFIRMED, actor=actor, reason=CONFIRMED_REASON)
    return BookingResult(reservation=reservation, created=True)


# --- booking on PostgreSQL in two prepared statements -------------------------------------------------
#
# The same booking as the portable path above, with the round trips folded and the planning paid
# once per connection (core.db.fetch_prepared). Most bookings run both statements in one call of the
# booking function (further below); this path books what the function leaves to Python's decisions
# (refusals, the walk's giving up, a price not yet seen). (1) lock the tenant row, look up the model and
# region, read the priced clusters and, in the cheapest one, pick and lock the nodes of the first
# topology domain that has enough free ones (further clusters, if it has none, one statement each);
# (2) insert the reservation, its allocations, due events and audit rows in one statement that also
# reads the most GPUs the tenant already holds in the window, for the quota check. Every decision
# (unknown model or region, whole nodes, standing, quota, money) is still made here in Python by the
# same policies; a refusal after (1) ends the transaction with nothing written (see _NothingWritten),
# one after (2) rolls it back, so nothing is half-written. The exclusion constraint still decides
# races: a violation in (2) rolls back and reservation_create retries.

# Domains in name order, each probed lazily (the LIMIT 1 stops at the first that fits). Within a
# domain, nodes in id order from a random one onwards, wrapping round to the first: free ones are
# locked with SKIP LOCKED as they are found, so concurrent bookings of the same window take disjoint
# nodes, and the probe stops once it has enough (sorting the domain's free nodes at random instead
# probed every node of it). The busy test is selectors.free_nodes' (allocations blocked in
# [start, end + cleaning gap), non-cancelled maintenance windows), written for one node at a time.
#
# First fit packs a window's bookings into the first domains, so a walk from the first domain
# re-probes every domain already full in that window, node by node: as a window fills, that walk
# was most of a booking's cost. The walk starts instead at the domain of the cluster's latest
# booking overlapping the window (among its 64 latest bookings of the model), which first fit has
# just reached, and wraps round to the first domains after the last one. Domains before the start
# are full for that booking's window, or it would have taken them.
#
# A walk tries at most WALK_MAX_DOMAINS domains. In a window where the fleet is nearly full, every
# domain it tries is probed node by node in vain: walking all of them took 25-65 ms per cluster, and
# a booking walks every priced cluster before it falls back to the free-node count over them all
# (selectors.availability_search, one grouped query), which finds any domain the walk did not reach.
#
# Concurrent bookings of one window would all start at that domain and take each other's nodes
# (SKIP LOCKED, then lost races): the first WALK_SPREAD_DOMAINS domains from it are tried in random
# order, which spreads them at the cost of packing only those few domains out of order. The first
# booking of a window (no latest booking overlaps it) is plain first fit from the first domain.
#
# The walk is three lazy index scans of the domains (name, lowest and highest node id), appended in
# that order (the spread few, the rest from the start, then those before it) and cut off at
# WALK_MAX_DOMAINS; the nested loop keeps that order and LIMIT 1 stops at the first domain that
# fits, so only the domains walked are read.
# Without an ORDER BY at the top, SQL would allow any fitting domain: only the packing preference
# rests on that order. Within a domain, the same: two lazy scans of node_search_idx, appended.
#
# What to pick comes in as one row {target} (model, cluster, nodes, walk) joined once: written as
# scalar subqueries instead, each use would be an init-plan of its own, set up on every execution.
# Prepared statements get one generic plan, made before any parameter value is known: parameters
# are cast, and the fixed states are literals so that the partial indexes' predicates still match.
WALK_SPREAD_DOMAINS = 4
WALK_MAX_DOMAINS = 8
_PICK_NODES_TEMPLATE = """
SELECT d.topology_domain, picked.ids
FROM {target} AS t
LEFT JOIN LATERAL (
  SELECT n.topology_domain AS domain
  FROM (SELECT r.id, r.created_at FROM reservations_reservation r
        WHERE r.cluster_id = t.cluster AND r.gpu_model_id = t.model
        ORDER BY r.created_at DESC LIMIT 64) latest
  JOIN reservations_allocation a ON a.reservation_id = latest.id
  JOIN inventory_node n ON n.id = a.node_id
  WHERE a.starts_at < %(padded_end)s::timestamptz AND a.blocked_until > %(start)s::timestamptz
  ORDER BY latest.created_at DESC LIMIT 1
) hint ON true
CROSS JOIN LATERAL (
  SELECT * FROM (
    (SELECT * FROM ({domains} AND topology_domain >= COALESCE(hint.domain, '') {group}
                    ORDER BY topology_domain LIMIT {spread}) first_few
     ORDER BY CASE WHEN hint.domain IS NOT NULL THEN random() END, topology_domain)
    UNION ALL
    ({domains} AND topology_domain >= COALESCE(hint.domain, '') {group} ORDER BY topology_domain OFFSET {spread})
    UNION ALL
    ({domains} AND topology_domain < COALESCE(hint.domain, '') {group} ORDER BY topology_domain)
  ) walk
  LIMIT {walk}
) d
CROSS JOIN LATERAL (SELECT d.lowest + floor(random() * (d.highest - d.lowest + 1))::bigint AS id) first_node
CROSS JOIN LATERAL (
  SELECT array_agg(free.id ORDER BY free.id) AS ids FROM (  -- sorted: one global order of inserts
    SELECT id FROM (
      SELECT id FROM ({free} AND n.id >= first_node.id
                      ORDER BY n.id LIMIT t.nodes FOR NO KEY UPDATE OF n SKIP LOCKED) from_first
      UNION ALL
      SELECT id FROM ({free} AND n.id < first_node.id
                      ORDER BY n.id LIMIT t.nodes FOR NO KEY UPDATE OF n SKIP LOCKED) before_first
    ) round_the_domain
    LIMIT t.nodes
  ) free
) picked
WHERE cardinality(picked.ids) = t.nodes
LIMIT 1
"""

_DOMAINS = """SELECT topology_domain, min(id) AS lowest, max(id) AS highest FROM inventory_node
      WHERE gpu_model_id = t.model AND status = '{available}' AND cluster_id = t.cluster AND t.walk"""
_FREE_NODES = """SELECT n.id FROM inventory_node n
       WHERE n.gpu_model_id = t.model AND n.status = '{available}' AND n.cluster_id = t.cluster
         AND n.topology_domain = d.topology_domain AND n.health <> '{unhealthy}'
         AND NOT EXISTS (SELECT 1 FROM reservations_allocation a
                         WHERE a.node_id = n.id AND a.state <> '{cancelled}'
                           AND a.starts_at < %(padded_end)s::timestamptz AND a.blocked_until > %(start)s::timestamptz)
         AND NOT EXISTS (SELECT 1 FROM inventory_maintenancewindow m
                         WHERE m.node_id = n.id AND m.cancelled_at IS NULL
                           AND m.starts_at < %(padded_end)s::timestamptz AND m.ends_at > %(start)s::timestamptz)"""
_PICK_NODES_TEMPLATE = _PICK_NODES_TEMPLATE.replace("{domains}", _DOMAINS).replace("{free}", _FREE_NODES).replace(
    "{group}", "GROUP BY topology_domain").replace(
    "{available}", Node.Status.AVAILABLE.value).replace("{unhealthy}", Node.Health.UNHEALTHY.value).replace(
    "{cancelled}", Allocation.State.CANCELLED.value).replace("{spread}", str(WALK_SPREAD_DOMAINS)).replace(
    "{walk}", str(WALK_MAX_DOMAINS))

# The tenant row locked, the model and region looked up by name, the first priced cluster in
# selectors.price_order (then by name, COLLATE "C": the code-point order of selectors.priced_clusters) and the pick in it; one
# row, with NULL cluster columns if no cluster has a price. No pick unless the GPUs make whole nodes,
# nor when the caller says not to walk (the booking function's walk has just found nothing).
_TENANT_PRICES_AND_PICK_SQL = """
WITH tenant AS (
  SELECT slug, billing_status, gpu_quota, is_active FROM tenants_tenant WHERE id = %(tenant)s::bigint FOR UPDATE
), model AS MATERIALIZED (
  SELECT id, vendor, memory_gb, gpus_per_node, %(gpus)s::int / gpus_per_node AS nodes,
         %(gpus)s::int > 0 AND %(gpus)s::int %% gpus_per_node = 0 AS whole
  FROM inventory_gpumodel WHERE name = %(model_name)s::text
), region AS MATERIALIZED (
  SELECT id FROM inventory_region WHERE code = %(region_code)s::text
), priced AS MATERIALIZED (
  SELECT c.id, c.name, r.code, p.price_per_gpu_hour, p.currency,
         row_number() OVER (ORDER BY p.currency <> %(default_currency)s::text, p.currency COLLATE "C",
                            p.price_per_gpu_hour, c.name COLLATE "C") AS rank
  FROM inventory_cluster c
  JOIN inventory_region r ON r.id = c.region_id
  JOIN inventory_gpuprice p ON p.region_id = c.region_id AND p.gpu_model_id = (SELECT id FROM model)
  WHERE c.status = '""" + Cluster.Status.ACTIVE.value + """' AND (%(region_code)s::text IS NULL OR c.region_id = (SELECT id FROM region))
), pick AS MATERIALIZED (""" + _PICK_NODES_TEMPLATE.replace(
    "{target}", "(SELECT m.id AS model, c.id AS cluster, m.nodes, m.whole AND %(walk)s::bool AS walk "
    "FROM model m JOIN priced c ON c.rank = 1)"
) + """)
SELECT t.slug, t.billing_status, t.gpu_quota, t.is_active, m.id, m.vendor, m.memory_gb, m.gpus_per_node,
       (SELECT id FROM region), c.id, c.name, c.code, c.price_per_gpu_hour, c.currency, pick.topology_domain, pick.ids
FROM tenant t
LEFT JOIN model m ON true
LEFT JOIN priced c ON c.rank = 1
LEFT JOIN pick ON true
"""

HOLDING_SQL = ", ".join(f"'{status}'" for status in sorted(HOLDING))  # literals: the partial index matches

# Everything a booking writes, as the data-modifying CTEs of one statement. Audit rows keep their
# order (create, then the transition).
_WRITE_BOOKING_CTES = """
WITH reservation AS (
  INSERT INTO reservations_reservation (id, tenant_id, created_by_id, gpu_model_id, cluster_id, gpus, same_domain,
      starts_at, ends_at, status, status_reason, status_changed_at, currency, unit_price, total_price,
      idempotency_key, request_fingerprint, readiness, ready_at, end_notice_at, released_at, created_at, updated_at)
  VALUES (%(id)s::uuid, %(tenant)s::bigint, %(created_by)s::int, %(model)s::bigint, %(cluster)s::bigint,
      %(gpus)s::int, %(same_domain)s::bool, %(start)s::timestamptz, %(end)s::timestamptz, %(status)s::text,
      %(status_reason)s::text, %(now)s::timestamptz, %(currency)s::text, %(unit_price)s::numeric,
      %(total_price)s::numeric, %(idempotency_key)s::text, %(fingerprint)s::text, NULL, NULL, NULL, NULL,
      %(now)s::timestamptz, %(now)s::timestamptz)
), allocation AS (
  INSERT INTO reservations_allocation (reservation_id, node_id, starts_at, ends_at, blocked_until, state, created_at)
  SELECT %(id)s::uuid, node_id, %(start)s::timestamptz, %(end)s::timestamptz, %(blocked_until)s::timestamptz,
         '{ALLOCATION_ACTIVE}', %(now)s::timestamptz
  FROM unnest(%(nodes)s::bigint[]) AS node_id
), event AS (
  INSERT INTO reservations_reservationevent (reservation_id, kind, due_at, status, attempts, claimed_at, claimed_by,
      done_at, last_error)
  SELECT %(id)s::uuid, kind, due_at, '{EVENT_PENDING}', 0, NULL, '', NULL, ''
  FROM (VALUES {EVENT_ROWS}) AS e(kind, due_at)
), audit AS (
  INSERT INTO core_auditlog (at, actor_user_id, actor, tenant_id, action, object_type, object_id, before, after, message)
  SELECT %(now)s::timestamptz, (a.row->>'actor_user_id')::int, a.row->>'actor', (a.row->>'tenant_id')::bigint,
         a.row->>'action', a.row->>'object_type', a.row->>'object_id', NULLIF(a.row->'before', 'null'),
         NULLIF(a.row->'after', 'null'), a.row->>'message'
  FROM jsonb_array_elements(%(audit)s::jsonb) WITH ORDINALITY AS a(row, n)
  ORDER BY a.n
)
"""

# The most GPUs the tenant already holds at one instant of the window, for the quota check
# (policies.held_peak_gpus in SQL: periods clipped to the window, a running sum over their edges,
# ends before starts at the same instant). It runs after the tenant lock, so it sees every committed
# booking of the tenant, and not this one. The window test is a range overlap, which the status index
# cannot serve: with a plain starts_at condition the generic plan ANDs in a scan of that index over
# every holding reservation of the fleet.
_HELD_PEAK_SQL = """SELECT COALESCE(max(held), 0) FROM (
  SELECT sum(edge.gpus) OVER (ORDER BY edge.at, edge.gpus ROWS UNBOUNDED PRECEDING) AS held
  FROM reservations_reservation r
  CROSS JOIN LATERAL (VALUES (greatest(r.starts_at, %(start)s::timestamptz), r.gpus),
                             (least(r.ends_at, %(end)s::timestamptz), -r.gpus)) AS edge(at, gpus)
  WHERE r.tenant_id = %(tenant)s::bigint AND r.status IN ({HOLDING_SQL}) AND r.ends_at > %(start)s::timestamptz
    AND tstzrange(r.starts_at, r.ends_at, '[)') && tstzrange(%(start)s::timestamptz, %(end)s::timestamptz, '[)')
) edges
""".replace("{HOLDING_SQL}", HOLDING_SQL)
_WRITE_BOOKING_CTES = _WRITE_BOOKING_CTES.replace("{ALLOCATION_ACTIVE}", Allocation.State.ACTIVE.value).replace(
    "{EVENT_PENDING}", ReservationEvent.Status.PENDING.value).replace("{EVENT_ROWS}", ", ".join(
        f"('{kind.value}', %(due_{kind.value})s::timestamptz)" for kind in ReservationEvent.Kind))
# The two-statement path writes and reads the held peak in one statement (its main SELECT).
_INSERT_BOOKING_SQL = _WRITE_BOOKING_CTES + _HELD_PEAK_SQL


# --- booking on PostgreSQL in one call -------------------------------------------------------------
#
# Most bookings need none of the Python decisions between the two statements above: the model and
# region exist, the GPUs make whole nodes, the tenant may book and has quota left, the walk found the
# nodes, and the price is one this process has already priced. For them the two statements run inside
# one PL/pgSQL function, in one round trip: outside a transaction block, as a transaction of its own
# (no BEGIN and COMMIT round trips), inside one, under a savepoint (rolled back when it books nothing,
# so its locks go). It locks the tenant first, in a statement of its own, and each later statement
# takes a new snapshot: the pick, the idempotency check and the held peak see every committed booking
# of the tenant.
#
# The function decides only "book now": when any check does not pass it writes nothing and says
# "decide", and reservation_create runs the two-statement path, whose policies refuse with their own
# messages or book. Its checks mirror Tenant.can_book and policies.check_quota (the good standing
# comes in as a parameter), and the policy tests on PostgreSQL go through it. The money rule stays in
# Python (money.reservation_total): the caller passes the totals for the unit prices it has seen for
# the model; a price it has not seen comes back unpriced, and the caller prices it and calls again.
#
# The function's name carries a hash of its text, so code and function cannot drift apart: `migrate`
# installs the current one (post_migrate, see apps.py) and drops the others; a process whose function
# is missing (a deploy whose migrate has not run yet), or not executable by its database role, books
# the two-statement way for a while and logs it.

def _plpgsql(sql: str) -> str:
    """A statement's %(name)s placeholders as the booking function's p_name variables."""
    return re.sub(r"%\((\w+)\)s", r"p_\1", sql).replace("%%", "%")


# The function's answers when it books nothing: Python's policies decide; its walk found no nodes;
# the unit price is not among those the caller priced.
_BOOKED, _UNDECIDED, _UNPLACED, _UNPRICED = "booked", "decide", "unplaced", "price"


class _NothingBooked(Exception):
    """The function's answer when it booked nothing, raised to roll back its savepoint."""


_BOOK_FUNCTION_BODY = """(
  p_tenant bigint, p_model_name text, p_gpus int, p_region_code text, p_default_currency text, p_start timestamptz,
  p_end timestamptz, p_padded_end timestamptz, p_id uuid, p_created_by int, p_same_domain bool, p_status text,
  p_status_reason text, p_now timestamptz, p_idempotency_key text, p_fingerprint text, {EVENT_ARGUMENTS},
  p_audit_request jsonb, p_enforce bool, p_good_standing text, p_unit_prices numeric[], p_totals numeric[])
RETURNS TABLE (outcome text, model_id bigint, cluster_id bigint, unit_price numeric, currency text,
               total_price numeric)
LANGUAGE plpgsql VOLATILE AS $booking$
#variable_conflict use_column
-- (the statements' unqualified column names win over the OUT columns of the same names)
DECLARE
  p_slug text; p_billing_status text; p_quota int; p_is_active bool; p_model bigint; p_vendor text;
  p_memory_gb int; p_gpus_per_node int; p_region bigint; p_cluster bigint; p_cluster_name text;
  p_cluster_region text; p_unit_price numeric; p_currency text; p_domain text; p_nodes bigint[];
  p_blocked_until timestamptz := p_padded_end; p_total_price numeric; p_audit jsonb; p_written int;
  p_walk bool := true;
BEGIN
  -- The tenant lock first, in a statement of its own: the pick's snapshot is then taken after any
  -- wait for it, so a burst of one tenant's bookings does not pick the nodes the ones before took.
  PERFORM 1 FROM tenants_tenant WHERE id = p_tenant FOR UPDATE;
  {PICK}
  INTO p_slug, p_billing_status, p_quota, p_is_active, p_model, p_vendor, p_memory_gb, p_gpus_per_node, p_region,
       p_cluster, p_cluster_name, p_cluster_region, p_unit_price, p_currency, p_domain, p_nodes;
  outcome := '{UNDECIDED}';
  IF NOT FOUND THEN RETURN NEXT; RETURN; END IF;
  IF p_nodes IS NULL THEN outcome := '{UNPLACED}'; RETURN NEXT; RETURN; END IF;
  -- Nested IFs: a condition with a subquery runs through the executor even when its first part is false.
  IF p_idempotency_key <> '' THEN
    IF EXISTS (SELECT 1 FROM reservations_reservation
               WHERE tenant_id = p_tenant AND idempotency_key = p_idempotency_key) THEN RETURN NEXT; RETURN; END IF;
  END IF;
  IF p_enforce THEN
    IF NOT (p_is_active AND p_billing_status = p_good_standing) THEN RETURN NEXT; RETURN; END IF;
    IF ({HELD_PEAK}) + p_gpus > p_quota THEN RETURN NEXT; RETURN; END IF;
  END IF;
  p_total_price := p_totals[array_position(p_unit_prices, p_unit_price)];
  IF p_total_price IS NULL THEN
    outcome := '{UNPRICED}'; unit_price := p_unit_price; RETURN NEXT; RETURN;
  END IF;
  p_audit := jsonb_build_array(
    jsonb_set(p_audit_request->0, '{after}', (p_audit_request->0->'after') || jsonb_build_object(
      'cluster', p_cluster_name, 'nodes', to_jsonb(p_nodes), 'unit_price', p_unit_price::text,
      'total_price', p_total_price::text, 'currency', p_currency)),
    p_audit_request->1);
  {WRITE} SELECT 1 INTO p_written;
  outcome := '{BOOKED}'; model_id := p_model; cluster_id := p_cluster; unit_price := p_unit_price;
  currency := p_currency; total_price := p_total_price;
  RETURN NEXT;
END
$booking$""".replace("{BOOKED}", _BOOKED).replace("{UNDECIDED}", _UNDECIDED).replace("{UNPLACED}", _UNPLACED).replace(
    "{UNPRICED}", _UNPRICED).replace("{EVENT_ARGUMENTS}", ", ".join(
    f"p_due_{kind.value} timestamptz" for kind in ReservationEvent.Kind)).replace(
    "{PICK}", _plpgsql(_TENANT_PRICES_AND_PICK_SQL).strip()).replace(
    "{HELD_PEAK}", _plpgsql(_HELD_PEAK_SQL).strip()).replace("{WRITE}", _plpgsql(_WRITE_BOOKING_CTES).strip())
BOOK_FUNCTION = "reservation_book_" + hashlib.sha256(_BOOK_FUNCTION_BODY.encode()).hexdigest()[:12]
_BOOK_CALL_SQL = f"SELECT * FROM {BOOK_FUNCTION}(" + ", ".join(
    f"%({name})s::{type_}" for name, type_ in re.findall(
        r"\bp_(\w+) ([\w\[\]]+)", _BOOK_FUNCTION_BODY[:_BOOK_FUNCTION_BODY.index(")")])
) + ")"

# Unit prices this process has priced, per GPU model (newest last, a few per model): the totals the
# booking function may use. Prices change rarely; an unseen one costs one more call.
_SEEN_UNIT_PRICES: dict[str, tuple[Decimal, ...]] = {}
_SEEN_UNIT_PRICES_PER_MODEL = 16
# When this process last found the function unusable: it books the two-statement way for a while,
# rather than paying a failed call on every booking until the deploy's migrate has run.
_book_function_missing_at = -math.inf
_BOOK_FUNCTION_RECHECK_SECONDS = 60


def booking_function_install(*, using: str = "default") -> str:
    """Install this code's booking function on PostgreSQL and drop the others; returns its name.

    One that exists already is left alone: its name is its text's hash, and replacing it would make
    every connection compile it again.
    """
    # Two migrates at once would both create it (a unique violation in pg_proc): one at a time.
    with transaction.atomic(using=using), connections[using].cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(hashtext('reservation_book_install'))")
        cursor.execute("SELECT p.oid::regprocedure::text, p.proname = %s FROM pg_proc p "
                       "JOIN pg_namespace s ON s.oid = p.pronamespace "
                       "WHERE s.nspname = current_schema() AND p.prokind = 'f' "
                       "AND p.proname ~ '^reservation_book_[0-9a-f]{12}$'", [BOOK_FUNCTION])
        installed = cursor.fetchall()
        if not any(current for _, current in installed):
            cursor.execute(f"CREATE FUNCTION {BOOK_FUNCTION}{_BOOK_FUNCTION_BODY}")
        for older, current in installed:
            if not current:
                cursor.execute(f"DROP FUNCTION IF EXISTS {older}")
    return BOOK_FUNCTION


def _is_unusable_function(exc: ProgrammingError) -> bool:
    """The booking function is missing (42883), or the database role may not execute it (42501)."""
    return getattr(exc.__cause__, "sqlstate", None) in ("42883", "42501") and BOOK_FUNCTION in str(exc)


def _book_in_one_call(*, actor: Actor, tenant: Tenant, model_name: str, region_code: str | None, gpus: int,
                      start: datetime, end: datetime, same_domain: bool, idempotency_key: str, fingerprint: str,
                      enforce: bool) -> BookingResult | str:
    """The booking in one call of the booking function; or, if Python's policies must decide, why:
    _UNPLACED if the function's walk found no nodes, else _UNDECIDED."""
    global _book_function_missing_at
    if time.monotonic() - _book_function_missing_at < _BOOK_FUNCTION_RECHECK_SECONDS:
        return _UNDECIDED
    try:
        # The placement columns are filled in from the function's answer.
        reservation = _confirmed_reservation(actor=actor, tenant=tenant, gpus=gpus, same_domain=same_domain,
                                             start=start, end=end, idempotency_key=idempotency_key,
                                             fingerprint=fingerprint)
    except InvalidInput:
        return _UNDECIDED  # a task's booking, no member to record: refused in order by the two-statement path
    audit = _booking_audit(actor=actor, reservation=reservation, after=_create_audit_request(
        model_name=model_name, gpus=gpus, start=start, end=end, enforce=enforce))
    params = _booking_row_params(reservation) | {
        "model_name": model_name, "region_code": region_code, "padded_end": end + selectors.cleaning_gap(),
        "default_currency": settings.MARKETPLACE["DEFAULT_CURRENCY"], "audit_request": json.dumps(audit),
        "enforce": enforce, "good_standing": Tenant.BillingStatus.GOOD.value,
    }
    for _ in range(2):
        # A tuple, replaced whole when a price is added: threads of one process share it.
        prices = _SEEN_UNIT_PRICES.get(model_name, ())
        # As array literals (text), as _book_once_postgresql sends the nodes: an empty list would go
        # with another type, and the connection would prepare the call a second time.
        params["unit_prices"] = "{" + ",".join(map(str, prices)) + "}"
        params["totals"] = "{" + ",".join(
            str(money.reservation_total(unit_price=price, gpus=gpus, duration=end - start)) for price in prices) + "}"
        try:
            if connection.in_atomic_block:
                try:
                    with transaction.atomic():
                        [answer] = fetch_prepared(_BOOK_CALL_SQL, params)
                        if answer[0] != _BOOKED:
                            raise _NothingBooked(answer)  # rolls the savepoint back: the locks it took go
                except _NothingBooked as unbooked:
                    [answer] = unbooked.args
            else:
                [answer] = fetch_prepared(_BOOK_CALL_SQL, params)  # a transaction of its own
        except ProgrammingError as exc:
            if not _is_unusable_function(exc):
                raise
            _book_function_missing_at = time.monotonic()
            logger.warning("%s cannot be called (%s; run migrate): booking in two statements for %d s",
                           BOOK_FUNCTION, exc.__cause__.sqlstate, _BOOK_FUNCTION_RECHECK_SECONDS)
            return _UNDECIDED
        outcome, model_id, cluster_id, unit_price, currency, total_price = answer
        if outcome == _UNPRICED:
            _SEEN_UNIT_PRICES[model_name] = (*prices, unit_price)[-_SEEN_UNIT_PRICES_PER_MODEL:]
            continue
        if outcome != _BOOKED:
            return outcome
        reservation.gpu_model_id, reservation.cluster_id, reservation.currency = model_id, cluster_id, currency
        reservation.unit_price, reservation.total_price = unit_price, total_price
        return BookingResult(reservation=reservation, created=True)
    return _UNDECIDED


def _book_once_postgresql(*, actor: Actor, tenant: Tenant, model_name: str, region_code: str | None, gpus: int,
                          start: datetime, end: datetime, same_domain: bool, idempotency_key: str, fingerprint: str,
                          enforce: bool, walk: bool = True) -> BookingResult:
    """One booking attempt, inside the caller's transaction, in two prepared statements (PostgreSQL).

    With ``walk`` False the first statement picks no nodes, and the full search places the booking.
    """
    try:
        padded_end = end + selectors.cleaning_gap()
        pick_params = {"start": start, "padded_end": padded_end, "walk": walk}
        # Locking the tenant row serialises one tenant's bookings (quota, idempotency) and nothing else.
        rows = fetch_prepared(_TENANT_PRICES_AND_PICK_SQL, pick_params | {
            "tenant": tenant.pk, "model_name": model_name, "gpus": gpus, "region_code": region_code,
            "default_currency": settings.MARKETPLACE["DEFAULT_CURRENCY"]})
        if not rows:
            raise Tenant.DoesNotExist(f"No tenant {tenant.pk}.")
        [looked_up] = rows
        slug, billing_status, quota, is_active, model_id, vendor, memory_gb, gpus_per_node, region_id = looked_up[:9]
        if model_id is None:
            selectors.gpu_model_by_name(model_name)  # raises: no such model, naming the known ones
        if region_code and region_id is None:
            selectors.region_by_code(region_code)  # raises: no such region
        nodes = policies.check_gpus(gpus=gpus, gpus_per_node=gpus_per_node, model_name=model_name)
        locked = Tenant(pk=tenant.pk, slug=slug, billing_status=billing_status, gpu_quota=quota, is_active=is_active)
        if replay := _replay(tenant=tenant, idempotency_key=idempotency_key, fingerprint=fingerprint):
            return replay
        policies.check_tenant_standing(tenant=locked, enforce=enforce)

        def check_quota() -> None:
            # Before any capacity refusal, as the portable path does: a tenant over quota hears that first.
            policies.check_quota(tenant=locked, held_peak=_held_peak(tenant=tenant, start=start, end=end),
                                 gpus=gpus, enforce=enforce)

        plan = None
        # Columns 9-13 are the cheapest cluster (a selectors.PricedCluster's fields in order), 14-15
        # the walk's pick in it.
        if looked_up[9] is not None and looked_up[14] is not None:
            cheapest = selectors.PricedCluster(*looked_up[9:14])
            plan = selectors.Offer.in_cluster(cluster=cheapest, nodes=nodes, gpus=gpus, domains=(looked_up[14],),
                                              start=start, end=end), list(looked_up[15])
        if plan is None:
            # The walk gives up after WALK_MAX_DOMAINS domains, so its failing does not prove the
            # cheapest cluster has no domain that fits: the full search decides, as it quotes (the
            # cheapest cluster with one domain that fits, else one across domains), or says why not.
            model = GpuModel(id=model_id, name=model_name, vendor=vendor, memory_gb=memory_gb,
                             gpus_per_node=gpus_per_node)
            region_row = selectors.region_by_code(region_code)
            found = selectors.availability_search(gpu_model=model, gpus=gpus, start=start, end=end,
                                                  region=region_row, same_domain=same_domain)
            if not found.offers:
                check_quota()
                raise InsufficientCapacity(found.reason["message"])
            plan = found.offers[0], _pick_nodes(gpu_model=model, offer=found.offers[0], start=start, end=end)
        offer, node_ids = plan
        if len(node_ids) < offer.nodes:
            check_quota()
            raise _NodesTaken()  # concurrent bookings hold them right now: search again
    except (ServiceError, _NodesTaken) as refusal:
        raise _NothingWritten(refusal) from refusal
    # Sorted: concurrent bookings insert allocations in one global order.
    node_ids = sorted(node_ids)
    reservation = _confirmed_reservation(
        actor=actor, tenant=tenant, gpus=gpus, same_domain=same_domain, start=start, end=end,
        idempotency_key=idempotency_key, fingerprint=fingerprint, model_id=model_id, cluster_id=offer.cluster_id,
        currency=offer.currency, unit_price=offer.unit_price, total_price=offer.total_price)
    audit = _booking_audit(actor=actor, reservation=reservation, after=_create_audit_after(
        model_name=model_name, gpus=gpus, offer=offer, node_ids=node_ids, start=start, end=end, enforce=enforce))
    # Arrays and rows travel as text (an array literal, one JSON document): psycopg dumps text in C.
    [(held_peak,)] = fetch_prepared(_INSERT_BOOKING_SQL, _booking_row_params(reservation) | {
        "model": model_id, "cluster": offer.cluster_id, "currency": offer.currency, "unit_price": offer.unit_price,
        "total_price": offer.total_price, "blocked_until": padded_end,
        "nodes": "{" + ",".join(map(str, node_ids)) + "}", "audit": json.dumps(audit),
    })
    policies.check_quota(tenant=locked, held_peak=held_peak, gpus=gpus, enforce=enforce)
    return BookingResult(reservation=reservation, created=True)


def _confirmed_reservation(*, actor: Actor, tenant: Tenant, gpus: int, same_domain: bool, start: datetime,
                           end: datetime, idempotency_key: str, fingerprint: str, model_id: int | None = None,
                           cluster_id: int | None = None, currency: str = "", unit_price: Decimal | None = None,
                           total_price: Decimal | None = None) -> Reservation:
    """The instance of the row a PostgreSQL booking writes, built as if read back (a KeyError here
    means a new column these paths do not write yet): a third of the cost of keyword construction.

    Created pending and confirmed in one transaction, so no one ever sees it pending: the row is
    written confirmed, with both audit rows (_booking_audit), and the transition table has its say.
    """
    now = timezone.now()
    created_by = actor.user if actor.user is not None else tenant_owner_or_error(tenant)
    row = {
        "id": uuid7(), "tenant_id": tenant.pk, "created_by_id": created_by.pk, "gpu_model_id": model_id,
        "cluster_id": cluster_id, "gpus": gpus, "same_domain": same_domain, "starts_at": start, "ends_at": end,
        "status": S.CONFIRMED, "status_reason": CONFIRMED_REASON, "status_changed_at": now, "currency": currency,
        "unit_price": unit_price, "total_price": total_price, "idempotency_key": idempotency_key,
        "request_fingerprint": fingerprint, "readiness": None, "ready_at": None, "end_notice_at": None,
        "released_at": None, "created_at": now, "updated_at": now,
    }
    return Reservation.from_db(connection.alias, None,
                               [row[field.attname] for field in Reservation._meta.concrete_fields])


def _booking_audit(*, actor: Actor, reservation: Reservation, after: dict) -> list[dict]:
    """The audit rows of a booking: its creation, then pending → confirmed."""
    return [
        audit_values(actor=actor, action="reservation.create", obj=reservation, tenant_id=reservation.tenant_id,
                     after=after),
        _transition_audit(reservation=reservation, current=S.PENDING, to=S.CONFIRMED, actor=actor,
                          reason=CONFIRMED_REASON),
    ]


def _booking_row_params(reservation: Reservation) -> dict:
    """The parameters of the booking statements that the request decides (the placement comes apart)."""
    return {
        "id": reservation.pk, "tenant": reservation.tenant_id, "created_by": reservation.created_by_id,
        "gpus": reservation.gpus, "same_domain": reservation.same_domain, "start": reservation.starts_at,
        "end": reservation.ends_at, "status": reservation.status, "status_reason": reservation.status_reason,
        "now": reservation.created_at, "idempotency_key": reservation.idempotency_key,
        "fingerprint": reservation.request_fingerprint,
        **{f"due_{kind}": due_at for kind, due_at in reservation_event_due_times(reservation).items()},
    }


def tenant_owner_or_error(tenant: Tenant):
    """Bookings made by a task (no person) are recorded as made by the tenant's first owner."""
    owner = tenant.memberships.filter(role="owner").select_related("user").first() or \
        tenant.memberships.select_related("user").first()
    if owner is None:
        raise InvalidInput("Tenant has no members to record as the booker.")
    return owner.user


# --- changes to a booking -----------------------------------------------------------------------

def _locked(reservation: Reservation) -> Reservation:
    # Only the reservation row: FOR UPDATE on the joined GPU model row would block every booking of
    # that model at its commit (the foreign-key check takes FOR KEY SHARE on it) and can deadlock
    # with a booking that holds a node this change is waiting for.
    return Reservation.objects.select_for_update(of=("self",)).select_related("gpu_model").get(pk=reservation.pk)


def reservation_cancel(*, actor: Actor, reservation: Reservation, reason: str = "") -> Reservation:
    """Cancel before the pool is provisioned: frees the nodes (allocations cancelled) and the due events.

    Also once the window has begun while its pool has not (a booking for now, whose start is the
    current slot, or a scheduler running late): nothing was delivered, so there is nothing to
    release, and the scheduler's start finds the reservation cancelled and does nothing.
    """
    with transaction.atomic():
        locked = _locked(reservation)
        if locked.status in RELEASABLE:
            raise IllegalTransition(f"The reservation's pool is {locked.status}: release it instead of cancelling.",
                                    fields={"status": [f"is {locked.status}"]})
        if locked.status not in (S.PENDING, S.CONFIRMED):
            raise IllegalTransition(f"A {locked.status} reservation cannot be cancelled.",
                                    fields={"status": [f"is {locked.status}"]})
        locked.allocations.exclude(state=Allocation.State.CANCELLED).update(state=Allocation.State.CANCELLED)
        locked.events.filter(status=ReservationEvent.Status.PENDING).update(status=ReservationEvent.Status.CANCELLED)
        reservation_transition(reservation=locked, to=S.CANCELLED, actor=actor, reason=reason or "cancelled by tenant")
    reservation.refresh_from_db()
    return reservation


EXTENDABLE = (S.PENDING, S.CONFIRMED, S.PROVISIONING, S.ACTIVE, S.DEGRADED)


def reservation_extend(*, actor: Actor, reservation: Reservation, end: datetime,
                       enforce_policies: bool = True) -> Reservation:
    """Move the end later on the same nodes, if they stay free; reprice at the locked unit price."""
    with transaction.atomic():
        locked = _locked(reservation)
        now = timezone.now()
        if locked.status not in EXTENDABLE:
            raise IllegalTransition(f"A {locked.status} reservation cannot be extended.",
                                    fields={"status": [f"is {locked.status}"]})
        if locked.ends_at <= now:
            raise IllegalTransition(f"The reservation's window ended at {locked.ends_at:%Y-%m-%d %H:%M} UTC: it "
                                    "cannot be extended any more; book a new window instead.",
                                    fields={"end": ["the window is over"]})
        if end <= locked.ends_at:
            raise InvalidInput("The new end must be later than the current end.", fields={"end": ["not later"]})
        policies.check_window(start=locked.starts_at, end=end, enforce=enforce_policies, now=now, extending=True)
        tenant = Tenant.objects.select_for_update().get(pk=locked.tenant_id)
        policies.check_tenant_standing(tenant=tenant, enforce=enforce_policies)
        policies.check_quota(tenant=tenant, held_peak=_held_peak(tenant=tenant, start=locked.ends_at, end=end,
                                                                 exclude_pk=locked.pk),
                             gpus=locked.gpus, enforce=enforce_policies)
        allocations = locked.allocations.filter(state=Allocation.State.ACTIVE)
        node_ids = list(allocations.values_list("node_id", flat=True))
        # Lock our nodes first: concurrent bookings (SKIP LOCKED) then leave them alone, and the
        # check below sees every booking that got to them before us.
        list(Node.objects.filter(pk__in=node_ids).order_by("pk").select_for_update(no_key=True)
             .values_list("pk", flat=True))
        still_free = set(selectors.free_nodes(gpu_model=locked.gpu_model, start=locked.ends_at, end=end,
                                              ignore_reservation=locked)
                         .filter(pk__in=node_ids).values_list("pk", flat=True))
        if taken := sorted(set(node_ids) - still_free):
            names = ", ".join(Node.objects.filter(pk__in=taken).order_by("name").values_list("name", flat=True))
            raise InsufficientCapacity(f"Cannot extend: node(s) {names} are booked or unavailable after the current end.",
                                       fields={"end": ["nodes not free until then"]})
        before = {"end": locked.ends_at.isoformat(), "total_price": str(locked.total_price)}
        try:
            with transaction.atomic():
                allocations.update(ends_at=end, blocked_until=end + selectors.cleaning_gap())
        except IntegrityError as exc:
            if _is_double_booking(exc):
                raise InsufficientCapacity("Cannot extend: another booking took the nodes meanwhile.") from exc
            raise
        except OperationalError as exc:
            if _is_deadlock(exc):
                raise InsufficientCapacity("Cannot extend right now: a booking of the same nodes is in progress. "
                                           "Try again.") from exc
            raise
        locked.ends_at = end
        locked.total_price = money.reservation_total(unit_price=locked.unit_price, gpus=locked.gpus,
                                                     duration=end - locked.starts_at)
        locked.save(update_fields=["ends_at", "total_price", "updated_at"])
        _reschedule_end(locked)
        audit_record(actor=actor, action="reservation.extend", obj=locked, tenant_id=locked.tenant_id, before=before,
                     after={"end": end.isoformat(), "total_price": str(locked.total_price)})
    reservation.refresh_from_db()
    return reservation


def _reschedule_end(reservation: Reservation, *, end_due: datetime | None = None) -> None:
    """Move the end events to the reservation's (new) end.

    A notice already sent (or being sent) announced the old end: it is due again, at once if its
    time has passed, and says the new end. (Release early cancels the pending notice beforehand
    and passes ``end_due``: a sent one stays sent.)
    """
    due = reservation_event_due_times(reservation)
    notice, end, pending = ReservationEvent.Kind.END_NOTICE, ReservationEvent.Kind.END, ReservationEvent.Status.PENDING
    reservation.events.filter(status=pending, kind=notice).update(due_at=due[notice])
    reservation.events.filter(status=pending, kind=end).update(due_at=end_due or due[end])
    if end_due is None:
        sent = (ReservationEvent.Status.DONE, ReservationEvent.Status.CLAIMED)
        reservation.events.filter(kind=notice, status__in=sent).update(
            status=pending, due_at=max(due[notice], timezone.now()), claimed_by="", done_at=None)


RELEASABLE = (S.PROVISIONING, S.ACTIVE, S.DEGRADED)


def reservation_release(*, actor: Actor, reservation: Reservation, reason: str = "") -> Reservation:
    """End a running reservation now (rounded up to the granularity): trim, reprice, release."""
    with transaction.atomic():
        locked = _locked(reservation)
        now = timezone.now()
        if locked.status in (S.PENDING, S.CONFIRMED):
            raise IllegalTransition("The reservation's pool has not been provisioned: cancel it instead.",
                                    fields={"status": ["not started"]})
        if locked.status not in RELEASABLE:
            raise IllegalTransition(f"A {locked.status} reservation cannot be released.",
                                    fields={"status": [f"is {locked.status}"]})
        new_end = max(policies.ceil_to_granularity(now), locked.starts_at + policies.granularity())
        before = {"end": locked.ends_at.isoformat(), "total_price": str(locked.total_price)}
        if new_end < locked.ends_at:
            locked.allocations.filter(state=Allocation.State.ACTIVE).update(
                ends_at=new_end, blocked_until=new_end + selectors.cleaning_gap())
            locked.ends_at = new_end
            locked.total_price = money.reservation_total(unit_price=locked.unit_price, gpus=locked.gpus,
                                                         duration=new_end - locked.starts_at)
        if now < locked.starts_at:
            # Released while its pool was being provisioned, before the window began: nothing was
            # delivered. (The window keeps its first slot: a reservation never ends at its start.)
            locked.total_price = money.reservation_total(unit_price=locked.unit_price, gpus=locked.gpus,
                                                         duration=timedelta(0))
        locked.released_at = now
        locked.save(update_fields=["ends_at", "total_price", "released_at", "updated_at"])
        # The scheduler drains the pool when the end event is due: that is now.
        locked.events.filter(status=ReservationEvent.Status.PENDING, kind=ReservationEvent.Kind.END_NOTICE).update(
            status=ReservationEvent.Status.CANCELLED)
        _reschedule_end(locked, end_due=now)
        audit_record(actor=actor, action="reservation.release_early", obj=locked, tenant_id=locked.tenant_id,
                     before=before, after={"end": locked.ends_at.isoformat(), "total_price": str(locked.total_price)})
        reservation_transition(reservation=locked, to=S.RELEASING, actor=actor, reason=reason or "released early")
    reservation.refresh_from_db()
    return reservation
