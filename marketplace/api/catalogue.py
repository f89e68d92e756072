"""Fleet catalogue and inventory.

Everyone signed in reads the catalogue (regions, GPU models with prices). Ops (staff) manage
clusters, nodes, maintenance windows and prices; every write goes through an inventory service,
which validates, writes the audit row, and changes all or nothing.
"""

from decimal import Decimal

from django.db import models
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response

from marketplace.api.permissions import IsStaff, IsStaffOrReadOnly
from marketplace.api.strict import AwareDateTimeField, ParseBodyFirstMixin, StrictInputMixin
from marketplace.core.services import Actor
from marketplace.inventory import selectors, services
from marketplace.inventory.models import Cluster, GpuModel, GpuPrice, MaintenanceWindow, Node, Region


class RegionSerializer(serializers.ModelSerializer):
    class Meta:
        model = Region
        fields = ["code", "name"]


class GpuPriceSerializer(serializers.ModelSerializer):
    region = serializers.SlugRelatedField(slug_field="code", read_only=True)

    class Meta:
        model = GpuPrice
        fields = ["region", "currency", "price_per_gpu_hour"]


class GpuPriceRowSerializer(GpuPriceSerializer):
    gpu_model = serializers.SlugRelatedField(slug_field="name", read_only=True)

    class Meta(GpuPriceSerializer.Meta):
        fields = ["id", "gpu_model", *GpuPriceSerializer.Meta.fields]


class GpuPriceSetSerializer(StrictInputMixin, serializers.Serializer):
    gpu_model = serializers.SlugRelatedField(slug_field="name", queryset=GpuModel.objects.all())
    region = serializers.SlugRelatedField(slug_field="code", queryset=Region.objects.all())
    price_per_gpu_hour = serializers.DecimalField(max_digits=12, decimal_places=4, min_value=Decimal("0.0001"))
    currency = serializers.RegexField(r"^[A-Z]{3}$", default="USD")


class GpuModelSerializer(serializers.ModelSerializer):
    prices = GpuPriceSerializer(many=True, read_only=True)

    class Meta:
        model = GpuModel
        fields = ["name", "vendor", "memory_gb", "gpus_per_node", "prices"]


class ClusterSerializer(StrictInputMixin, serializers.ModelSerializer):
    region = serializers.SlugRelatedField(slug_field="code", queryset=Region.objects.all())

    class Meta:
        model = Cluster
        fields = ["name", "region", "connection", "kubeconfig_path", "kube_context", "status"]


class ClusterUpdateSerializer(StrictInputMixin, serializers.ModelSerializer):
    class Meta:
        model = Cluster
        fields = ["connection", "kubeconfig_path", "kube_context", "status"]


class NodeSerializer(StrictInputMixin, serializers.ModelSerializer):
    cluster = serializers.SlugRelatedField(slug_field="name", queryset=Cluster.objects.all())
    gpu_model = serializers.SlugRelatedField(slug_field="name", queryset=GpuModel.objects.all())

    class Meta:
        model = Node
        fields = ["id", "name", "cluster", "gpu_model", "gpu_count", "cpu_cores", "memory_gb",
                  "topology_domain", "status", "health", "health_checked_at"]
        read_only_fields = ["id", "health", "health_checked_at"]
        # Uniqueness is checked by the service (full_clean) so the message is the constraint's.
        validators = []


class NodeUpdateSerializer(StrictInputMixin, serializers.ModelSerializer):
    class Meta:
        model = Node
        fields = ["gpu_count", "cpu_cores", "memory_gb", "topology_domain"]


class AllocationHoldSerializer(serializers.Serializer):
    node_id = serializers.IntegerField()
    node = serializers.CharField()
    reservation_id = serializers.CharField()
    tenant = serializers.CharField()
    starts_at = serializers.DateTimeField()
    ends_at = serializers.DateTimeField()


class NodeBulkStatusSerializer(StrictInputMixin, serializers.Serializer):
    # Ids are bigints: a larger number is a 400 here, not an overflow in the database driver.
    node_ids = serializers.ListField(child=serializers.IntegerField(min_value=1, max_value=2**63 - 1),
                                     allow_empty=False, max_length=5000)
    status = serializers.ChoiceField(choices=Node.Status.choices)
    reason = serializers.CharField(max_length=500, required=False, default="", allow_blank=True)
    force = serializers.BooleanField(default=False, help_text="Take nodes out of service even if they are booked.")


class MaintenanceWindowSerializer(StrictInputMixin, serializers.ModelSerializer):
    serializer_field_mapping = {**serializers.ModelSerializer.serializer_field_mapping,
                                models.DateTimeField: AwareDateTimeField}
    node = serializers.PrimaryKeyRelatedField(queryset=Node.objects.all())
    node_name = serializers.CharField(source="node.name", read_only=True)
    cluster = serializers.CharField(source="node.cluster.name", read_only=True)

    class Meta:
        model = MaintenanceWindow
        fields = ["id", "node", "node_name", "cluster", "starts_at", "ends_at", "reason", "created_at", "cancelled_at"]
        read_only_fields = ["id", "created_at", "cancelled_at"]


class MaintenanceWindowCreateSerializer(MaintenanceWindowSerializer):
    force = serializers.BooleanField(default=False, write_only=True,
                                     help_text="Plan the window even if the node is booked during it.")

    class Meta(MaintenanceWindowSerializer.Meta):
        fields = [*MaintenanceWindowSerializer.Meta.fields, "force"]


class MaintenanceWindowCancelSerializer(StrictInputMixin, serializers.Serializer):
    reason = serializers.CharField(max_length=500, required=False, default="", allow_blank=True)


def actor(request) -> Actor:
    return Actor.for_user(request.user)


class RegionViewSet(viewsets.ReadOnlyModelViewSet):
    serializer_class = RegionSerializer
    lookup_field = "code"
    queryset = selectors.region_list()


class GpuModelViewSet(viewsets.ReadOnlyModelViewSet):
    """The catalogue: GPU models with their list price per GPU-hour in each region."""

    serializer_class = GpuModelSerializer
    lookup_field = "name"
    queryset = selectors.gpu_model_catalogue()
    filterset_fields = ["vendor"]


class GpuPriceViewSet(ParseBodyFirstMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """List prices; ops set one with POST (creates or replaces the price of a model in a region)."""

    permission_classes = [IsStaffOrReadOnly]
    serializer_class = GpuPriceRowSerializer
    queryset = selectors.gpu_price_list()
    filterset_fields = {"gpu_model__name": ["exact"], "region__code": ["exact"]}

    @extend_schema(request=GpuPriceSetSerializer, responses={201: GpuPriceRowSerializer})
    def create(self, request):
        data = GpuPriceSetSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        values = data.validated_data
        price = services.gpu_price_set(actor=actor(request), gpu_model=values["gpu_model"], region=values["region"],
                                       price=values["price_per_gpu_hour"], currency=values["currency"])
        return Response(GpuPriceRowSerializer(price).data, status=status.HTTP_201_CREATED)


class ClusterViewSet(ParseBodyFirstMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    permission_classes = [IsStaff]
    serializer_class = ClusterSerializer
    lookup_field = "name"
    queryset = selectors.cluster_list()
    filterset_fields = {"region__code": ["exact"], "status": ["exact"], "connection": ["exact"]}

    @extend_schema(request=ClusterSerializer, responses={201: ClusterSerializer})
    def create(self, request):
        data = ClusterSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        cluster = services.cluster_create(actor=actor(request), **data.validated_data)
        return Response(ClusterSerializer(cluster).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=ClusterUpdateSerializer, responses=ClusterSerializer)
    def partial_update(self, request, name=None):
        data = ClusterUpdateSerializer(data=request.data, partial=True)
        data.is_valid(raise_exception=True)
        cluster = services.cluster_update(actor=actor(request), cluster=self.get_object(), **data.validated_data)
        return Response(ClusterSerializer(cluster).data)


class NodeViewSet(ParseBodyFirstMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    permission_classes = [IsStaff]
    serializer_class = NodeSerializer
    filterset_fields = {"status": ["exact", "in"], "health": ["exact"], "cluster__name": ["exact"],
                        "cluster__region__code": ["exact"], "gpu_model__name": ["exact"], "topology_domain": ["exact"]}
    queryset = selectors.node_list()

    @extend_schema(request=NodeSerializer, responses={201: NodeSerializer})
    def create(self, request):
        data = NodeSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        node = services.node_create(actor=actor(request), **data.validated_data)
        return Response(NodeSerializer(node).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=NodeUpdateSerializer, responses=NodeSerializer)
    def partial_update(self, request, pk=None):
        data = NodeUpdateSerializer(data=request.data, partial=True)
        data.is_valid(raise_exception=True)
        node = services.node_update(actor=actor(request), node=self.get_object(), **data.validated_data)
        return Response(NodeSerializer(node).data)

    @extend_schema(
        request=NodeBulkStatusSerializer,
        responses=inline_serializer("NodeBulkStatusResult", {
            "nodes": NodeSerializer(many=True), "affected_allocations": AllocationHoldSerializer(many=True),
        }),
    )
    @action(detail=False, methods=["post"], url_path="bulk-status")
    def bulk_status(self, request):
        """Set the status of many nodes at once (all or none). Booked nodes going out of service are
        refused with 409 listing every booking, unless ``force`` is true."""
        data = NodeBulkStatusSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        change = services.node_bulk_set_status(actor=actor(request), **data.validated_data)
        return Response({
            "nodes": NodeSerializer(change.nodes, many=True).data,
            "affected_allocations": AllocationHoldSerializer([h.as_dict() for h in change.affected_allocations],
                                                             many=True).data,
        })


class MaintenanceWindowViewSet(ParseBodyFirstMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Planned maintenance. Windows are cancelled, never deleted."""

    permission_classes = [IsStaff]
    serializer_class = MaintenanceWindowSerializer
    queryset = selectors.maintenance_window_list()
    filterset_fields = {"node": ["exact"], "node__cluster__name": ["exact"], "cancelled_at": ["isnull"],
                        "ends_at": ["gte"], "starts_at": ["lte"]}

    @extend_schema(
        request=MaintenanceWindowCreateSerializer,
        responses={201: inline_serializer("MaintenanceWindowCreated", {
            "window": MaintenanceWindowSerializer(), "affected_allocations": AllocationHoldSerializer(many=True),
        })},
    )
    def create(self, request):
        data = MaintenanceWindowCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        window, holds = services.maintenance_window_create(actor=actor(request), **data.validated_data)
        return Response({
            "window": MaintenanceWindowSerializer(window).data,
            "affected_allocations": AllocationHoldSerializer([h.as_dict() for h in holds], many=True).data,
        }, status=status.HTTP_201_CREATED)

    @extend_schema(request=MaintenanceWindowCancelSerializer, responses=MaintenanceWindowSerializer)
    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        window_id = self.get_object().pk
        data = MaintenanceWindowCancelSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        window = services.maintenance_window_cancel(actor=actor(request), window_id=window_id, **data.validated_data)
        return Response(MaintenanceWindowSerializer(window).data)


def register(router) -> None:
    router.register("regions", RegionViewSet, basename="region")
    router.register("gpu-models", GpuModelViewSet, basename="gpu-model")
    router.register("gpu-prices", GpuPriceViewSet, basename="gpu-price")
    router.register("clusters", ClusterViewSet, basename="cluster")
    router.register("nodes", NodeViewSet, basename="node")
    router.register("maintenance-windows", MaintenanceWindowViewSet, basename="maintenance-window")
