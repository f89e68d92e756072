"""The scheduler's logic: what each reservation's pool should look like, what the cluster shows,
and the calls that close the difference.

Every step follows "claim, call, record": a short transaction claims the work (a due event or the
pool's lease), the cluster driver is called with no transaction open, and a second short
transaction records the result (``marketplace.pools.services``). Every step is idempotent, so a
step run twice, concurrently, or again after its worker died leaves the same state.
"""

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.utils import timezone

from marketplace.inventory.models import Cluster, Node
from marketplace.metrics import POOL_NODE_SWAPS, SCHEDULER_STEPS
from marketplace.pools import selectors
from marketplace.pools import services
from marketplace.pools.models import SchedulerAttempt
from marketplace.reservations.models import Reservation, ReservationEvent
from marketplace.reservations.status import ReservationStatus as S
from scheduler import manifests
from scheduler.driver import ClusterDriver, GiveUp, NodeState, PoolSpec, RetryLater, TenantSpec, namespace_for
from scheduler.drivers import driver_for

# Which driver serves a cluster; a parameter so tests can pass a driver of their own.
Drivers = Callable[[Cluster], ClusterDriver]

log = logging.getLogger(__name__)
Event = ReservationEvent
Action = SchedulerAttempt.Action
Outcome = SchedulerAttempt.Outcome


@dataclass(frozen=True)
class Step:
    """How one step went: done, or try again after ``retry_in``."""

    done: bool
    note: str = ""
    retry_in: timedelta | None = None

    @classmethod
    def ok(cls, note: str = "") -> "Step":
        return cls(True, note)

    @classmethod
    def later(cls, note: str, retry_in: timedelta) -> "Step":
        return cls(False, note, retry_in)


def _prefix() -> str:
    return settings.MARKETPLACE["LABEL_PREFIX"]


def tenant_spec(reservation: Reservation, *, gpus: int) -> TenantSpec:
    tenant = reservation.tenant
    return TenantSpec(
        cluster=reservation.cluster.name, tenant=tenant.slug, group=tenant.group_name,
        namespace=namespace_for(tenant.slug), gpus=gpus, label_prefix=_prefix(),
        pod_security=settings.MARKETPLACE["POD_SECURITY_LEVEL"],
    )


def pool_spec(reservation: Reservation, nodes: list[str], *, gpus_per_node: int | None = None) -> PoolSpec:
    return PoolSpec(
        cluster=reservation.cluster.name, pool=reservation.pool_name, reservation_id=str(reservation.pk),
        tenant=reservation.tenant.slug, namespace=namespace_for(reservation.tenant.slug), nodes=tuple(sorted(nodes)),
        gpus_per_node=gpus_per_node or reservation.gpu_model.gpus_per_node, label_prefix=_prefix(),
    )


def _load(reservation_id) -> Reservation | None:
    return Reservation.objects.select_related("tenant", "cluster", "gpu_model").filter(pk=reservation_id).first()


TENANT_LEASE_WAIT = 10.0  # seconds to wait for another worker's call on the same tenant's objects


class TenantBusy(RetryLater):
    """Another worker holds the tenant's lease in this cluster: nothing is wrong with the cluster."""


def _ensure_tenant(driver: ClusterDriver, reservation: Reservation, *, exclude_self: bool = False) -> int:
    """The tenant's namespace and quota sized to everything it holds on this cluster now.

    Under the tenant's lease in this cluster, and the GPUs are counted after it is taken: a
    release that finds nothing left cannot delete a namespace a concurrent provision relies on
    (that provision moved its reservation to provisioning before taking the lease)."""
    token = uuid.uuid4().hex
    keys = {"tenant_id": reservation.tenant_id, "cluster_id": reservation.cluster_id}
    deadline = time.monotonic() + TENANT_LEASE_WAIT
    while not services.tenant_lease_acquire(**keys, token=token, now=timezone.now(),
                                            ttl=settings.MARKETPLACE["CLAIM_TIMEOUT"]):
        if time.monotonic() > deadline:
            raise TenantBusy(f"the objects of tenant {reservation.tenant.slug} are being changed by another worker")
        time.sleep(0.1)
    try:
        gpus = selectors.tenant_cluster_gpus(**keys, exclude_reservation_id=reservation.pk if exclude_self else None)
        driver.ensure_tenant(tenant_spec(reservation, gpus=gpus))
    finally:
        services.tenant_lease_release(**keys, token=token)
    return gpus


# --- Due events -------------------------------------------------------------------------------

def claim_due_events(*, now: datetime | None = None, worker: str = "", on_claimed=None) -> list[services.EventClaim]:
    return services.event_claim_due(now=now or timezone.now(), worker=worker, on_claimed=on_claimed)


def process_event(claim: services.EventClaim, *, drivers: Drivers = driver_for) -> str:
    """Run one claimed event and record how it went. Returns a short outcome for logs and metrics."""
    event = services.event_for_claim(claim=claim)
    if event is None:
        return "not_claimed"  # gone, done, or reclaimed by another worker: nothing for us to do
    token = uuid.uuid4().hex
    if not services.pool_lease_acquire(reservation_id=event.reservation_id, token=token, now=timezone.now()):
        # Another worker is working on this pool right now; look again shortly.
        services.event_record(claim=claim, now=timezone.now(), done=False, error="pool busy",
                              retry_in=settings.MARKETPLACE["EVENT_SWEEP_INTERVAL"])
        return "busy"
    try:
        handler = {Event.Kind.START: provision, Event.Kind.END_NOTICE: end_notice, Event.Kind.END: release}[event.kind]
        try:
            step = handler(event.reservation_id, drivers=drivers)
        except Exception as exc:  # noqa: BLE001 - a bug or a database hiccup must not lose the event
            log.exception("scheduler step %s of %s failed", event.kind, event.reservation_id)
            step = Step.later(f"{exc.__class__.__name__}: {exc}", services.retry_delay(event.attempts))
    finally:
        services.pool_lease_release(reservation_id=event.reservation_id, token=token)
    services.event_record(claim=claim, now=timezone.now(), done=step.done, error="" if step.done else step.note,
                          retry_in=step.retry_in)
    outcome = "done" if step.done else "retry"
    SCHEDULER_STEPS.labels(step=event.kind, outcome=outcome).inc()
    return outcome


def run_due_events(*, now: datetime | None = None, drivers: Drivers = driver_for) -> list[str]:
    """Claim every due event and process it inline (tests and a shell use this;
    the beat sweep enqueues each claim as its own task instead)."""
    return [process_event(claim, drivers=drivers) for claim in claim_due_events(now=now, worker="inline")]


# --- Provision --------------------------------------------------------------------------------

def provision(reservation_id, *, drivers: Drivers = driver_for) -> Step:
    """confirmed → provisioning → active: tenant objects, pool labels and taints, readiness check."""
    now = timezone.now()
    reservation = _load(reservation_id)
    if reservation is None:
        return Step.ok("gone")
    if reservation.status == S.PENDING:
        return Step.later("not confirmed yet", settings.MARKETPLACE["RETRY_BACKOFF"])
    if reservation.status == S.CONFIRMED and reservation.ends_at <= now:
        services.reservation_fail(reservation_id=reservation_id, now=now,
                                  reason="The window ended before the pool could be provisioned.")
        cleanup(reservation_id, drivers=drivers)
        return Step.ok("window over")
    if services.reservation_provision_begin(reservation_id=reservation_id, now=now) is None:
        return Step.ok(f"nothing to do: {reservation.status}")
    reservation = _load(reservation_id)
    # A node taken out of service (or marked unhealthy) since the booking, or with maintenance
    # planned (with force) inside its window, is replaced by a free one before the pool is built, as
    # heal does in a running pool; without a free node it stays.
    allocations = selectors.pool_allocations(reservation_id=reservation_id)
    unusable = _unusable_for(reservation, allocations, during=(reservation.starts_at, reservation.ends_at))
    for allocation in unusable:
        services.allocation_swap(reservation_id=reservation_id, allocation_id=allocation.pk, now=timezone.now())
    if unusable:
        # Left out are only the nodes that cannot serve from the start (heal's own test): one whose
        # maintenance comes later in the window serves until then, and heal swaps it out at that time.
        allocations = selectors.pool_allocations(reservation_id=reservation_id)
        unusable = _unusable_for(reservation, allocations, during=_instant(reservation))
        if len(unusable) == len(allocations):
            return _give_up(reservation_id, "None of the booked nodes can be used (out of service, unhealthy or in "
                                            "planned maintenance) and no free node could replace them.", drivers)
    # A node still unusable (no free node replaced it) is left out of the pool: the pool starts
    # degraded without it, and heal swaps a node in when one frees up.
    nodes = [allocation.node.name for allocation in allocations if allocation not in unusable]
    spec = pool_spec(reservation, nodes)
    try:
        driver = drivers(reservation.cluster)  # inside: an unreadable kubeconfig is a failed attempt like any
        _ensure_tenant(driver, reservation)
        driver.apply_pool(spec)
        result = driver.check_pool(spec)
    except GiveUp as exc:
        return _give_up(reservation_id, f"Provisioning gave up: {exc}", drivers)
    except TenantBusy as exc:
        # Waiting for another worker (or for a dead one's lease to run out) uses no attempt.
        return Step.later(str(exc), settings.MARKETPLACE["EVENT_SWEEP_INTERVAL"])
    except RetryLater as exc:
        return _provision_problem(reservation_id, f"Cluster busy or unreachable: {exc}", drivers)
    if result.passed:
        if services.reservation_provision_record_ready(
            reservation_id=reservation_id, readiness=result.as_json(), passed_at=result.checked_at, now=timezone.now()
        ):
            if unusable:
                heal(reservation_id, drivers=drivers)  # degraded at once, with a downtime for each missing node
            return Step.ok("active")
        current = _load(reservation_id)
        if current is not None and current.status == S.PROVISIONING:
            return _give_up(reservation_id, "The window ended before the pool passed its readiness check.", drivers)
        return Step.ok(f"no longer provisioning: {current.status if current else 'gone'}")
    return _provision_problem(reservation_id, "Readiness check failed: " + "; ".join(result.problems), drivers,
                              readiness=result.as_json())


def _instant(reservation: Reservation) -> tuple[datetime, datetime]:
    """When a pool's nodes must serve, as judged now: from now (or the start of a window that has not
    begun) until the next reconcile looks again. So a node whose maintenance begins before then is
    swapped out ahead of it, not up to a reconcile interval into it with the tenant's pods still on it."""
    at = max(timezone.now(), reservation.starts_at)
    # Never past the end: maintenance that begins when the booking is over takes nothing from it.
    return at, min(at + settings.MARKETPLACE["RECONCILE_INTERVAL"], reservation.ends_at)


def _unusable_for(reservation: Reservation, allocations: list, *, during: tuple[datetime, datetime]) -> list:
    """The allocations whose node cannot serve the booking ``during`` that period: taken out of
    service or marked unhealthy since the booking, or with maintenance planned (with force) in it."""
    in_maintenance = selectors.maintenance_spans(node_ids=[a.node_id for a in allocations],
                                                 starts_at=during[0], ends_at=during[1])
    return [a for a in allocations
            if a.node.status != Node.Status.AVAILABLE or a.node.health == Node.Health.UNHEALTHY
            or a.node_id in in_maintenance]


def _provision_problem(reservation_id, message: str, drivers: Drivers, readiness: dict | None = None) -> Step:
    attempts = services.reservation_provision_record_problem(
        reservation_id=reservation_id, message=message, readiness=readiness, now=timezone.now()
    )
    if attempts >= settings.MARKETPLACE["PROVISION_MAX_ATTEMPTS"]:
        return _give_up(reservation_id, f"{message} (gave up after {attempts} attempts)", drivers)
    return Step.later(message, services.retry_delay(attempts))


def _give_up(reservation_id, reason: str, drivers: Drivers) -> Step:
    services.reservation_fail(reservation_id=reservation_id, reason=reason, now=timezone.now())
    cleanup(reservation_id, drivers=drivers)
    return Step.ok(reason)


def cleanup(reservation_id, *, drivers: Drivers = driver_for) -> bool:
    """Remove what a reservation that is over (failed, or released) left on the cluster: its pool
    labels and taint, and its share of the tenant's quota. Leaves the pool marked on the cluster
    if the cluster cannot be reached, so the next reconcile tries again."""
    reservation = _load(reservation_id)
    if reservation is None or reservation.status in (S.PROVISIONING, S.ACTIVE, S.DEGRADED, S.RELEASING):
        return False
    if not services.pool_is_on_cluster(reservation_id=reservation_id):
        return False  # never reached the cluster, or already cleaned up
    try:
        driver = drivers(reservation.cluster)
        _unlabel_existing(driver, reservation, selectors.pool_node_names_ever(reservation_id=reservation_id))
        _ensure_tenant(driver, reservation, exclude_self=True)
    except (RetryLater, GiveUp) as exc:
        services.scheduler_attempt_record(reservation_id=reservation_id, action=Action.CLEANUP, outcome=Outcome.RETRY,
                                          message=f"Cleanup failed: {exc}", now=timezone.now())
        return False
    return services.pool_record_cleaned(reservation_id=reservation_id, now=timezone.now())


def _existing(driver: ClusterDriver, names: list[str]) -> dict[str, NodeState]:
    if not names:
        return {}
    return {name: state for name, state in driver.observe_nodes(list(names)).items() if state.exists}


def _unlabel_existing(driver: ClusterDriver, reservation: Reservation, names: list[str]) -> None:
    existing = _existing(driver, names)
    if existing:
        driver.unlabel_pool(pool_spec(reservation, list(existing)))


# --- Notice before the end --------------------------------------------------------------------

def end_notice(reservation_id, *, drivers: Drivers = driver_for) -> Step:
    now = timezone.now()
    notice = services.reservation_end_notice_record(reservation_id=reservation_id, now=now)
    if notice is None:
        reservation = _load(reservation_id)
        if reservation is not None and reservation.status == S.CONFIRMED and now < reservation.ends_at:
            # Its start has not run yet (another worker took the notice first, or the scheduler was
            # down past both): the tenant is still owed the notice once the pool runs.
            return Step.later("pool not started yet", settings.MARKETPLACE["EVENT_SWEEP_INTERVAL"])
        return Step.ok("pool not running: no notice")
    if notice.posted_to_cluster_at is not None:
        return Step.ok("already posted")
    reservation = _load(reservation_id)
    try:
        driver = drivers(reservation.cluster)
        # Named by the end it announces: a notice after an extension is a new Event, not "already exists".
        driver.post_event(namespace=namespace_for(reservation.tenant.slug),
                          name=f"{reservation.pool_name}.end-notice-{reservation.ends_at:%Y%m%d%H%M}",
                          reason="ReservationEndingSoon", message=notice.message)
    except RetryLater as exc:
        return Step.later(f"Could not post the notice event: {exc}", settings.MARKETPLACE["RETRY_BACKOFF"])
    except GiveUp as exc:
        services.scheduler_attempt_record(reservation_id=reservation_id, action=Action.NOTICE, outcome=Outcome.GAVE_UP,
                                          message=f"Notice recorded but not posted to the cluster: {exc}",
                                          now=timezone.now())
        return Step.ok("recorded, not posted")
    services.pool_notice_mark_posted(notice_id=notice.pk, now=timezone.now())
    return Step.ok("posted")


# --- Release ----------------------------------------------------------------------------------

def release(reservation_id, *, drivers: Drivers = driver_for) -> Step:
    """active/degraded → releasing → completed: drain (force after the grace period), unlabel,
    shrink the tenant's quota (0 deletes its namespace objects), allocations released."""
    now = timezone.now()
    reservation = _load(reservation_id)
    if reservation is None:
        return Step.ok("gone")
    if reservation.status in (S.CONFIRMED, S.PENDING):
        services.reservation_fail(reservation_id=reservation_id, now=now,
                                  reason="The window ended before the pool was provisioned.")
        cleanup(reservation_id, drivers=drivers)
        return Step.ok("never provisioned")
    if services.reservation_release_begin(reservation_id=reservation_id, now=now) is None:
        current = _load(reservation_id)
        if current is not None and current.status in (S.PROVISIONING, S.ACTIVE, S.DEGRADED) and current.ends_at > now:
            # Extended while this end event was being handled (the extension moves only events
            # nobody holds): this event runs again at the new end.
            return Step.later(f"extended: ends at {current.ends_at:%Y-%m-%d %H:%M} UTC", current.ends_at - now)
        if reservation.status in (S.FAILED, S.COMPLETED, S.CANCELLED):
            cleanup(reservation_id, drivers=drivers)  # no-op unless something was left on the cluster
        return Step.ok(f"nothing to do: {reservation.status}")
    reservation = _load(reservation_id)
    drain_started = services.pool_drain_started_at(reservation_id=reservation_id) or now
    grace = settings.MARKETPLACE["DRAIN_GRACE_PERIOD"]
    force = timezone.now() >= drain_started + grace
    try:
        driver = drivers(reservation.cluster)
        current = [allocation.node.name for allocation in selectors.pool_allocations(reservation_id=reservation_id)]
        to_drain = [name for name, state in _existing(driver, current).items()
                    if driver.kind == "plan" or _still_to_drain(reservation, state)]
        if driver.kind != "plan":
            # Nodes swapped out whose drain a reconcile had not finished still carry the pool's label.
            to_drain += [name for name in _left_still_marked(driver, reservation) if name not in current]
        if to_drain:
            remaining = driver.drain_pool(pool_spec(reservation, to_drain), force=force)
            if remaining:
                message = f"{remaining} tenant pods still running; " + (
                    "deleted with force, checking again" if force else f"forcing after {grace}"
                )
                services.scheduler_attempt_record(reservation_id=reservation_id, action=Action.RELEASE,
                                                  outcome=Outcome.RETRY, message=message, now=timezone.now())
                wait = max(min(drain_started + grace - timezone.now(), settings.MARKETPLACE["RETRY_BACKOFF"]),
                           timedelta(seconds=1))
                return Step.later(message, wait)
        _unlabel_existing(driver, reservation, selectors.pool_node_names_ever(reservation_id=reservation_id))
        _ensure_tenant(driver, reservation, exclude_self=True)
    except (RetryLater, GiveUp) as exc:
        # A release must finish: retry (with backoff) whatever the error; ops see it meanwhile.
        outcome = Outcome.RETRY if isinstance(exc, RetryLater) else Outcome.GAVE_UP
        services.scheduler_attempt_record(reservation_id=reservation_id, action=Action.RELEASE, outcome=outcome,
                                          message=f"Release step failed: {exc}", now=timezone.now())
        return Step.later(str(exc), settings.MARKETPLACE["RETRY_BACKOFF_MAX"] if isinstance(exc, GiveUp)
                          else settings.MARKETPLACE["RETRY_BACKOFF"])
    services.reservation_release_record_done(reservation_id=reservation_id, now=timezone.now())
    return Step.ok("completed")


# --- Level-based reconcile --------------------------------------------------------------------

def reconcile_reservation(reservation_id, *, drivers: Drivers = driver_for) -> str:
    """Bring one reservation's pool to its desired state. Safe to run any time, twice, or
    concurrently with the event steps (the pool lease lets one worker at a time call the cluster)."""
    now = timezone.now()
    reservation = _load(reservation_id)
    if reservation is None:
        return "gone"
    status = reservation.status
    # Transitional work is done by the due events; make sure each one exists and is live (a claim
    # whose worker died is put back to pending, so the next sweep finishes the job).
    if status in (S.CONFIRMED, S.PROVISIONING):
        services.reservation_events_ensure(reservation_id=reservation_id, kinds=[Event.Kind.START], now=now)
    elif status == S.RELEASING or (status in (S.ACTIVE, S.DEGRADED) and reservation.ends_at <= now):
        services.reservation_events_ensure(reservation_id=reservation_id, kinds=[Event.Kind.END], now=now)
    elif status in (S.ACTIVE, S.DEGRADED):
        # The notice and the end are still ahead: they exist (a notice sent stays sent).
        services.reservation_events_ensure(reservation_id=reservation_id, kinds=[Event.Kind.END_NOTICE, Event.Kind.END],
                                           now=now, requeue_finished=False)
    if status in (S.ACTIVE, S.DEGRADED) and reservation.ends_at > now:
        return _with_lease(reservation_id, lambda rid: heal(rid, drivers=drivers))
    if status in (S.FAILED, S.COMPLETED, S.CANCELLED):
        return _with_lease(reservation_id, lambda rid: "cleaned" if cleanup(rid, drivers=drivers) else "clean")
    return "events ensured"


def _with_lease(reservation_id, work) -> str:
    token = uuid.uuid4().hex
    if not services.pool_lease_acquire(reservation_id=reservation_id, token=token, now=timezone.now()):
        return "busy"
    try:
        return work(reservation_id)
    finally:
        services.pool_lease_release(reservation_id=reservation_id, token=token)


def _node_healthy(driver: ClusterDriver, node: Node, state: NodeState | None) -> tuple[bool, str]:
    if driver.kind == "plan":
        # No cluster to observe: the inventory's health (set by ops) is the truth.
        return node.health != Node.Health.UNHEALTHY, "marked unhealthy in the inventory"
    if state is None or not state.exists:
        return False, "node is gone from the cluster"
    if not state.ready:
        return False, "node is NotReady"
    if state.gpus < node.gpu_count:
        return False, f"node reports {state.gpus} of {node.gpu_count} GPUs"
    return True, ""


def _in_pool(reservation: Reservation, state: NodeState | None) -> bool:
    """The node carries the pool's labels and taint and is schedulable (no drift)."""
    if state is None or not state.exists:
        return False
    prefix = _prefix()
    tenant_key = manifests.tenant_label_key(prefix)
    return (
        state.labels.get(manifests.pool_label_key(prefix)) == reservation.pool_name
        and state.labels.get(tenant_key) == reservation.tenant.slug
        and any(t.get("key") == tenant_key and t.get("value") == reservation.tenant.slug
                and t.get("effect") == "NoSchedule" for t in state.taints)
        and not state.unschedulable
    )


def _still_to_drain(reservation: Reservation, state: NodeState) -> bool:
    """Whether release has yet to drain this node of the pool: it still has the pool's label, or,
    the label removed by hand, still the tenant's taint. Our own unlabel step removes both, after
    draining, so a node drained before is not cordoned again (nothing would uncordon it)."""
    pool = state.labels.get(manifests.pool_label_key(_prefix()))
    if pool is not None:
        return pool == reservation.pool_name
    tenant_key = manifests.tenant_label_key(_prefix())
    return any(taint.get("key") == tenant_key and taint.get("value") == reservation.tenant.slug
               for taint in state.taints)


def heal(reservation_id, *, drivers: Drivers = driver_for) -> str:
    """Active or degraded pool: observe its nodes; a sick node → degraded + downtime + swap; drift
    repaired by re-applying the desired state; all healthy and checked → active again."""
    reservation = _load(reservation_id)
    if reservation is None or reservation.status not in (S.ACTIVE, S.DEGRADED):
        return "not running"
    allocations = selectors.pool_allocations(reservation_id=reservation_id)
    try:
        driver = drivers(reservation.cluster)
        observed = driver.observe_nodes([a.node.name for a in allocations]) if allocations else {}
        at, after = _instant(reservation)
        in_maintenance = selectors.maintenance_spans(node_ids=[a.node_id for a in allocations], starts_at=at,
                                                     ends_at=after)
        sick, observed_sick = [], set()
        for allocation in allocations:
            node = allocation.node
            if node.status != Node.Status.AVAILABLE:
                # Taken out of service by ops with force (retired, offline, maintenance): swapped
                # out like a sick node; its health is not what changed, so it is left as it is.
                sick.append((allocation, f"node is {node.get_status_display().lower()} in the inventory"))
                continue
            if node.pk in in_maintenance:
                # Inside a maintenance window ops planned with force: the same.
                sick.append((allocation, f"node is in planned maintenance until "
                                         f"{in_maintenance[node.pk][1]:%Y-%m-%d %H:%M} UTC"))
                continue
            healthy, why = _node_healthy(driver, node, observed.get(node.name))
            if not healthy:
                sick.append((allocation, why))
                observed_sick.add(node.pk)
        if driver.kind != "plan":
            sick_ids = {a.node_id for a, _ in sick}
            services.node_health_record(node_ids=[a.node_id for a in allocations if a.node_id not in sick_ids],
                                        health=Node.Health.HEALTHY, now=timezone.now())
            services.node_health_record(node_ids=list(observed_sick), health=Node.Health.UNHEALTHY, now=timezone.now())
        swapped_out = []
        for allocation, why in sick:
            services.reservation_degrade(reservation_id=reservation_id, node_id=allocation.node_id,
                                         reason=f"{allocation.node.name}: {why}", now=timezone.now())
            new = services.allocation_swap(reservation_id=reservation_id, allocation_id=allocation.pk,
                                           now=timezone.now())
            POOL_NODE_SWAPS.labels(outcome="swapped" if new else "no_free_node").inc()
            if new is not None:
                swapped_out.append(allocation.node)
        # Desired state, re-applied where the cluster differs (drift, or a node just swapped in).
        _ensure_tenant(driver, reservation)
        current = selectors.pool_allocations(reservation_id=reservation_id)
        sick_names = {a.node.name for a, _ in sick}
        to_apply = [a.node.name for a in current
                    if a.node.name not in sick_names and not _in_pool(reservation, observed.get(a.node.name))]
        if to_apply:
            driver.apply_pool(pool_spec(reservation, to_apply))
            if driver.kind != "plan":  # a plan-only cluster has nothing to observe, so no drift to report
                services.scheduler_attempt_record(
                    reservation_id=reservation_id, action=Action.HEAL, outcome=Outcome.OK, now=timezone.now(),
                    message="pool re-applied (drift or new node): " + ", ".join(to_apply[:20]),
                )
        _drain_nodes_that_left(driver, reservation, just_swapped=[node.name for node in swapped_out])
        reservation = _load(reservation_id)
        if reservation.status == S.DEGRADED:
            still_sick = {a.node_id for a, _ in sick if a.node.name in {c.node.name for c in current}}
            healthy_now = [a.node_id for a in current if a.node_id not in still_sick]
            if not still_sick:
                result = driver.check_pool(pool_spec(reservation, [a.node.name for a in current]))
                if result.passed:
                    services.reservation_recover(
                        reservation_id=reservation_id, node_ids=None, now=timezone.now(),
                        resolution="All pool nodes healthy again" + (" (node replaced)" if swapped_out else ""),
                    )
                    return "recovered"
            # Nodes of the pool that are healthy again end their own downtime.
            services.reservation_recover(reservation_id=reservation_id, node_ids=healthy_now, now=timezone.now(),
                                         resolution="node healthy again")
            return "degraded"
    except (RetryLater, GiveUp) as exc:
        services.scheduler_attempt_record(reservation_id=reservation_id, action=Action.HEAL, outcome=Outcome.RETRY,
                                          message=f"Reconcile could not reach the cluster: {exc}", now=timezone.now())
        return "retry"
    return "repaired" if to_apply else "in sync"


def _drain_nodes_that_left(driver: ClusterDriver, reservation: Reservation, *, just_swapped: list[str]) -> None:
    """Drain the nodes swapped out of the pool, then take the pool's label and taint off them.

    Unlabelled with the tenant's pods still on it, a swapped-out node would run those pods
    untainted, on a node the next booking may get. A node keeps the pool's label until it is
    drained, so a later reconcile (or the release) finds it again: level-based. Pods are evicted
    first; they are deleted with force once the drain grace period since the swap has passed, or
    at once on a node that is not Ready (its kubelet cannot confirm an eviction). A plan-only
    cluster has nothing to observe: the nodes swapped out just now are recorded as drained.
    """
    if driver.kind == "plan":
        if just_swapped:
            driver.drain_pool(pool_spec(reservation, just_swapped), force=False)
            driver.unlabel_pool(pool_spec(reservation, just_swapped))
        return
    marked = _left_still_marked(driver, reservation)
    if not marked:
        return
    due = timezone.now() - settings.MARKETPLACE["DRAIN_GRACE_PERIOD"]
    forced = sorted(name for name, (state, left_at) in marked.items() if not state.ready or left_at <= due)
    gentle = sorted(set(marked) - set(forced))
    remaining = sum(driver.drain_pool(pool_spec(reservation, names), force=force)
                    for names, force in ((forced, True), (gentle, False)) if names)
    if remaining:
        services.scheduler_attempt_record(
            reservation_id=reservation.pk, action=Action.HEAL, outcome=Outcome.RETRY, now=timezone.now(),
            message=f"{remaining} tenant pods still on node(s) swapped out of the pool ({', '.join(sorted(marked))}); "
                    "they keep the pool's taint until drained",
        )
        return
    driver.unlabel_pool(pool_spec(reservation, sorted(marked)))


def _left_still_marked(driver: ClusterDriver, reservation: Reservation) -> dict[str, tuple[NodeState, datetime]]:
    """Nodes swapped out of the pool that still carry its label (not yet drained), with their
    observed state and when they left the pool."""
    left = selectors.pool_nodes_left(reservation_id=reservation.pk)
    label = manifests.pool_label_key(_prefix())
    return {name: (state, left[name]) for name, state in _existing(driver, list(left)).items()
            if state.labels.get(label) == reservation.pool_name}


def recheck_unhealthy_nodes(*, drivers: Drivers = driver_for) -> int:
    """Nodes marked unhealthy outside running pools are observed again, and marked healthy once
    Ready with all their GPUs.

    Heal observes only the nodes of running pools: without this, a node swapped out of a pool (or
    one that fell sick while idle) would stay unhealthy, never offered again, after a mere kubelet
    restart. Plan-only clusters have nothing to observe (their health is what ops set). Returns how
    many nodes are healthy again. Read, call the cluster, record: no transaction across the call.
    """
    recovered = 0
    for cluster, nodes in selectors.unhealthy_nodes_by_cluster():
        try:
            driver = drivers(cluster)
            if driver.kind == "plan":
                continue
            observed = driver.observe_nodes([node.name for node in nodes])
        except (RetryLater, GiveUp) as exc:
            log.warning("could not observe the unhealthy nodes of cluster %s: %s", cluster.name, exc)
            continue
        healthy = [node.pk for node in nodes if _node_healthy(driver, node, observed.get(node.name))[0]]
        recovered += services.node_health_record(node_ids=healthy, health=Node.Health.HEALTHY, now=timezone.now())
    return recovered


def reconcile_all() -> list:
    """Every reservation that needs looking at (the beat runs this every few minutes)."""
    return selectors.reservations_to_reconcile(now=timezone.now())
