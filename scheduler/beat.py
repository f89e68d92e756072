"""The beat schedule: exactly one beat process runs it (two would still not double-provision:
claims are conditional and every step is idempotent)."""

from django.conf import settings


def beat_schedule() -> dict:
    marketplace = settings.MARKETPLACE
    return {
        "sweep-due-events": {
            "task": "scheduler.sweep_due_events",
            "schedule": marketplace["EVENT_SWEEP_INTERVAL"].total_seconds(),
            # A sweep that could not run in time is superseded by the next one.
            "options": {"expires": marketplace["EVENT_SWEEP_INTERVAL"].total_seconds() * 2},
        },
        "reconcile-all": {
            "task": "scheduler.reconcile_all",
            "schedule": marketplace["RECONCILE_INTERVAL"].total_seconds(),
            "options": {"expires": marketplace["RECONCILE_INTERVAL"].total_seconds()},
        },
        "recheck-unhealthy-nodes": {
            "task": "scheduler.recheck_unhealthy_nodes",
            "schedule": marketplace["RECONCILE_INTERVAL"].total_seconds(),
            "options": {"expires": marketplace["RECONCILE_INTERVAL"].total_seconds()},
        },
    }
