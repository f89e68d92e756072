"""The whole lifecycle on the plan-only driver: confirmed → provisioning → active → releasing →
completed, driven by the due events exactly as the beat sweep drives them."""

from datetime import timedelta

import pytest
import time_machine
from django.utils import timezone

from marketplace.core.models import AuditLog
from marketplace.core.services import Actor
from marketplace.pools import services as services_pools
from marketplace.pools.models import PlannedOperation, Pool, PoolNotice
from marketplace.reservations import services
from marketplace.reservations.models import Allocation, Reservation, ReservationEvent
from scheduler import manifests, reconcile
from tests.scheduler.helpers import book, plan_cluster  # noqa: F401 - fixtures

S = Reservation.Status


def _statuses(reservation):
    return list(
        AuditLog.objects.filter(object_id=str(reservation.pk), action__startswith="reservation.")
        .order_by("at", "id").values_list("action", flat=True)
    )


@pytest.mark.django_db
def test_a_confirmed_reservation_is_provisioned_noticed_and_released(plan_cluster):
    # given a confirmed reservation of two nodes starting in 30 minutes
    reservation = book(cluster=plan_cluster, starts_at=timezone.now() + timedelta(minutes=30))
    with time_machine.travel(timezone.now(), tick=True) as clock:
        # when the sweep runs before the lead time: nothing is due
        assert reconcile.run_due_events() == []
        # when the start event falls due (10 minutes of lead time)
        clock.move_to(reservation.starts_at - timedelta(minutes=1))
        assert reconcile.run_due_events() == ["done"]
        reservation.refresh_from_db()
        # then the pool is active, the check (plan only) stored, billing starts at the window start
        assert reservation.status == S.ACTIVE
        assert reservation.readiness["passed"] is True and reservation.readiness["plan_only"] is True
        assert reservation.ready_at == reservation.starts_at
        patches = PlannedOperation.objects.filter(reservation=reservation, verb="patch", kind="Node")
        assert patches.count() == 2
        label = "gpu.marketplace.io/pool"
        assert all(op.body["metadata"]["labels"][label] == reservation.pool_name for op in patches)
        assert {op.kind for op in PlannedOperation.objects.filter(namespace=f"tenant-{reservation.tenant.slug}")} >= {
            "ResourceQuota", "LimitRange", "NetworkPolicy", "RoleBinding"}
        quota = PlannedOperation.objects.get(kind="ResourceQuota", verb="apply")
        assert quota.body["spec"]["hard"]["requests.nvidia.com/gpu"] == "16"

        # when the notice falls due
        clock.move_to(reservation.ends_at - timedelta(minutes=29))
        assert reconcile.run_due_events() == ["done"]
        reservation.refresh_from_db()
        notice = PoolNotice.objects.get(reservation=reservation)
        # then it is recorded and posted as an Event in the tenant's namespace
        assert reservation.end_notice_at is not None and notice.posted_to_cluster_at is not None
        assert PlannedOperation.objects.filter(kind="Event", namespace=f"tenant-{reservation.tenant.slug}").count() == 1

        # when the end falls due
        clock.move_to(reservation.ends_at + timedelta(seconds=1))
        assert reconcile.run_due_events() == ["done"]
    reservation.refresh_from_db()
    # then the pool is drained, unlabelled, the namespace objects deleted, the nodes released
    assert reservation.status == S.COMPLETED and reservation.released_at is not None
    assert set(reservation.allocations.values_list("state", flat=True)) == {Allocation.State.RELEASED}
    assert PlannedOperation.objects.filter(reservation=reservation, verb="evict").count() == 2
    releases = [op for op in PlannedOperation.objects.filter(reservation=reservation, kind="Node", verb="patch")
                if op.body.get("metadata", {}).get("labels", {}).get("gpu.marketplace.io/pool", "x") is None]
    assert len(releases) == 2
    assert PlannedOperation.objects.filter(verb="delete", kind="Namespace").count() == 1
    assert not Pool.objects.get(pk=reservation.pk).on_cluster
    assert set(ReservationEvent.objects.filter(reservation=reservation).values_list("status", flat=True)) == {"done"}
    # and every state change went through the transition table into the audit log
    assert _statuses(reservation) == [
        "reservation.provisioning", "reservation.ready", "reservation.active", "reservation.end_notice",
        "reservation.releasing", "reservation.released", "reservation.completed",
    ]


@pytest.mark.django_db
def test_every_step_twice_leaves_the_same_state_and_objects(plan_cluster):
    # given a reservation whose start is due
    reservation = book(cluster=plan_cluster, starts_at=timezone.now() + timedelta(minutes=1))
    reconcile.run_due_events()
    snapshot = (PlannedOperation.objects.count(), AuditLog.objects.count())
    # when every step and the reconcile run again
    reconcile.provision(reservation.pk)
    reconcile.reconcile_reservation(reservation.pk)
    reconcile.reconcile_reservation(reservation.pk)
    reconcile.provision(reservation.pk)
    # then nothing changed: no new objects, no new audited changes
    reservation.refresh_from_db()
    assert reservation.status == S.ACTIVE
    assert (PlannedOperation.objects.count(), AuditLog.objects.count()) == snapshot
    # and releasing twice completes once
    with time_machine.travel(reservation.ends_at + timedelta(seconds=1)):
        assert reconcile.release(reservation.pk).note == "completed"
        operations = PlannedOperation.objects.count()
        assert reconcile.release(reservation.pk).note == "nothing to do: completed"
        reconcile.reconcile_reservation(reservation.pk)
    assert PlannedOperation.objects.count() == operations
    assert AuditLog.objects.filter(object_id=str(reservation.pk), action="reservation.completed").count() == 1


@pytest.mark.django_db
def test_quota_is_the_sum_of_the_tenants_pools_on_the_cluster(plan_cluster, tenant):
    # given two reservations of one tenant on one cluster, the first active
    first = book(tenant=tenant, cluster=plan_cluster, node_count=1, starts_at=timezone.now() + timedelta(minutes=1))
    reconcile.run_due_events()
    second = book(tenant=tenant, cluster=plan_cluster, node_count=2, starts_at=timezone.now() + timedelta(minutes=2))
    # when the second is provisioned
    reconcile.run_due_events()
    # then the quota covers both (8 + 16 GPUs)
    quotas = PlannedOperation.objects.filter(kind="ResourceQuota", verb="apply").order_by("id")
    assert [q.body["spec"]["hard"]["requests.nvidia.com/gpu"] for q in quotas] == ["8", "24"]
    # when the first ends, the quota shrinks to the second's 16 GPUs and the namespace stays
    with time_machine.travel(first.ends_at + timedelta(seconds=1)):
        reconcile.release(first.pk)
    assert quotas.last().body["spec"]["hard"]["requests.nvidia.com/gpu"] == "16"
    assert not PlannedOperation.objects.filter(verb="delete", kind="Namespace").exists()
    second.refresh_from_db()
    assert second.status == S.ACTIVE


@pytest.mark.django_db
def test_a_notice_that_comes_before_the_start_waits_for_the_pool(plan_cluster):
    # given a confirmed reservation whose start has not run, with its notice already due (the
    # scheduler was down past both, and a second worker took the notice first)
    reservation = book(cluster=plan_cluster, starts_at=timezone.now() + timedelta(minutes=30))
    with time_machine.travel(reservation.ends_at - timedelta(minutes=29), tick=False):
        # when the notice is handled first
        step = reconcile.end_notice(reservation.pk)
        # then it waits for the pool instead of being dropped
        assert not step.done and step.retry_in == timedelta(seconds=5)
        assert not PoolNotice.objects.filter(reservation=reservation).exists()
        # and once the start has run, the notice is posted
        reconcile.provision(reservation.pk)
        assert reconcile.end_notice(reservation.pk).done
    notice = PoolNotice.objects.get(reservation=reservation)
    assert notice.posted_to_cluster_at is not None


@pytest.mark.django_db
def test_a_notice_for_a_pool_that_will_never_run_is_done_without_one(plan_cluster):
    # given a reservation that was cancelled, and one whose window passed without a start
    cancelled = book(cluster=plan_cluster, starts_at=timezone.now() + timedelta(minutes=30), status=S.CANCELLED)
    never_started = book(cluster=plan_cluster, starts_at=timezone.now() + timedelta(hours=3))
    with time_machine.travel(never_started.ends_at + timedelta(minutes=1), tick=False):
        # when their notices are handled, then both are done, with no notice
        assert reconcile.end_notice(cancelled.pk).done
        assert reconcile.end_notice(never_started.pk).done
    assert not PoolNotice.objects.exists()



def _extend(reservation, hours: float) -> None:
    services.reservation_extend(actor=Actor.task("test"), reservation=reservation,
                                end=reservation.ends_at + timedelta(hours=hours), enforce_policies=False)
    reservation.refresh_from_db()


@pytest.mark.django_db
def test_an_extension_after_the_notice_gets_a_notice_of_the_new_end(plan_cluster):
    # given an active pool whose end notice has been posted
    reservation = book(cluster=plan_cluster, starts_at=timezone.now() + timedelta(minutes=1))
    reconcile.run_due_events()
    old_end = reservation.ends_at
    with time_machine.travel(old_end - timedelta(minutes=29), tick=False) as clock:
        assert reconcile.run_due_events() == ["done"]
        assert f"{old_end:%H:%M} UTC" in PoolNotice.objects.get().message
        # when the tenant extends by two hours
        _extend(reservation, 2)
        # then the notice is due again before the new end, not now
        notice_event = reservation.events.get(kind=ReservationEvent.Kind.END_NOTICE)
        assert (notice_event.status, notice_event.due_at) == ("pending", reservation.ends_at - timedelta(minutes=30))
        assert reconcile.run_due_events() == []
        # and when it falls due, the notice states the new end and is posted again, as a new Event
        clock.move_to(reservation.ends_at - timedelta(minutes=29))
        assert reconcile.run_due_events() == ["done"]
    notice = PoolNotice.objects.get()
    assert f"{reservation.ends_at:%H:%M} UTC" in notice.message and notice.posted_to_cluster_at is not None
    first, second = PlannedOperation.objects.filter(kind="Event").order_by("id")
    assert f"{old_end:%H:%M} UTC" in first.body["message"] and second.body["message"] == notice.message
    assert first.name != second.name
    assert AuditLog.objects.filter(object_id=str(reservation.pk), action="reservation.end_notice").count() == 2
    # and the end itself is at the new end
    assert reservation.events.get(kind=ReservationEvent.Kind.END).due_at == reservation.ends_at


@pytest.mark.django_db
def test_an_extension_while_the_end_is_being_handled_ends_at_the_new_end(plan_cluster):
    # given an active pool whose end event a worker has just claimed at the old end
    reservation = book(cluster=plan_cluster, starts_at=timezone.now() + timedelta(minutes=1))
    reconcile.run_due_events()
    old_end = reservation.ends_at
    with time_machine.travel(old_end + timedelta(seconds=1), tick=False) as clock:
        reservation.events.filter(kind=ReservationEvent.Kind.END_NOTICE).update(status="done")
        [claim] = reconcile.claim_due_events(worker="w1")
        # when an extension that checked the window a moment before the end commits before that
        # worker gets to the event (it moves only the events nobody holds)
        clock.move_to(old_end - timedelta(seconds=1))
        _extend(reservation, 1)
        assert reservation.events.get(kind=ReservationEvent.Kind.END).status == "claimed"
        clock.move_to(old_end + timedelta(seconds=2))
        # then the worker does not drain the pool: the end event is due again at the new end
        assert reconcile.process_event(claim) == "retry"
        reservation.refresh_from_db()
        assert reservation.status == S.ACTIVE
        end_event = reservation.events.get(kind=ReservationEvent.Kind.END)
        assert (end_event.status, end_event.due_at) == ("pending", reservation.ends_at)
        # and the pool is released at the new end
        clock.move_to(reservation.ends_at + timedelta(seconds=1))
        assert "done" in reconcile.run_due_events()
    reservation.refresh_from_db()
    assert reservation.status == S.COMPLETED


@pytest.mark.django_db
def test_a_pool_ready_only_after_its_window_ended_fails_and_is_not_billed(plan_cluster):
    # given a pool whose provisioning began before its window ended
    reservation = book(cluster=plan_cluster, starts_at=timezone.now() + timedelta(minutes=1))
    services_pools.reservation_provision_begin(reservation_id=reservation.pk, now=timezone.now())
    # when its check passes only after the end (retries ran past it)
    with time_machine.travel(reservation.ends_at + timedelta(minutes=12), tick=False):
        step = reconcile.provision(reservation.pk)
    # then it is failed, never active, with nothing to bill, and cleaned off the cluster
    reservation.refresh_from_db()
    assert step.done and "window ended" in step.note
    assert reservation.status == S.FAILED and reservation.ready_at is None
    assert "reservation.active" not in _statuses(reservation)
    assert not Pool.objects.get(pk=reservation.pk).on_cluster


@pytest.mark.django_db
def test_the_pod_security_level_of_tenant_namespaces_is_a_setting(settings):
    # given a fleet whose tenants are trusted with privileged pods
    settings.MARKETPLACE = {**settings.MARKETPLACE, "POD_SECURITY_LEVEL": "privileged"}
    reservation = book()
    # then the namespace the scheduler applies enforces that level
    namespace = manifests.tenant_namespace(reconcile.tenant_spec(reservation, gpus=8))
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
