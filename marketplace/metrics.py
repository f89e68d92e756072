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
