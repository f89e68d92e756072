import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "marketplace.settings")

app = Celery("marketplace")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["scheduler"])


@app.on_after_configure.connect
def _beat_schedule(sender, **kwargs):
    from scheduler.beat import beat_schedule

    sender.conf.beat_schedule = beat_schedule()
