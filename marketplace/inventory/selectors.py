from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from django.db.models import Count, Exists, OuterRef, Q, Sum
from django.utils import timezone

from marketplace.inventory.models import Cluster, GpuModel, GpuPrice, Node, Region


@dataclass(frozen=True)
class FleetCount:
    gpu_model: str
    region: str
    cluster: str
    state: str
    gpus: int


def fleet_gpu_counts(*, at: datetime | None = None) -> list[FleetCount]:
    """GPUs by (model, region, cluster, state) at ``at``: allocated, idle, maintenance or offline.

    One grouped query; retired nodes are not part of the fleet.
    """
    from marketplace.reservations.models import Allocation

    at = at or timezone.now()
    allocated = Allocation.objects.filter(node=OuterRef("pk"), starts_at__lte=at, ends_at__gt=at).exclude(
        state=Allocation.State.CANCELLED
    )
    rows = (
        Node.objects.exclude(status=Node.Status.RETIRED)
        .annotate(is_allocated=Exists(allocated))
        .values("gpu_model__name", "cluster__region__code", "cluster__name", "status", "is_allocated")
        .annotate(gpus=Sum("gpu_count"))
    )
    totals: dict[tuple[str, str, str, str], int] = {}
    for row in rows:
        if row["status"] == Node.Status.AVAILABLE:
            state = "allocated" if row["is_allocated"] else "idle"
        else:
            state = row["status"]
        key = (row["gpu_model__name"], row["cluster__region__code"], row["cluster__name"], state)
        totals[key] = totals.get(key, 0) + (row["gpus"] or 0)
    return [FleetCount(*key, gpus) for key, gpus in sorted(totals.items())]


def gpu_model_catalogue() -> Iterable[GpuModel]:
    return GpuModel.objects.prefetch_related("prices__region").order_by("name")


def region_list() -> Iterable[Region]:
    return Region.objects.order_by("code")


def cluster_list() -> Iterable[Cluster]:
    return Cluster.objects.select_related("region").order_by("name")


def node_list(*, filters: dict | None = None) -> Iterable[Node]:
    return Node.objects.select_related("cluster__region", "gpu_model").filter(**(filters or {}))


def gpu_price_for(*, gpu_model: GpuModel, region: Region) -> GpuPrice | None:
    return GpuPrice.objects.filter(gpu_model=gpu_model, region=region).first()
