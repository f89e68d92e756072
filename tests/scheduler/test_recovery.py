"""A worker that dies between claim and record: after the claim timeout the next reconcile (or
the sweep itself) finishes the job, with nothing orphaned on the cluster. A worker that comes
back late records nothing."""

from datetime import timedelta

import pytest
import time_machine
from django.utils import timezone

from marketplace.core.models import AuditLog
from marketplace.pools import services
from marketplace.reservations.models import Reservation, ReservationEvent
from scheduler import reconcile
from tests.scheduler.helpers import book, kube_cluster, memory, pool_nodes  # noqa: F401 - fixtures
from tests.scheduler.memory_cluster import Pod

S = Reservation.Status


@pytest.mark.django_db
def test_worker_killed_mid_provision(memory, kube_cluster):
    # given a due reservation whose worker claimed the start event, began, labelled one node, and died
    nodes, _ = pool_nodes(memory, kube_cluster)
    reservation = book(nodes=nodes, starts_at=timezone.now() + timedelta(minutes=1))
    with time_machine.travel(timezone.now(), tick=True) as clock:
        (claim,) = reconcile.claim_due_events(worker="doomed")
        services.reservation_provision_begin(reservation_id=reservation.pk, now=timezone.now())
        spec = reconcile.pool_spec(reservation, [nodes[0].name])
        memory.apply_pool(spec)  # ... and the worker is killed here: nothing recorded
        # when the sweep runs before the claim timeout, nothing happens
        assert reconcile.run_due_events(drivers=memory.drivers) == []
        # when the claim timeout has passed and the reconcile runs
        clock.shift(timedelta(minutes=6))
        reconcile.reconcile_reservation(reservation.pk, drivers=memory.drivers)
        assert reconcile.run_due_events(drivers=memory.drivers) == ["done"]
        # then the pool is complete and active
        reservation.refresh_from_db()
        assert reservation.status == S.ACTIVE
        assert memory.pool_members() == {node.name: reservation.pool_name for node in nodes}
        # and the dead worker, coming back, cannot record over it
        assert services.event_record(claim=claim, now=timezone.now(), done=False, error="late") is False
        assert reconcile.process_event(claim, drivers=memory.drivers) == "not_claimed"
    assert AuditLog.objects.filter(action="reservation.provisioning", object_id=str(reservation.pk)).count() == 1


@pytest.mark.django_db
def test_a_stale_claim_is_reclaimed_by_the_sweep_alone(memory, kube_cluster):
    # given a claimed start event whose worker died before doing anything
    nodes, _ = pool_nodes(memory, kube_cluster, count=1)
    reservation = book(nodes=nodes, starts_at=timezone.now() + timedelta(minutes=1))
    with time_machine.travel(timezone.now(), tick=True) as clock:
        reconcile.claim_due_events(worker="doomed")
        # when the claim timeout passes, then the next sweep takes it over and finishes it
        clock.shift(timedelta(minutes=6))
        assert reconcile.run_due_events(drivers=memory.drivers) == ["done"]
    reservation.refresh_from_db()
    assert reservation.status == S.ACTIVE
    assert AuditLog.objects.filter(action="reservation_event.reclaimed").count() == 1


@pytest.mark.django_db
def test_worker_killed_mid_release(memory, kube_cluster):
    # given an active pool with a tenant pod, at its end
    nodes, _ = pool_nodes(memory, kube_cluster)
    reservation = book(nodes=nodes, starts_at=timezone.now() - timedelta(minutes=1), duration=timedelta(hours=1))
    reconcile.run_due_events(drivers=memory.drivers)
    namespace = f"tenant-{reservation.tenant.slug}"
    memory.pods.append(Pod(namespace, "train-0", nodes[0].name))
    with time_machine.travel(reservation.ends_at + timedelta(seconds=1), tick=True) as clock:
        # and a worker that claimed the end event, drained, unlabelled one node, and died
        claims = reconcile.claim_due_events(worker="doomed")
        assert [ReservationEvent.objects.get(pk=c.event_id).kind for c in claims] == ["end_notice", "end"]
        services.reservation_release_begin(reservation_id=reservation.pk, now=timezone.now())
        memory.drain_pool(reconcile.pool_spec(reservation, [n.name for n in nodes]), force=False)
        memory.unlabel_pool(reconcile.pool_spec(reservation, [nodes[0].name]))
        # when the claim timeout passes, the reconcile runs, and the sweep after it
        clock.shift(timedelta(minutes=6))
        reconcile.reconcile_reservation(reservation.pk, drivers=memory.drivers)
        assert sorted(reconcile.run_due_events(drivers=memory.drivers)) == ["done", "done"]
    # then the release is complete and nothing of ours is left on the cluster
    reservation.refresh_from_db()
    assert reservation.status == S.COMPLETED
    assert memory.orphans() == [] and memory.pods == []


@pytest.mark.django_db
def test_release_waits_for_tenant_pods_then_forces_after_the_grace_period(memory, kube_cluster):
    # given an active pool whose tenant pod ignores eviction
    nodes, _ = pool_nodes(memory, kube_cluster, count=1)
    reservation = book(nodes=nodes, starts_at=timezone.now() - timedelta(minutes=1), duration=timedelta(hours=1))
    reconcile.run_due_events(drivers=memory.drivers)
    memory.pods.append(Pod(f"tenant-{reservation.tenant.slug}", "stubborn", nodes[0].name, stubborn=True))
    with time_machine.travel(reservation.ends_at + timedelta(seconds=1), tick=True) as clock:
        # when the end falls due, the pod is evicted but stays: the release waits
        outcomes = reconcile.run_due_events(drivers=memory.drivers)
        assert sorted(outcomes) == ["done", "retry"]
        reservation.refresh_from_db()
        assert reservation.status == S.RELEASING and len(memory.pods) == 1
        # when the grace period (5 minutes) has passed, the pod is deleted with force
        clock.shift(timedelta(minutes=5, seconds=1))
        assert reconcile.run_due_events(drivers=memory.drivers) == ["done"]
    reservation.refresh_from_db()
    assert reservation.status == S.COMPLETED and memory.pods == [] and memory.orphans() == []


@pytest.mark.django_db
def test_reconcile_cleans_up_what_a_failed_cleanup_left_behind(memory, kube_cluster):
    # given a provision that gave up while the cluster was also unreachable for the cleanup
    from scheduler.driver import GiveUp, RetryLater

    nodes, _ = pool_nodes(memory, kube_cluster)
    reservation = book(nodes=nodes, starts_at=timezone.now() + timedelta(minutes=1))
    memory.fail("check_pool", GiveUp("403"))
    memory.fail("observe_nodes", RetryLater("timeout"))
    reconcile.run_due_events(drivers=memory.drivers)
    reservation.refresh_from_db()
    assert reservation.status == S.FAILED and memory.orphans() != []
    # when the reconcile runs, then the leftovers are removed
    assert reservation.pk in reconcile.reconcile_all()
    assert reconcile.reconcile_reservation(reservation.pk, drivers=memory.drivers) == "cleaned"
    assert memory.orphans() == []
    assert reservation.pk not in reconcile.reconcile_all()


@pytest.mark.django_db
def test_the_reconcile_creates_a_missing_start_event(memory, kube_cluster):
    # given a confirmed reservation due now whose events were never written
    nodes, _ = pool_nodes(memory, kube_cluster, count=1)
    reservation = book(nodes=nodes, starts_at=timezone.now() + timedelta(minutes=1), events=False)
    # when the reconcile and then the sweep run
    assert reservation.pk in reconcile.reconcile_all()
    reconcile.reconcile_reservation(reservation.pk, drivers=memory.drivers)
    assert reconcile.run_due_events(drivers=memory.drivers) == ["done"]
    reservation.refresh_from_db()
    assert reservation.status == S.ACTIVE


@pytest.mark.django_db
def test_the_reconcile_creates_missing_notice_and_end_events_of_a_running_pool(memory, kube_cluster):
    # given an active pool whose notice and end events were never written
    nodes, _ = pool_nodes(memory, kube_cluster, count=1)
    reservation = book(nodes=nodes, starts_at=timezone.now() + timedelta(minutes=1), events=False,
                       duration=timedelta(hours=2))
    reconcile.reconcile_reservation(reservation.pk, drivers=memory.drivers)
    reconcile.run_due_events(drivers=memory.drivers)
    # when the reconcile runs
    reconcile.reconcile_reservation(reservation.pk, drivers=memory.drivers)
    # then both exist, due when they should be, and a second reconcile changes nothing
    events = dict(ReservationEvent.objects.filter(reservation=reservation).values_list("kind", "due_at"))
    assert events["end"] == reservation.ends_at
    assert events["end_notice"] == reservation.ends_at - timedelta(minutes=30)
    audit = AuditLog.objects.count()
    reconcile.reconcile_reservation(reservation.pk, drivers=memory.drivers)
    assert AuditLog.objects.count() == audit
    # and the notice, once sent, is not sent again by later reconciles
    with time_machine.travel(reservation.ends_at - timedelta(minutes=20), tick=True):
        assert reconcile.run_due_events(drivers=memory.drivers) == ["done"]
        reconcile.reconcile_reservation(reservation.pk, drivers=memory.drivers)
        assert reconcile.run_due_events(drivers=memory.drivers) == []
    assert memory.calls["post_event"] == 1


@pytest.mark.django_db
def test_reconciling_a_future_reservation_does_not_provision_it_early(memory, kube_cluster):
    # given a confirmed reservation starting tomorrow, its start event created by the reconcile
    nodes, _ = pool_nodes(memory, kube_cluster, count=1)
    reservation = book(nodes=nodes, starts_at=timezone.now() + timedelta(days=1), events=False)
    reconcile.reconcile_reservation(reservation.pk, drivers=memory.drivers)
    # then nothing is due yet
    assert reconcile.run_due_events(drivers=memory.drivers) == []
    reservation.refresh_from_db()
    assert reservation.status == S.CONFIRMED and memory.calls["apply_pool"] == 0
