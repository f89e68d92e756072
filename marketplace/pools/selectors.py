"""Reads for the scheduler and for the pool pages: pool nodes, tenant GPUs per cluster, swap
candidates, what to reconcile, scheduler health, and what a tenant sees of its pool."""

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import Exists, OuterRef, Q, Sum

from marketplace.inventory.models import Cluster, MaintenanceWindow, Node
from marketplace.pools.models import Downtime, PlannedOperation, Pool, PoolNotice, SchedulerAttempt
from marketplace.reservations.models import Allocation, Reservation, ReservationEvent
from marketplace.reservations.status import ON_CLUSTER, ReservationStatus as S


def scheduler_setting(key: str):
    return settings.MARKETPLACE[key]


def tenant_namespace(tenant_slug: str) -> str:
    """The tenant's namespace on every cluster; the same rule as ``scheduler.driver.namespace_for``
    (imports flow from scheduler to marketplace, never back)."""
    return f"tenant-{tenant_slug}"


def pool_allocations(*, reservation_id) -> list[Allocation]:
    """The allocations whose nodes make up the pool now (state active), with their nodes."""
    return list(
        Allocation.objects.filter(reservation_id=reservation_id, state=Allocation.State.ACTIVE)
        .select_related("node").order_by("node__name")
    )


def pool_nodes_left(*, reservation_id) -> dict[str, datetime]:
    """Nodes swapped out of this pool (and not back in it), by name, with when they left it."""
    in_pool = Allocation.objects.filter(reservation_id=reservation_id, state=Allocation.State.ACTIVE)
    left: dict[str, datetime] = {}
    for name, left_at in (Allocation.objects.filter(reservation_id=reservation_id, state=Allocation.State.REPLACED)
                          .exclude(node_id__in=in_pool.values("node_id"))
                          .values_list("node__name", "ends_at")):
        left[name] = max(left_at, left.get(name, left_at))
    return left


def pool_node_names_ever(*, reservation_id) -> list[str]:
    """Every node that was ever part of this pool (for release: unlabel all of them)."""
    return sorted(set(
        Allocation.objects.filter(reservation_id=reservation_id).values_list("node__name", flat=True)
    ))


def tenant_cluster_gpus(*, tenant_id, cluster_id, exclude_reservation_id=None) -> int:
    """GPUs the tenant holds on the cluster: reservations provisioning, active, degraded or releasing."""
    qs = Reservation.objects.filter(tenant_id=tenant_id, cluster_id=cluster_id, status__in=ON_CLUSTER)
    if exclude_reservation_id is not None:
        qs = qs.exclude(pk=exclude_reservation_id)
    return qs.aggregate(total=Sum("gpus"))["total"] or 0


def swap_candidates(*, reservation: Reservation, failed_node: Node, starts_at: datetime, blocked_until: datetime,
                    limit: int = 10) -> list[Node]:
    """Free, healthy nodes of the same model and size in the same cluster (same topology domain
    when the booking asked for one) with nothing allocated or in maintenance in the period."""
    busy = Allocation.objects.filter(
        node=OuterRef("pk"), starts_at__lt=blocked_until, blocked_until__gt=starts_at
    ).exclude(state=Allocation.State.CANCELLED)
    maintenance = MaintenanceWindow.objects.filter(
        node=OuterRef("pk"), cancelled_at__isnull=True, starts_at__lt=blocked_until, ends_at__gt=starts_at
    )
    qs = (
        Node.objects.filter(
            cluster_id=reservation.cluster_id, gpu_model_id=reservation.gpu_model_id,
            gpu_count=failed_node.gpu_count, status=Node.Status.AVAILABLE,
        )
        .exclude(health=Node.Health.UNHEALTHY)
        .exclude(pk=failed_node.pk)
        .exclude(Exists(busy))
        .exclude(Exists(maintenance))
    )
    if reservation.same_domain:
        qs = qs.filter(topology_domain=failed_node.topology_domain)
    return list(qs.order_by("name")[:limit])


def maintenance_spans(*, node_ids: list[int], starts_at: datetime, ends_at: datetime) -> dict[int, tuple]:
    """Nodes with planned (not cancelled) maintenance overlapping [starts_at, ends_at): from the first
    such window's start to the last one's end."""
    spans: dict[int, tuple] = {}
    for node_id, first, last in MaintenanceWindow.objects.filter(
            node_id__in=node_ids, cancelled_at__isnull=True, starts_at__lt=ends_at, ends_at__gt=starts_at
    ).values_list("node_id", "starts_at", "ends_at"):
        known = spans.get(node_id, (first, last))
        spans[node_id] = (min(first, known[0]), max(last, known[1]))
    return spans


def node_is_free(*, node_id, starts_at: datetime, blocked_until: datetime) -> bool:
    return not Allocation.objects.filter(
        node_id=node_id, starts_at__lt=blocked_until, blocked_until__gt=starts_at
    ).exclude(state=Allocation.State.CANCELLED).exists()


def reservations_to_reconcile(*, now: datetime) -> list:
    """Every reservation the level-based reconcile must look at: on the cluster (or meant to be),
    due to start, or with cluster objects left to clean up."""
    lead = scheduler_setting("PROVISION_LEAD_TIME")
    qs = Reservation.objects.filter(
        Q(status__in=ON_CLUSTER)
        | Q(status=S.CONFIRMED, starts_at__lte=now + lead)
        | Q(pool__on_cluster=True)
    )
    return list(qs.order_by("starts_at").values_list("pk", flat=True))


def unhealthy_nodes_by_cluster() -> list[tuple[Cluster, list[Node]]]:
    """Nodes marked unhealthy (not retired) that no running pool holds, grouped by their active
    cluster: heal observes the nodes of running pools itself."""
    in_running_pool = Allocation.objects.filter(node=OuterRef("pk"), state=Allocation.State.ACTIVE,
                                                reservation__status__in=(S.ACTIVE, S.DEGRADED))
    nodes = (Node.objects.filter(health=Node.Health.UNHEALTHY, cluster__status=Cluster.Status.ACTIVE)
             .exclude(status=Node.Status.RETIRED).exclude(Exists(in_running_pool))
             .select_related("cluster").order_by("cluster_id", "name"))
    grouped: dict[int, tuple[Cluster, list[Node]]] = {}
    for node in nodes:
        grouped.setdefault(node.cluster_id, (node.cluster, []))[1].append(node)
    return list(grouped.values())


@dataclass
class SchedulerHealth:
    now: datetime
    overdue_events: list[ReservationEvent]
    stale_claims: list[ReservationEvent]
    failed: list[Reservation]
    degraded: list[Reservation]
    open_downtimes: list[Downtime]
    recent_failures: list[SchedulerAttempt]
    pools_to_clean: int

    @property
    def ok(self) -> bool:
        return not (self.overdue_events or self.stale_claims or self.failed or self.degraded)


def scheduler_health(*, now: datetime, overdue_after: timedelta = timedelta(minutes=1), limit: int = 50) -> SchedulerHealth:
    claim_timeout = scheduler_setting("CLAIM_TIMEOUT")
    events = ReservationEvent.objects.select_related("reservation", "reservation__tenant")
    return SchedulerHealth(
        now=now,
        overdue_events=list(events.filter(status=ReservationEvent.Status.PENDING, due_at__lt=now - overdue_after)
                            .order_by("due_at")[:limit]),
        stale_claims=list(events.filter(status=ReservationEvent.Status.CLAIMED, claimed_at__lt=now - claim_timeout)
                          .order_by("claimed_at")[:limit]),
        # Failures ops can still act on (retry: the window is not over) or that are recent; an old
        # failure stays in the audit log and the reservation list, not in the verdict forever.
        failed=list(Reservation.objects.filter(status=S.FAILED)
                    .filter(Q(ends_at__gt=now) | Q(status_changed_at__gte=now - timedelta(days=1)))
                    .select_related("tenant", "cluster").order_by("-status_changed_at")[:limit]),
        degraded=list(Reservation.objects.filter(status=S.DEGRADED).select_related("tenant", "cluster")
                      .order_by("-status_changed_at")[:limit]),
        open_downtimes=list(Downtime.objects.open().select_related("node", "reservation__tenant")[:limit]),
        recent_failures=list(
            SchedulerAttempt.objects.filter(at__gte=now - timedelta(days=1))
            .exclude(outcome=SchedulerAttempt.Outcome.OK).select_related("reservation__tenant")[:limit]
        ),
        # Cluster objects of reservations that are over (failed, completed) not yet cleaned up.
        pools_to_clean=Pool.objects.filter(on_cluster=True).exclude(reservation__status__in=ON_CLUSTER).count(),
    )


@dataclass
class PoolView:
    reservation: Reservation
    namespace: str
    label_prefix: str
    allocations: list[Allocation]
    downtimes: list[Downtime]
    notices: list[PoolNotice]
    planned_operations: list[PlannedOperation]
    plan_only: bool

    @property
    def node_selector(self) -> dict[str, str]:
        return {f"{self.label_prefix}/tenant": self.reservation.tenant.slug,
                f"{self.label_prefix}/pool": self.reservation.pool_name}

    @property
    def toleration(self) -> dict:
        return {"key": f"{self.label_prefix}/tenant", "operator": "Equal", "value": self.reservation.tenant.slug,
                "effect": "NoSchedule"}


def pool_for_tenant(*, tenant, reservation_id, operations_limit: int = 500) -> PoolView:
    """The tenant's view of one reservation's pool; another tenant's reservation does not exist."""
    reservation = Reservation.objects.for_tenant(tenant).select_related("tenant", "cluster", "gpu_model").get(
        pk=reservation_id
    )
    return pool_view(reservation=reservation, operations_limit=operations_limit)


def pool_view(*, reservation: Reservation, operations_limit: int = 500) -> PoolView:
    plan_only = reservation.cluster.connection == reservation.cluster.Connection.PLAN
    operations = []
    if plan_only:
        operations = list(PlannedOperation.objects.filter(reservation=reservation).order_by("created_at", "id")
                          [:operations_limit])
    return PoolView(
        reservation=reservation,
        namespace=tenant_namespace(reservation.tenant.slug),
        label_prefix=scheduler_setting("LABEL_PREFIX"),
        allocations=list(reservation.allocations.exclude(state=Allocation.State.CANCELLED)
                         .select_related("node").order_by("starts_at", "node__name")),
        downtimes=list(reservation.downtimes.select_related("node")),
        notices=list(reservation.pool_notices.all()),
        planned_operations=operations,
        plan_only=plan_only,
    )


PLAN_ONLY_LABEL = "plan only — no cluster configured"


def usage_instructions(view: PoolView) -> dict:
    """How to run pods on the pool: the namespace (pods land on the pool by default through its
    annotations), and the explicit selector and toleration for clusters without those plugins."""
    cluster = view.reservation.cluster.name
    ns = view.namespace
    selector = "\n".join(f"    {key}: {value}" for key, value in view.node_selector.items())
    toleration = view.toleration
    group = view.reservation.tenant.group_name
    return {
        "kubeconfig": (
            "apiVersion: v1\nkind: Config\n"
            f"clusters:\n- name: {cluster}\n  cluster:\n    server: https://<API server of {cluster}, from ops>\n"
            f"contexts:\n- name: {cluster}-{ns}\n  context:\n    cluster: {cluster}\n    namespace: {ns}\n"
            f"    user: {group}\n"
            f"current-context: {cluster}-{ns}\n"
            f"users:\n- name: {group}\n"
            "  user:  # your organisation's credentials for this group: OIDC token or client certificate\n"
            "    token: <token>\n"
        ),
        "pod_spec": (
            "spec:\n  nodeSelector:\n" + selector + "\n  tolerations:\n"
            f"  - key: {toleration['key']}\n    operator: Equal\n    value: {toleration['value']}\n"
            "    effect: NoSchedule\n  containers:\n  - name: main\n    image: <your image>\n"
            "    resources:\n      limits:\n        nvidia.com/gpu: "
            f"{view.reservation.gpu_model.gpus_per_node}\n"
        ),
        "steps": [
            f"Use namespace {ns} on cluster {cluster}; your group {view.reservation.tenant.group_name} may "
            "create pods, jobs and deployments there.",
            "Pods in that namespace land on your pool by default (namespace annotations); add the node "
            "selector and toleration above to be explicit.",
            f"The namespace's GPU quota is the sum of your active pools on {cluster}.",
            "At the end of the window your pods are evicted and the nodes go back to the fleet.",
        ],
    }
