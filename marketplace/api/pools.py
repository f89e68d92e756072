"""Node pools: what a tenant's reservation looks like on its cluster, and how to use it.
Ops: scheduler health and retrying a failed reservation."""

from django.utils import timezone
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, serializers, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response

from marketplace.api.permissions import IsStaff
from marketplace.api.scoping import TenantScopedViewSet
from marketplace.api.strict import EmptyBodySerializer, ParseBodyFirstMixin
from marketplace.core.services import Actor
from marketplace.pools import selectors, services
from marketplace.pools.models import PoolNotice
from marketplace.pools.selectors import PLAN_ONLY_LABEL, usage_instructions
from marketplace.reservations.models import Reservation

class PoolNodeSerializer(serializers.Serializer):
    name = serializers.CharField(source="node.name")
    topology_domain = serializers.CharField(source="node.topology_domain")
    health = serializers.CharField(source="node.health")
    state = serializers.CharField()
    starts_at = serializers.DateTimeField()
    ends_at = serializers.DateTimeField()


class DowntimeSerializer(serializers.Serializer):
    node = serializers.CharField(source="node.name")
    started_at = serializers.DateTimeField()
    ended_at = serializers.DateTimeField(allow_null=True)
    reason = serializers.CharField()
    resolution = serializers.CharField()


class NoticeSerializer(serializers.Serializer):
    kind = serializers.CharField()
    message = serializers.CharField()
    created_at = serializers.DateTimeField()
    posted_to_cluster_at = serializers.DateTimeField(allow_null=True)


class PlannedOperationSerializer(serializers.Serializer):
    verb = serializers.CharField()
    kind = serializers.CharField()
    namespace = serializers.CharField()
    name = serializers.CharField()
    body = serializers.JSONField()
    created_at = serializers.DateTimeField()


class PoolSummarySerializer(serializers.Serializer):
    # A pool is addressed by its reservation's id (/api/v1/pools/{id}/), like every other resource.
    id = serializers.UUIDField(source="pk")
    reservation_id = serializers.UUIDField(source="pk")
    pool = serializers.CharField(source="pool_name")
    status = serializers.CharField()
    cluster = serializers.CharField(source="cluster.name")
    gpu_model = serializers.CharField(source="gpu_model.name")
    gpus = serializers.IntegerField()
    starts_at = serializers.DateTimeField()
    ends_at = serializers.DateTimeField()
    ready_at = serializers.DateTimeField(allow_null=True)
    end_notice_at = serializers.DateTimeField(allow_null=True)
    released_at = serializers.DateTimeField(allow_null=True)


def pool_detail_data(view: selectors.PoolView) -> dict:
    reservation = view.reservation
    data = PoolSummarySerializer(reservation).data
    data.update({
        "status_reason": reservation.status_reason,
        "namespace": view.namespace,
        "node_selector": view.node_selector,
        "toleration": view.toleration,
        "nodes": PoolNodeSerializer(view.allocations, many=True).data,
        "readiness": reservation.readiness,
        "end_notice": NoticeSerializer([notice for notice in view.notices if notice.kind == PoolNotice.Kind.END_SOON],
                                       many=True).data,
        "notices": NoticeSerializer(view.notices, many=True).data,  # every notice, of every kind
        "downtime": DowntimeSerializer(view.downtimes, many=True).data,
        "plan_only": view.plan_only,
        "usage": usage_instructions(view),
    })
    if view.plan_only:
        data["planned_operations"] = {
            "label": PLAN_ONLY_LABEL,
            "operations": PlannedOperationSerializer(view.planned_operations, many=True).data,
        }
    return data


class PoolViewSet(mixins.ListModelMixin, TenantScopedViewSet):
    """Your reservations' node pools. Another tenant's pool does not exist (404)."""

    serializer_class = PoolSummarySerializer
    scoped_model = Reservation
    lookup_field = "pk"
    lookup_value_regex = "[0-9a-fA-F-]{32,36}"
    filterset_fields = ["status"]

    def tenant_queryset(self, tenant):
        return Reservation.objects.for_tenant(tenant).select_related("cluster", "gpu_model").order_by(
            "-starts_at", "-created_at"
        )

    @extend_schema(responses={200: dict})
    def retrieve(self, request, pk=None):
        reservation = self.get_object()  # 404 for another tenant's reservation
        return Response(pool_detail_data(selectors.pool_view(reservation=reservation)))


class ReservationRefSerializer(serializers.Serializer):
    id = serializers.UUIDField(source="pk")
    tenant = serializers.CharField(source="tenant.slug")
    status = serializers.CharField()
    status_reason = serializers.CharField()
    starts_at = serializers.DateTimeField()
    ends_at = serializers.DateTimeField()


class EventRefSerializer(serializers.Serializer):
    id = serializers.IntegerField(source="pk")
    reservation_id = serializers.UUIDField()
    kind = serializers.CharField()
    due_at = serializers.DateTimeField()
    status = serializers.CharField()
    attempts = serializers.IntegerField()
    claimed_at = serializers.DateTimeField(allow_null=True)
    last_error = serializers.CharField()


class AttemptSerializer(serializers.Serializer):
    reservation_id = serializers.UUIDField()
    action = serializers.CharField()
    outcome = serializers.CharField()
    message = serializers.CharField()
    at = serializers.DateTimeField()


class OpenDowntimeSerializer(DowntimeSerializer):
    reservation_id = serializers.UUIDField()


class SchedulerOpsViewSet(ParseBodyFirstMixin, viewsets.ViewSet):
    """Ops: scheduler health (overdue due events, stale claims, failures) and retrying failures."""

    permission_classes = [IsStaff]
    lookup_value_regex = "[0-9a-fA-F-]{32,36}"

    @extend_schema(responses={200: dict})
    def list(self, request):
        health = selectors.scheduler_health(now=timezone.now())
        return Response({
            "ok": health.ok,
            "checked_at": health.now,
            "overdue_events": EventRefSerializer(health.overdue_events, many=True).data,
            "stale_claims": EventRefSerializer(health.stale_claims, many=True).data,
            "failed_reservations": ReservationRefSerializer(health.failed, many=True).data,
            "degraded_reservations": ReservationRefSerializer(health.degraded, many=True).data,
            "open_downtimes": OpenDowntimeSerializer(health.open_downtimes, many=True).data,
            "recent_failures": AttemptSerializer(health.recent_failures, many=True).data,
            "pools_to_clean": health.pools_to_clean,
        })

    @extend_schema(request=None, responses={200: ReservationRefSerializer})
    @action(detail=True, methods=["post"], url_path="retry")
    def retry(self, request, pk=None):
        """Retry a failed reservation: its nodes are allocated again (if still free) and it goes
        back to confirmed, so the scheduler provisions it at once."""
        EmptyBodySerializer(data=request.data).is_valid(raise_exception=True)
        reservation = services.reservation_retry(reservation_id=pk, actor=Actor.for_user(request.user),
                                                 now=timezone.now())
        reservation.refresh_from_db()
        return Response(ReservationRefSerializer(reservation).data)


def register(router) -> None:
    router.register("pools", PoolViewSet, basename="pool")
    router.register("ops/scheduler", SchedulerOpsViewSet, basename="ops-scheduler")
