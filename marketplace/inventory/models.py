from django.conf import settings
from django.core.validators import MinValueValidator
from django.db import models
from django.db.models import F, Q


class Region(models.Model):
    code = models.SlugField(max_length=40, unique=True)
    name = models.CharField(max_length=200)

    class Meta:
        ordering = ["code"]

    def __str__(self) -> str:
        return self.code


class GpuModel(models.Model):
    """A GPU SKU, e.g. H100-SXM-80GB. Rented in whole nodes of ``gpus_per_node``."""

    name = models.CharField(max_length=60, unique=True)
    vendor = models.CharField(max_length=40, default="NVIDIA")
    memory_gb = models.PositiveIntegerField()
    gpus_per_node = models.PositiveSmallIntegerField(default=8, validators=[MinValueValidator(1)])

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(
                condition=Q(gpus_per_node__gte=1), name="gpumodel_gpus_per_node_positive",
                violation_error_message="A node holds at least one GPU.",
            ),
        ]

    def __str__(self) -> str:
        return self.name


class GpuPrice(models.Model):
    """List price per GPU-hour of a model in a region. Prices are locked on each reservation."""

    gpu_model = models.ForeignKey(GpuModel, on_delete=models.PROTECT, related_name="prices")
    region = models.ForeignKey(Region, on_delete=models.PROTECT, related_name="prices")
    currency = models.CharField(max_length=3, default="USD")
    price_per_gpu_hour = models.DecimalField(max_digits=12, decimal_places=4)

    class Meta:
        ordering = ["gpu_model", "region"]
        constraints = [
            models.UniqueConstraint(
                fields=["gpu_model", "region"], name="gpuprice_model_region_unique",
                violation_error_message="This GPU model already has a price in this region.",
            ),
            models.CheckConstraint(
                condition=Q(price_per_gpu_hour__gt=0), name="gpuprice_positive",
                violation_error_message="Price must be positive.",
            ),
            models.CheckConstraint(
                condition=Q(currency__regex=r"^[A-Z]{3}$"), name="gpuprice_currency_iso",
                violation_error_message="Currency is an ISO 4217 code such as USD.",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.gpu_model} in {self.region}: {self.price_per_gpu_hour} {self.currency}/GPU-h"


class Cluster(models.Model):
    class Connection(models.TextChoices):
        PLAN = "plan", "Plan only (no cluster: record what would be applied)"
        KUBECONFIG = "kubeconfig", "Kubeconfig file and context"
        IN_CLUSTER = "in_cluster", "In-cluster service account"

    class Status(models.TextChoices):
        ACTIVE = "active", "Active"
        DISABLED = "disabled", "Disabled"

    name = models.SlugField(max_length=60, unique=True)
    region = models.ForeignKey(Region, on_delete=models.PROTECT, related_name="clusters")
    connection = models.CharField(max_length=20, choices=Connection, default=Connection.PLAN)
    kubeconfig_path = models.CharField(max_length=500, blank=True, default="")
    kube_context = models.CharField(max_length=200, blank=True, default="")
    status = models.CharField(max_length=20, choices=Status, default=Status.ACTIVE)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(
                condition=~Q(connection="kubeconfig") | ~Q(kubeconfig_path=""),
                name="cluster_kubeconfig_needs_path",
                violation_error_message="A kubeconfig connection needs a kubeconfig path.",
            ),
        ]

    def __str__(self) -> str:
        return self.name


class Node(models.Model):
    class Status(models.TextChoices):
        AVAILABLE = "available", "Available"
        MAINTENANCE = "maintenance", "Maintenance"
        OFFLINE = "offline", "Offline"
        RETIRED = "retired", "Retired"

    class Health(models.TextChoices):
        HEALTHY = "healthy", "Healthy"
        UNHEALTHY = "unhealthy", "Unhealthy"
        UNKNOWN = "unknown", "Unknown"

    name = models.CharField(max_length=253, help_text="The Kubernetes node name.")
    cluster = models.ForeignKey(Cluster, on_delete=models.PROTECT, related_name="nodes")
    gpu_model = models.ForeignKey(GpuModel, on_delete=models.PROTECT, related_name="nodes")
    gpu_count = models.PositiveSmallIntegerField(default=8)
    cpu_cores = models.PositiveIntegerField(default=0)
    memory_gb = models.PositiveIntegerField(default=0)
    topology_domain = models.CharField(max_length=100, help_text="NVLink/InfiniBand island the node belongs to.")
    status = models.CharField(max_length=20, choices=Status, default=Status.AVAILABLE)
    # Observed by the scheduler (Ready condition, GPUs reported); status above is set by ops.
    health = models.CharField(max_length=20, choices=Health, default=Health.UNKNOWN)
    health_checked_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["cluster", "name"]
        constraints = [
            models.UniqueConstraint(
                fields=["cluster", "name"], name="node_cluster_name_unique",
                violation_error_message="A node with this name already exists in this cluster.",
            ),
            models.CheckConstraint(
                condition=Q(gpu_count__gte=1), name="node_gpu_count_positive",
                violation_error_message="A GPU node has at least one GPU.",
            ),
        ]
        indexes = [
            # id last: the booking engine walks a domain's nodes in id order (reservations.services).
            models.Index(fields=["gpu_model", "status", "cluster", "topology_domain", "id"], name="node_search_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.cluster}/{self.name}"


class MaintenanceWindow(models.Model):
    """A planned period when a node must not be rented. Cancelled, never deleted."""

    node = models.ForeignKey(Node, on_delete=models.PROTECT, related_name="maintenance_windows")
    starts_at = models.DateTimeField()
    ends_at = models.DateTimeField()
    reason = models.CharField(max_length=500, blank=True, default="")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    cancelled_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["starts_at"]
        constraints = [
            models.CheckConstraint(
                condition=Q(ends_at__gt=F("starts_at")), name="maintenance_window_ends_after_start",
                violation_error_message="A maintenance window must end after it starts.",
            ),
        ]
        indexes = [models.Index(fields=["node", "starts_at", "ends_at"], name="maintenance_node_period_idx")]

    def __str__(self) -> str:
        return f"{self.node} {self.starts_at:%Y-%m-%d %H:%M} – {self.ends_at:%Y-%m-%d %H:%M}"
