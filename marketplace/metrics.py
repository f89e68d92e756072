"""Every Prometheus metric of the project is defined here. No tenant or reservation ids in labels."""

import os

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.core import GaugeMetricFamily

REGISTRY = CollectorRegistry(auto_describe=True)


class FleetCollector:
    """GPUs by model, region, cluster and state, read from the database at scrape time."""

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "marketplace_fleet_gpus",
            "GPUs in the fleet by model, region, cluster and state (allocated, idle, maintenance, offline).",
            labels=["gpu_model", "region", "cluster", "state"],
        )

    def describe(self):
        # Registering must not query the database (it happens at import time).
        yield self._family()

    def collect(self):
        from marketplace.inventory.selectors import fleet_gpu_counts

        gauge = self._family()
        for row in fleet_gpu_counts():
            gauge.add_metric([row.gpu_model, row.region, row.cluster, row.state], row.gpus)
        yield gauge



API_ERRORS = Counter(
    "marketplace_api_errors_total", "API responses with an error status, by code.", ["code"], registry=REGISTRY
)
BOOKINGS = Counter(
    "marketplace_bookings_total", "Booking attempts by outcome.", ["outcome"], registry=REGISTRY
)
SCHEDULER_TASKS = Counter(
    "marketplace_scheduler_tasks_total", "Scheduler task runs by task and outcome.", ["task", "outcome"],
    registry=REGISTRY,
)
KUBERNETES_REQUESTS = Counter(
    "marketplace_kubernetes_requests_total", "Kubernetes API requests by cluster, verb and outcome.",
    ["cluster", "verb", "outcome"], registry=REGISTRY,
)
SCHEDULER_TASK_SECONDS = Histogram(
    "marketplace_scheduler_task_seconds", "Duration of scheduler tasks.", ["task"], registry=REGISTRY
)
SCHEDULER_STEPS = Counter(
    "marketplace_scheduler_steps_total", "Scheduler event steps (start, end_notice, end) by outcome (done, retry).",
    ["step", "outcome"], registry=REGISTRY,
)
POOL_NODE_SWAPS = Counter(
    "marketplace_pool_node_swaps_total", "Unhealthy pool nodes, by outcome (swapped, no_free_node).", ["outcome"],
    registry=REGISTRY,
)


class SchedulerCollector:
    """Due events overdue, stale claims, and reservations by scheduler state, read at scrape time."""

    @staticmethod
    def _families():
        return (
            GaugeMetricFamily("marketplace_scheduler_events_overdue",
                              "Due events still pending more than a minute after they were due, by kind.",
                              labels=["kind"]),
            GaugeMetricFamily("marketplace_scheduler_reservations",
                              "Reservations in scheduler-relevant states (provisioning, active, degraded, "
                              "releasing, failed).", labels=["status"]),
            GaugeMetricFamily("marketplace_scheduler_open_downtimes", "Pool nodes currently down (not billed)."),
        )

    def describe(self):
        yield from self._families()

    def collect(self):
        from datetime import timedelta

        from django.db.models import Count
        from django.utils import timezone

        from marketplace.pools.models import Downtime
        from marketplace.reservations.models import Reservation, ReservationEvent

        overdue, by_status, downtimes = self._families()
        now = timezone.now()
        counts = dict(
            ReservationEvent.objects.filter(status=ReservationEvent.Status.PENDING, due_at__lt=now - timedelta(minutes=1))
            .values_list("kind").annotate(n=Count("pk")).values_list("kind", "n")
        )
        for kind in ReservationEvent.Kind.values:
            overdue.add_metric([kind], counts.get(kind, 0))
        statuses = ["provisioning", "active", "degraded", "releasing", "failed"]
        counts = dict(Reservation.objects.filter(status__in=statuses).values_list("status")
                      .annotate(n=Count("pk")).values_list("status", "n"))
        for status in statuses:
            by_status.add_metric([status], counts.get(status, 0))
        downtimes.add_metric([], Downtime.objects.filter(ended_at__isnull=True).count())
        yield overdue
        yield by_status
        yield downtimes


DATABASE_COLLECTORS = (FleetCollector(), SchedulerCollector())
for _collector in DATABASE_COLLECTORS:
    REGISTRY.register(_collector)


def _multiprocess() -> bool:
    # prometheus-client reads this variable itself, at import time, in every process: gunicorn
    # workers and prefork Celery children then write their counters to files in that folder.
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def web_registry() -> CollectorRegistry:
    """What the web's /metrics serves: the database-backed gauges plus the counters of every web
    process (all gunicorn workers in multiprocess mode, not just the one answering)."""
    if not _multiprocess():
        return REGISTRY
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    for collector in DATABASE_COLLECTORS:
        registry.register(collector)
    return registry


def worker_registry() -> CollectorRegistry:
    """What a Celery worker serves: the counters its task processes increment (Kubernetes requests,
    scheduler steps). The database-backed gauges are the web's, so they are not served twice."""
    registry = CollectorRegistry()
    if _multiprocess():
        MultiProcessCollector(registry)
        return registry
    for collector in (API_ERRORS, BOOKINGS, SCHEDULER_TASKS, KUBERNETES_REQUESTS, SCHEDULER_TASK_SECONDS,
                      SCHEDULER_STEPS, POOL_NODE_SWAPS):
        registry.register(collector)
    return registry


def multiprocess_dir_reset() -> None:
    """Empty the multiprocess folder at start-up, so counters of a previous run are not summed in."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not folder:
        return
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):
        if name.endswith(".db"):
            os.remove(os.path.join(folder, name))


def worker_metrics_serve(*, port: int, addr: str) -> None:
    """Serve the worker's metrics over HTTP from the worker's main process (before it forks)."""
    multiprocess_dir_reset()
    start_http_server(port, addr=addr, registry=worker_registry())
