"""Writes to the fleet inventory. Every change by a person or task is audited with before/after."""

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from django.db import transaction
from django.utils import timezone

from marketplace.core.exceptions import Conflict, InvalidInput, NotFound
from marketplace.core.services import Actor, audit_record, audited_update, snapshot
from marketplace.inventory import selectors
from marketplace.inventory.models import Cluster, GpuModel, GpuPrice, MaintenanceWindow, Node, Region
from marketplace.pools import services as pools

NODE_AUDIT_FIELDS = ["name", "cluster", "gpu_model", "gpu_count", "cpu_cores", "memory_gb", "topology_domain",
                     "status"]
CLUSTER_AUDIT_FIELDS = ["name", "region", "connection", "kubeconfig_path", "kube_context", "status"]
WINDOW_AUDIT_FIELDS = ["node", "starts_at", "ends_at", "reason", "cancelled_at"]
PRICE_AUDIT_FIELDS = ["gpu_model", "region", "price_per_gpu_hour", "currency"]
# Statuses that take a node out of rentable capacity; bookings that still hold it must be dealt with.
OUT_OF_SERVICE = {Node.Status.MAINTENANCE, Node.Status.OFFLINE, Node.Status.RETIRED}


class NodeHasAllocations(Conflict):
    code = "node_has_allocations"


@dataclass(frozen=True)
class NodeStatusChange:
    nodes: list[Node]
    # Allocations (current or future) on nodes that went out of service with ``force``.
    affected_allocations: list[selectors.AllocationHold] = field(default_factory=list)


def region_ensure(*, code: str, name: str) -> Region:
    region, _ = Region.objects.get_or_create(code=code, defaults={"name": name})
    return region


def gpu_model_ensure(*, name: str, vendor: str, memory_gb: int, gpus_per_node: int = 8) -> GpuModel:
    model, _ = GpuModel.objects.get_or_create(
        name=name, defaults={"vendor": vendor, "memory_gb": memory_gb, "gpus_per_node": gpus_per_node}
    )
    return model


def gpu_price_set(*, actor: Actor, gpu_model: GpuModel, region: Region, price: Decimal, currency: str = "USD") -> GpuPrice:
    """Sets the list price of a model in a region. Reservations keep the price they were booked at."""
    with transaction.atomic():
        existing = GpuPrice.objects.select_for_update().filter(gpu_model=gpu_model, region=region).first()
        before = snapshot(existing, PRICE_AUDIT_FIELDS) if existing else None
        price_row = existing or GpuPrice(gpu_model=gpu_model, region=region)
        price_row.price_per_gpu_hour = price
        price_row.currency = currency
        price_row.full_clean()
        price_row.save()
        after = snapshot(price_row, PRICE_AUDIT_FIELDS)
        if before != after:
            audit_record(actor=actor, action="gpu_price.set", obj=price_row, before=before, after=after)
    return price_row


def cluster_ensure(*, actor: Actor, name: str, region: Region, connection: str = Cluster.Connection.PLAN,
                   kubeconfig_path: str = "", kube_context: str = "") -> Cluster:
    existing = Cluster.objects.filter(name=name).first()
    if existing is not None:
        return existing
    return cluster_create(actor=actor, name=name, region=region, connection=connection,
                          kubeconfig_path=kubeconfig_path, kube_context=kube_context)


def cluster_create(*, actor: Actor, name: str, region: Region, connection: str = Cluster.Connection.PLAN,
                   kubeconfig_path: str = "", kube_context: str = "",
                   status: str = Cluster.Status.ACTIVE) -> Cluster:
    with transaction.atomic():
        cluster = Cluster(name=name, region=region, connection=connection, kubeconfig_path=kubeconfig_path,
                          kube_context=kube_context, status=status)
        cluster.full_clean()
        cluster.save()
        audit_record(actor=actor, action="cluster.create", obj=cluster, after=snapshot(cluster, CLUSTER_AUDIT_FIELDS))
    return cluster


def cluster_update(*, actor: Actor, cluster: Cluster, **changes: Any) -> Cluster:
    return audited_update(actor=actor, obj=cluster, changes=changes, audit_fields=CLUSTER_AUDIT_FIELDS,
                          allowed={"connection", "kubeconfig_path", "kube_context", "status"}, action="cluster.update")


def node_create(*, actor: Actor, cluster: Cluster, name: str, gpu_model: GpuModel, topology_domain: str,
                gpu_count: int | None = None, cpu_cores: int = 0, memory_gb: int = 0,
                status: str = Node.Status.AVAILABLE, health: str = Node.Health.UNKNOWN) -> Node:
    with transaction.atomic():
        node = Node(cluster=cluster, name=name, gpu_model=gpu_model, topology_domain=topology_domain,
                    gpu_count=gpu_count if gpu_count is not None else gpu_model.gpus_per_node,
                    cpu_cores=cpu_cores, memory_gb=memory_gb, status=status, health=health)
        node.full_clean()
        node.save()
        audit_record(actor=actor, action="node.create", obj=node, after=snapshot(node, NODE_AUDIT_FIELDS))
    return node


def node_update(*, actor: Actor, node: Node, **changes: Any) -> Node:
    """Hardware facts of a node. Its status changes through ``node_set_status`` (bookings are checked)."""
    return audited_update(actor=actor, obj=node, changes=changes, audit_fields=NODE_AUDIT_FIELDS,
                          allowed={"gpu_count", "cpu_cores", "memory_gb", "topology_domain"}, action="node.update")


def node_set_status(*, actor: Actor, node: Node, status: str, reason: str = "", force: bool = True) -> Node:
    return node_bulk_set_status(actor=actor, node_ids=[node.pk], status=status, reason=reason, force=force).nodes[0]


def node_bulk_set_status(*, actor: Actor, node_ids: list[int], status: str, reason: str = "",
                         force: bool = False) -> NodeStatusChange:
    """Moves nodes to ``status``, all or none.

    Taking a node out of service while a reservation holds it now or later is refused (409, with
    every such booking listed) unless ``force``: then the change is made and the bookings are
    returned, so ops can see exactly whom it affects.
    """
    if status not in Node.Status.values:
        raise InvalidInput(f"Unknown node status {status!r}.",
                           fields={"status": [f"one of {', '.join(Node.Status.values)}"]})
    node_ids = list(dict.fromkeys(node_ids))
    if not node_ids:
        raise InvalidInput("Name at least one node.", fields={"node_ids": ["This list may not be empty."]})
    with transaction.atomic():
        nodes = list(Node.objects.select_for_update().filter(pk__in=node_ids).order_by("pk"))
        missing = sorted(set(node_ids) - {node.pk for node in nodes})
        if missing:
            raise NotFound(f"No such node: {', '.join(map(str, missing))}.",
                           fields={"node_ids": [f"unknown id {pk}" for pk in missing]})
        holds = selectors.allocations_holding(node_ids=node_ids, after=timezone.now()) if status in OUT_OF_SERVICE else []
        if holds and not force:
            raise NodeHasAllocations(
                f"{len({h.node_name for h in holds})} node(s) are booked now or later; "
                f"send force=true to take them out of service anyway.",
                fields={"node_ids": [hold.describe() for hold in holds]},
            )
        changed = []
        for node in nodes:
            if node.status == status:
                continue
            before = snapshot(node, ["status"])
            node.status = status
            node.save(update_fields=["status"])
            audit_record(actor=actor, action="node.status", obj=node, before=before,
                         after=snapshot(node, ["status"]), message=reason)
            changed.append(node.pk)
    if changed:  # out of service, or back in service
        _notify_bookings(actor=actor, holds=selectors.allocations_holding(node_ids=changed, after=timezone.now()))
    return NodeStatusChange(nodes=nodes, affected_allocations=holds)


def _notify_bookings(*, actor: Actor, holds: list[selectors.AllocationHold]) -> None:
    """Refresh the notice of every booking these holds belong to.

    After the change has committed, in transactions of its own: node rows are not held locked while
    reservations are locked (the scheduler locks a reservation, then the nodes it swaps in)."""
    pools.reservation_withdrawn_nodes_notice_refresh(actor=actor, reservation_ids=[h.reservation_id for h in holds],
                                                     now=timezone.now())


def maintenance_window_create(*, actor: Actor, node: Node, starts_at: datetime, ends_at: datetime,
                              reason: str = "", force: bool = False) -> tuple[MaintenanceWindow, list]:
    """Plans maintenance of a node. Overlapping bookings are refused unless ``force`` (then returned)."""
    if ends_at <= starts_at:
        raise InvalidInput("A maintenance window must end after it starts.",
                           fields={"ends_at": ["must be after starts_at"]})
    if ends_at <= timezone.now():
        raise InvalidInput("A maintenance window must end in the future.", fields={"ends_at": ["is in the past"]})
    with transaction.atomic():
        # Lock the node so a booking and a window on it are not decided at the same moment.
        node = Node.objects.select_for_update().get(pk=node.pk)
        holds = selectors.allocations_holding(node_ids=[node.pk], after=starts_at, before=ends_at)
        if holds and not force:
            raise NodeHasAllocations(
                "The node is booked during this window; send force=true to plan it anyway.",
                fields={"starts_at": [hold.describe() for hold in holds]},
            )
        window = MaintenanceWindow(node=node, starts_at=starts_at, ends_at=ends_at, reason=reason,
                                   created_by=actor.user if actor.user is not None and actor.user.pk else None)
        window.full_clean()
        window.save()
        audit_record(actor=actor, action="maintenance_window.create", obj=window,
                     after=snapshot(window, WINDOW_AUDIT_FIELDS), message=reason)
    _notify_bookings(actor=actor, holds=holds)
    return window, holds


def maintenance_window_cancel(*, actor: Actor, window_id: int, reason: str = "") -> MaintenanceWindow:
    """Cancels a window (never deletes it: the plan stays in the history). Cancelling twice is a no-op."""
    with transaction.atomic():
        window = MaintenanceWindow.objects.select_for_update().filter(pk=window_id).first()
        if window is None:
            raise NotFound("No such maintenance window.")
        cancelled = window.cancelled_at is None
        if cancelled:
            if window.ends_at <= timezone.now():
                raise Conflict("This maintenance window is already over.", code="window_over")
            before = snapshot(window, WINDOW_AUDIT_FIELDS)
            window.cancelled_at = timezone.now()
            window.save(update_fields=["cancelled_at"])
            audit_record(actor=actor, action="maintenance_window.cancel", obj=window, before=before,
                         after=snapshot(window, WINDOW_AUDIT_FIELDS), message=reason)
    if cancelled:
        _notify_bookings(actor=actor, holds=selectors.allocations_holding(
            node_ids=[window.node_id], after=window.starts_at, before=window.ends_at))
    return window
