import os

from celery import Celery
from celery.signals import worker_init

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "marketplace.settings")

app = Celery("marketplace")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["scheduler"])


@app.on_after_configure.connect
def _beat_schedule(sender, **kwargs):
    from scheduler.beat import beat_schedule

    sender.conf.beat_schedule = beat_schedule()


@worker_init.connect
def _serve_worker_metrics(**kwargs):
    """Workers expose their own counters (Kubernetes requests, scheduler steps) on a port of their
    own: the web's /metrics cannot see counters that live in worker processes."""
    from django.conf import settings

    if settings.WORKER_METRICS_PORT:
        from marketplace.metrics import worker_metrics_serve

        worker_metrics_serve(port=settings.WORKER_METRICS_PORT, addr=settings.WORKER_METRICS_ADDR)
