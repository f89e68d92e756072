"""Provisioning that fails: retry later with backoff, give up → failed (nodes freed, nothing
billed, nothing left on the cluster), and the ops retry."""

from datetime import timedelta

import pytest
import time_machine
from django.utils import timezone

from marketplace.core.exceptions import Conflict
from marketplace.core.services import Actor
from marketplace.inventory.models import Cluster
from marketplace.pools import selectors, services
from marketplace.pools.models import Pool, SchedulerAttempt, TenantClusterLease
from marketplace.reservations.models import Allocation, Reservation, ReservationEvent
from scheduler import reconcile
from scheduler.driver import GiveUp, RetryLater
from tests.factories import ClusterFactory, NodeFactory
from tests.scheduler.helpers import book, kube_cluster, memory, pool_nodes  # noqa: F401 - fixtures

S = Reservation.Status
Kind = ReservationEvent.Kind


def start_event(reservation):
    return ReservationEvent.objects.get(reservation=reservation, kind=Kind.START)


@pytest.mark.django_db
def test_retry_later_then_success(memory, kube_cluster):
    # given a due reservation, and a cluster that answers 503 twice
    nodes, _ = pool_nodes(memory, kube_cluster)
    reservation = book(nodes=nodes, starts_at=timezone.now() + timedelta(minutes=1))
    memory.fail("apply_pool", RetryLater("503 Service Unavailable"), times=2)
    with time_machine.travel(timezone.now(), tick=True) as clock:
        # when the sweep runs
        assert reconcile.run_due_events(drivers=memory.drivers) == ["retry"]
        # then the event waits for its backoff (15 s) and the reservation stays provisioning
        event = start_event(reservation)
        assert event.status == "pending" and event.due_at > timezone.now() + timedelta(seconds=10)
        assert "503" in event.last_error
        assert reconcile.run_due_events(drivers=memory.drivers) == []
        clock.shift(timedelta(seconds=16))
        assert reconcile.run_due_events(drivers=memory.drivers) == ["retry"]
        # the second backoff doubles
        assert start_event(reservation).due_at > timezone.now() + timedelta(seconds=25)
        clock.shift(timedelta(seconds=31))
        assert reconcile.run_due_events(drivers=memory.drivers) == ["done"]
    reservation.refresh_from_db()
    # then it is active, with labels and taints on both nodes
    assert reservation.status == S.ACTIVE and reservation.ready_at is not None
    assert set(memory.pool_members().values()) == {reservation.pool_name}
    assert list(SchedulerAttempt.objects.filter(reservation=reservation).order_by("at", "id")
                .values_list("outcome", flat=True)) == ["retry", "retry", "ok"]
    assert start_event(reservation).attempts == 3


@pytest.mark.django_db
def test_give_up_fails_frees_nodes_bills_nothing_and_cleans_the_cluster(memory, kube_cluster):
    # given a due reservation whose quota apply worked but whose node patch is forbidden
    nodes, _ = pool_nodes(memory, kube_cluster)
    reservation = book(nodes=nodes, starts_at=timezone.now() + timedelta(minutes=1))
    memory.fail("check_pool", GiveUp("403 Forbidden: nodes is forbidden"))
    # when the sweep runs
    assert reconcile.run_due_events(drivers=memory.drivers) == ["done"]
    reservation.refresh_from_db()
    # then the reservation failed with the reason, nothing billed
    assert reservation.status == S.FAILED and "403 Forbidden" in reservation.status_reason
    assert reservation.ready_at is None
    # and its nodes are free again, its other events cancelled
    assert set(reservation.allocations.values_list("state", flat=True)) == {Allocation.State.CANCELLED}
    assert dict(reservation.events.values_list("kind", "status")) == {
        "start": "done", "end_notice": "cancelled", "end": "cancelled"}
    # and nothing is left on the cluster
    assert memory.orphans() == []
    assert not Pool.objects.get(pk=reservation.pk).on_cluster


@pytest.mark.django_db
def test_readiness_keeps_failing_until_the_attempts_run_out(memory, kube_cluster, settings):
    settings.MARKETPLACE = {**settings.MARKETPLACE, "PROVISION_MAX_ATTEMPTS": 3}
    # given a node that never becomes Ready
    nodes, _ = pool_nodes(memory, kube_cluster)
    memory.nodes[nodes[0].name].ready = False
    reservation = book(nodes=nodes, starts_at=timezone.now() + timedelta(minutes=1))
    with time_machine.travel(timezone.now(), tick=True) as clock:
        outcomes = []
        for _ in range(3):
            outcomes += reconcile.run_due_events(drivers=memory.drivers)
            reservation.refresh_from_db()
            if reservation.status == S.PROVISIONING:
                # the failed check is stored and shown meanwhile
                assert reservation.readiness["passed"] is False
                assert f"{nodes[0].name}: NotReady" in reservation.readiness["problems"]
            clock.shift(timedelta(minutes=10))
    # then after three failed checks it gave up
    assert outcomes == ["retry", "retry", "done"]
    assert reservation.status == S.FAILED and "gave up after 3 attempts" in reservation.status_reason
    assert memory.orphans() == []


@pytest.mark.django_db
def test_ops_retry_allocates_the_nodes_again_and_provisions(memory, kube_cluster, staff_user):
    # given a reservation that failed
    nodes, _ = pool_nodes(memory, kube_cluster)
    reservation = book(nodes=nodes, starts_at=timezone.now() + timedelta(minutes=1))
    memory.fail("apply_pool", GiveUp("422 Invalid"))
    reconcile.run_due_events(drivers=memory.drivers)
    # when ops retry it
    services.reservation_retry(reservation_id=reservation.pk, actor=Actor.for_user(staff_user), now=timezone.now())
    reservation.refresh_from_db()
    # then it is confirmed again with its nodes allocated, and the next sweep provisions it
    assert reservation.status == S.CONFIRMED
    assert reservation.allocations.filter(state=Allocation.State.ACTIVE).count() == 2
    assert reconcile.run_due_events(drivers=memory.drivers) == ["done"]
    reservation.refresh_from_db()
    assert reservation.status == S.ACTIVE
    assert reservation.events.get(kind=Kind.END).status == "pending"
    # and a second retry of a reservation that is not failed is refused
    with pytest.raises(Conflict):
        services.reservation_retry(reservation_id=reservation.pk, actor=Actor.for_user(staff_user),
                                   now=timezone.now())


@pytest.mark.django_db
def test_ops_retry_refuses_when_a_node_was_booked_meanwhile(memory, kube_cluster, staff_user):
    # given a failed reservation whose node someone else booked since
    nodes, _ = pool_nodes(memory, kube_cluster, count=1)
    reservation = book(nodes=nodes, starts_at=timezone.now() + timedelta(minutes=1))
    memory.fail("apply_pool", GiveUp("422 Invalid"))
    reconcile.run_due_events(drivers=memory.drivers)
    book(nodes=nodes, starts_at=reservation.starts_at)
    # when ops retry, then it is refused with a clear reason and nothing changed
    with pytest.raises(Conflict, match="booked by another reservation"):
        services.reservation_retry(reservation_id=reservation.pk, actor=Actor.for_user(staff_user),
                                   now=timezone.now())
    reservation.refresh_from_db()
    assert reservation.status == S.FAILED


@pytest.mark.django_db
def test_waiting_for_a_dead_workers_tenant_lease_uses_no_provisioning_attempt(memory, kube_cluster, monkeypatch):
    monkeypatch.setattr(reconcile, "TENANT_LEASE_WAIT", 0.05)
    nodes, _ = pool_nodes(memory, kube_cluster, count=2)
    reservation = book(nodes=nodes, starts_at=timezone.now() + timedelta(minutes=1))
    with time_machine.travel(timezone.now(), tick=False) as clock:
        # given a worker that died holding the tenant's lease on this cluster for the claim timeout
        TenantClusterLease.objects.create(tenant=reservation.tenant, cluster=kube_cluster,
                                          lease_token="dead-worker", lease_until=timezone.now() + timedelta(seconds=300))
        # when the start is swept every 5 s until the lease runs out
        for _ in range(62):
            reconcile.run_due_events(drivers=memory.drivers)
            clock.shift(timedelta(seconds=5))
    # then no attempt was spent on the wait, and the pool is provisioned once the lease is gone
    reservation.refresh_from_db()
    assert reservation.status == S.ACTIVE
    assert Pool.objects.get(pk=reservation.pk).provision_attempts == 0


@pytest.mark.django_db
def test_an_unreadable_kubeconfig_is_a_counted_attempt_ops_can_see(tmp_path):
    # given a cluster whose kubeconfig file is missing, and a reservation starting on it
    row = ClusterFactory(name="k-missing", connection=Cluster.Connection.KUBECONFIG,
                         kubeconfig_path=str(tmp_path / "missing.yaml"))
    reservation = book(nodes=[NodeFactory(cluster=row) for _ in range(2)],
                       starts_at=timezone.now() + timedelta(minutes=1), duration=timedelta(hours=1))
    # when the start is swept
    reconcile.run_due_events()
    # then it is recorded like any failure to reach the cluster: failed, nodes freed, on the ops page
    reservation.refresh_from_db()
    assert reservation.status == S.FAILED and "kubeconfig" in reservation.status_reason.lower()
    assert set(reservation.allocations.values_list("state", flat=True)) == {Allocation.State.CANCELLED}
    assert reservation in selectors.scheduler_health(now=timezone.now()).failed


@pytest.mark.django_db
def test_an_old_failure_no_longer_keeps_the_scheduler_from_being_ok(memory, kube_cluster):
    # given a reservation that failed and whose window is over
    nodes, _ = pool_nodes(memory, kube_cluster)
    reservation = book(nodes=nodes, starts_at=timezone.now() + timedelta(minutes=1), duration=timedelta(hours=1))
    memory.fail("apply_pool", GiveUp("403 Forbidden"))
    reconcile.run_due_events(drivers=memory.drivers)
    reservation.refresh_from_db()
    assert reservation.status == S.FAILED
    # then it counts against the verdict while it can be retried, and for a day after it failed
    assert not selectors.scheduler_health(now=timezone.now()).ok
    assert not selectors.scheduler_health(now=reservation.ends_at + timedelta(hours=12)).ok
    # but not a month later
    later = selectors.scheduler_health(now=timezone.now() + timedelta(days=30))
    assert later.ok and later.failed == []
