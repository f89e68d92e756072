from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from django.db.models import Exists, OuterRef, Sum
from django.utils import timezone

from marketplace.inventory.models import Cluster, GpuModel, GpuPrice, MaintenanceWindow, Node, Region


@dataclass(frozen=True)
class FleetCount:
    gpu_model: str
    region: str
    cluster: str
    state: str
    gpus: int


def fleet_gpu_counts(*, at: datetime | None = None) -> list[FleetCount]:
    """GPUs by (model, region, cluster, state) at ``at``: allocated, idle, maintenance (in status, or inside
    a planned maintenance window) or offline.

    One grouped query; retired nodes are not part of the fleet.
    """
    from marketplace.reservations.models import Allocation

    at = at or timezone.now()
    allocated = Allocation.objects.filter(node=OuterRef("pk"), starts_at__lte=at, ends_at__gt=at).exclude(
        state=Allocation.State.CANCELLED
    )
    # A node inside a planned maintenance window is not idle: nobody can book it then.
    in_window = MaintenanceWindow.objects.filter(node=OuterRef("pk"), cancelled_at__isnull=True, starts_at__lte=at,
                                                 ends_at__gt=at)
    rows = (
        Node.objects.exclude(status=Node.Status.RETIRED)
        .annotate(is_allocated=Exists(allocated), in_maintenance_window=Exists(in_window))
        .values("gpu_model__name", "cluster__region__code", "cluster__name", "status", "is_allocated",
                "in_maintenance_window")
        .annotate(gpus=Sum("gpu_count"))
    )
    totals: dict[tuple[str, str, str, str], int] = {}
    for row in rows:
        if row["status"] == Node.Status.AVAILABLE:
            state = ("allocated" if row["is_allocated"] else
                     Node.Status.MAINTENANCE.value if row["in_maintenance_window"] else "idle")
        else:
            state = row["status"]
        key = (row["gpu_model__name"], row["cluster__region__code"], row["cluster__name"], state)
        totals[key] = totals.get(key, 0) + (row["gpus"] or 0)
    return [FleetCount(*key, gpus) for key, gpus in sorted(totals.items())]


@dataclass(frozen=True)
class AllocationHold:
    """A booking that holds a node in some period: what ops must know before taking the node away."""

    node_id: int
    node_name: str
    reservation_id: str
    tenant: str
    starts_at: datetime
    ends_at: datetime

    def describe(self) -> str:
        return (f"node {self.node_name} is booked by {self.tenant} (reservation {self.reservation_id}) "
                f"{self.starts_at:%Y-%m-%d %H:%M} – {self.ends_at:%Y-%m-%d %H:%M} UTC")

    def as_dict(self) -> dict:
        return {"node_id": self.node_id, "node": self.node_name, "reservation_id": self.reservation_id,
                "tenant": self.tenant, "starts_at": self.starts_at, "ends_at": self.ends_at}


def allocations_holding(*, node_ids: list[int], after: datetime, before: datetime | None = None) -> list[AllocationHold]:
    """Live allocations on these nodes that end after ``after`` (and start before ``before``)."""
    from marketplace.reservations.models import Allocation

    rows = Allocation.objects.filter(node_id__in=node_ids, state=Allocation.State.ACTIVE, ends_at__gt=after)
    if before is not None:
        rows = rows.filter(starts_at__lt=before)
    rows = rows.select_related("node", "reservation__tenant").order_by("node__name", "starts_at")
    return [
        AllocationHold(node_id=row.node_id, node_name=row.node.name, reservation_id=str(row.reservation_id),
                       tenant=row.reservation.tenant.slug, starts_at=row.starts_at, ends_at=row.ends_at)
        for row in rows
    ]


def maintenance_window_list(*, filters: dict | None = None) -> Iterable[MaintenanceWindow]:
    return MaintenanceWindow.objects.select_related("node__cluster").filter(**(filters or {})).order_by("starts_at", "id")


def gpu_price_list() -> Iterable[GpuPrice]:
    return GpuPrice.objects.select_related("gpu_model", "region").order_by("gpu_model__name", "region__code")


FLEET_STATES = ["allocated", "idle", "maintenance", "offline"]


@dataclass(frozen=True)
class FleetRow:
    """One line of the utilisation table: GPUs per state for one model, region or cluster."""

    key: str
    by_state: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.by_state.values())

    @property
    def cells(self) -> list[int]:
        return [self.by_state.get(state, 0) for state in FLEET_STATES]

    @property
    def allocated_percent(self) -> int:
        # Share of the rentable GPUs (allocated + idle) that are allocated.
        rentable = self.by_state.get("allocated", 0) + self.by_state.get("idle", 0)
        return round(100 * self.by_state.get("allocated", 0) / rentable) if rentable else 0


def fleet_utilisation(*, by: str, at: datetime | None = None, counts: list[FleetCount] | None = None) -> list[FleetRow]:
    """GPUs per state grouped by ``gpu_model``, ``region`` or ``cluster`` (one query, grouped here)."""
    if by not in {"gpu_model", "region", "cluster"}:
        raise ValueError(f"cannot group the fleet by {by!r}")
    grouped: dict[str, dict[str, int]] = {}
    for row in counts if counts is not None else fleet_gpu_counts(at=at):
        states = grouped.setdefault(getattr(row, by), {})
        states[row.state] = states.get(row.state, 0) + row.gpus
    return [FleetRow(key=key, by_state=states) for key, states in sorted(grouped.items())]


def gpu_model_catalogue() -> Iterable[GpuModel]:
    return GpuModel.objects.prefetch_related("prices__region").order_by("name")


def region_list() -> Iterable[Region]:
    return Region.objects.order_by("code")


def cluster_list() -> Iterable[Cluster]:
    return Cluster.objects.select_related("region").order_by("name")


def node_list(*, filters: dict | None = None) -> Iterable[Node]:
    return Node.objects.select_related("cluster__region", "gpu_model").filter(**(filters or {})).order_by("cluster__name", "name")


def gpu_price_for(*, gpu_model: GpuModel, region: Region) -> GpuPrice | None:
    return GpuPrice.objects.filter(gpu_model=gpu_model, region=region).first()
