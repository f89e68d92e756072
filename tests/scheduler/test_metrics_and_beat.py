"""Scheduler metrics at /metrics (no tenant or reservation ids in labels), the beat schedule, and
the thin tasks (which return quietly for rows that are gone)."""

import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from marketplace.celery import app
from marketplace.reservations.models import ReservationEvent
from scheduler import tasks
from tests.scheduler.helpers import book, plan_cluster  # noqa: F401 - fixtures


@pytest.mark.django_db
def test_metrics_show_overdue_events_and_scheduler_states(client, plan_cluster):
    # given a start event a quarter of an hour overdue
    reservation = book(cluster=plan_cluster, starts_at=timezone.now() + timedelta(minutes=5))
    ReservationEvent.objects.filter(reservation=reservation, kind="start").update(
        due_at=timezone.now() - timedelta(minutes=15))
    text = client.get("/metrics", REMOTE_ADDR="127.0.0.1").content.decode()
    assert 'marketplace_scheduler_events_overdue{kind="start"} 1.0' in text
    assert 'marketplace_scheduler_reservations{status="failed"} 0.0' in text
    assert "marketplace_scheduler_open_downtimes 0.0" in text
    assert str(reservation.pk) not in text and reservation.tenant.slug not in text


def test_beat_sweeps_every_few_seconds_and_reconciles_every_few_minutes(settings):
    schedule = app.conf.beat_schedule
    assert schedule["sweep-due-events"]["task"] == "scheduler.sweep_due_events"
    assert schedule["sweep-due-events"]["schedule"] <= 10
    assert schedule["reconcile-all"]["task"] == "scheduler.reconcile_all"
    assert 60 <= schedule["reconcile-all"]["schedule"] <= 600
    assert schedule["recheck-unhealthy-nodes"]["task"] == "scheduler.recheck_unhealthy_nodes"
    assert 60 <= schedule["recheck-unhealthy-nodes"]["schedule"] <= 600
    assert {"scheduler.sweep_due_events", "scheduler.process_event", "scheduler.reconcile_all",
            "scheduler.reconcile_reservation"} <= set(app.tasks)


@pytest.mark.django_db
def test_tasks_return_quietly_when_the_row_is_gone():
    assert tasks.process_event.run(123456, "nobody:token") == "not_claimed"
    assert tasks.reconcile_reservation.run(str(uuid.uuid4())) == "gone"
    assert tasks.sweep_due_events.run() == 0
    assert tasks.reconcile_all.run() == 0


@pytest.mark.django_db
def test_the_sweep_claims_and_enqueues_only_after_commit(plan_cluster, django_capture_on_commit_callbacks):
    # given a due start event
    reservation = book(cluster=plan_cluster, starts_at=timezone.now() + timedelta(minutes=1))
    # when the beat's sweep task runs
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        assert tasks.sweep_due_events.run() == 1
    # then the event is claimed, and one task is enqueued once the claim is committed
    event = ReservationEvent.objects.get(reservation=reservation, kind="start")
    assert event.status == "claimed" and event.attempts == 1
    assert len(callbacks) == 1
    # when the worker runs that task (here: in-process), the pool is provisioned
    assert tasks.process_event.run(event.pk, event.claimed_by) == "done"
    reservation.refresh_from_db()
    assert reservation.status == "active"
    # and a second delivery of the same message does nothing
    assert tasks.process_event.run(event.pk, event.claimed_by) == "not_claimed"
