"""Every Prometheus metric of the project is defined here. No tenant or reservation ids in labels."""

from prometheus_client import CollectorRegistry, Counter, Histogram
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


REGISTRY.register(FleetCollector())

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


REGISTRY.register(SchedulerCollector())
