"""Celery tasks of the scheduler: thin, they take ids and call ``scheduler.reconcile``.

Every task is idempotent and safe to run twice or concurrently; a task whose row is gone returns
quietly. Work is enqueued after commit (``transaction.on_commit``), never from inside a transaction
that might roll back.
"""

import logging
import socket
import time

from celery import shared_task
from django.db import transaction

from marketplace.metrics import SCHEDULER_TASK_SECONDS, SCHEDULER_TASKS
from marketplace.pools.services import EventClaim
from scheduler import reconcile

log = logging.getLogger(__name__)
WORKER = socket.gethostname()


def _measure(name: str, fn, *args):
    started = time.monotonic()
    try:
        result = fn(*args)
    except Exception:
        SCHEDULER_TASKS.labels(task=name, outcome="error").inc()
        raise
    SCHEDULER_TASKS.labels(task=name, outcome="ok").inc()
    SCHEDULER_TASK_SECONDS.labels(task=name).observe(time.monotonic() - started)
    return result


@shared_task(name="scheduler.sweep_due_events", ignore_result=True)
def sweep_due_events() -> int:
    """Beat, every few seconds: claim the due events and enqueue one task per claim after commit."""

    def enqueue(claim: EventClaim) -> None:
        process_event.delay(claim.event_id, claim.token)

    claims = _measure("sweep_due_events", lambda: reconcile.claim_due_events(worker=WORKER, on_claimed=enqueue))
    return len(claims)


@shared_task(name="scheduler.process_event", ignore_result=True, acks_late=True)
def process_event(event_id: int, token: str) -> str:
    return _measure("process_event", reconcile.process_event, EventClaim(event_id, token))


@shared_task(name="scheduler.reconcile_all", ignore_result=True)
def reconcile_all() -> int:
    """Beat, every few minutes: one reconcile task per reservation that needs looking at."""
    ids = _measure("reconcile_all", reconcile.reconcile_all)
    for reservation_id in ids:
        transaction.on_commit(lambda rid=str(reservation_id): reconcile_reservation.delay(rid))
    return len(ids)


@shared_task(name="scheduler.recheck_unhealthy_nodes", ignore_result=True)
def recheck_unhealthy_nodes() -> int:
    """Beat, every few minutes: unhealthy nodes outside running pools are observed again."""
    return _measure("recheck_unhealthy_nodes", reconcile.recheck_unhealthy_nodes)


@shared_task(name="scheduler.reconcile_reservation", ignore_result=True, acks_late=True)
def reconcile_reservation(reservation_id: str) -> str:
    return _measure("reconcile_reservation", reconcile.reconcile_reservation, reservation_id)
