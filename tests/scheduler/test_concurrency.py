"""Two beats, two workers: claims are exclusive and every step is idempotent, so running them at
the same time provisions each pool exactly once. Real threads, real PostgreSQL row locks."""

import threading
from collections import Counter
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from marketplace.core.models import AuditLog
from marketplace.pools.models import PlannedOperation
from marketplace.reservations.models import Reservation
from scheduler import reconcile
from tests.factories import ClusterFactory
from tests.scheduler.helpers import book

S = Reservation.Status


def run_concurrently(*functions):
    barrier = threading.Barrier(len(functions))
    results, errors = [None] * len(functions), []

    def runner(index, fn):
        try:
            barrier.wait()
            results[index] = fn()
        except Exception as exc:  # noqa: BLE001 - reported to the test below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=runner, args=(i, fn)) for i, fn in enumerate(functions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    return results


def audit_counts(action):
    return Counter(AuditLog.objects.filter(action=action).values_list("object_id", flat=True))


@pytest.mark.postgres_only
@pytest.mark.django_db(transaction=True)
def test_two_beats_sweeping_at_once_provision_each_pool_once():
    # given eight reservations whose start is due
    cluster = ClusterFactory(name="plan-concurrent")
    reservations = [book(cluster=cluster, node_count=1, starts_at=timezone.now() + timedelta(minutes=1))
                    for _ in range(8)]
    # when two sweeps claim and process at the same moment
    first, second = run_concurrently(reconcile.run_due_events, reconcile.run_due_events)
    # then every event was processed by exactly one of them
    assert len(first) + len(second) == 8
    assert all(outcome == "done" for outcome in first + second)
    # and every pool was provisioned once: one transition each, one node patch each
    ids = {str(r.pk) for r in reservations}
    assert audit_counts("reservation.provisioning") == Counter({rid: 1 for rid in ids})
    assert audit_counts("reservation.active") == Counter({rid: 1 for rid in ids})
    assert PlannedOperation.objects.filter(kind="Node", verb="patch").count() == 8
    assert set(Reservation.objects.values_list("status", flat=True)) == {S.ACTIVE}


@pytest.mark.postgres_only
@pytest.mark.django_db(transaction=True)
def test_two_workers_provisioning_one_pool_at_once_leave_one_pool():
    # given a reservation whose start is due, provisioned by two workers at the same time (a
    # redelivered message, or a reconcile racing the event) — bypassing every claim
    cluster = ClusterFactory(name="plan-race")
    reservation = book(cluster=cluster, node_count=2, starts_at=timezone.now() + timedelta(minutes=1))
    run_concurrently(lambda: reconcile.provision(reservation.pk), lambda: reconcile.provision(reservation.pk))
    # then the state is the same as after one run: active once, the same objects
    reservation.refresh_from_db()
    assert reservation.status == S.ACTIVE
    assert audit_counts("reservation.active") == Counter({str(reservation.pk): 1})
    assert PlannedOperation.objects.filter(kind="Node", verb="patch").count() == 2
    assert PlannedOperation.objects.filter(kind="ResourceQuota").count() == 1
    # and running everything again on both workers changes nothing
    before = (PlannedOperation.objects.count(), AuditLog.objects.count())
    run_concurrently(lambda: reconcile.reconcile_reservation(reservation.pk),
                     lambda: reconcile.reconcile_reservation(reservation.pk))
    assert (PlannedOperation.objects.count(), AuditLog.objects.count()) == before


@pytest.mark.postgres_only
@pytest.mark.django_db(transaction=True)
def test_two_workers_releasing_one_pool_at_once_complete_it_once():
    cluster = ClusterFactory(name="plan-release-race")
    reservation = book(cluster=cluster, node_count=2, starts_at=timezone.now() - timedelta(minutes=1))
    reconcile.run_due_events()
    import time_machine

    with time_machine.travel(reservation.ends_at + timedelta(seconds=1), tick=True):
        run_concurrently(lambda: reconcile.release(reservation.pk), lambda: reconcile.release(reservation.pk))
    reservation.refresh_from_db()
    assert reservation.status == S.COMPLETED
    assert audit_counts("reservation.completed") == Counter({str(reservation.pk): 1})
    assert PlannedOperation.objects.filter(kind="Namespace", verb="delete").count() == 1


@pytest.mark.postgres_only
@pytest.mark.django_db(transaction=True)
def test_two_pools_racing_for_the_last_spare_node_do_not_double_book_it():
    # given two active pools of one node each, both nodes failing, and one free spare
    from marketplace.inventory.models import Node
    from marketplace.reservations.models import Allocation
    from tests.factories import NodeFactory

    cluster = ClusterFactory(name="plan-spare-race")
    first_node, second_node, spare = (NodeFactory(cluster=cluster) for _ in range(3))
    first = book(nodes=[first_node], starts_at=timezone.now() - timedelta(minutes=1))
    second = book(nodes=[second_node], starts_at=timezone.now() - timedelta(minutes=1))
    reconcile.run_due_events()
    Node.objects.filter(pk__in=[first_node.pk, second_node.pk]).update(health=Node.Health.UNHEALTHY)
    # when both reconciles try to swap in the spare at the same moment
    outcomes = run_concurrently(lambda: reconcile.reconcile_reservation(first.pk),
                                lambda: reconcile.reconcile_reservation(second.pk))
    # then exactly one got it (the exclusion constraint refused the other), the other stays degraded
    assert sorted(outcomes) == ["degraded", "recovered"]
    assert Allocation.objects.filter(node=spare).exclude(state=Allocation.State.CANCELLED).count() == 1
    assert sorted(Reservation.objects.filter(pk__in=[first.pk, second.pk]).values_list("status", flat=True)) == [
        S.ACTIVE, S.DEGRADED]
