"""Fleet catalogue: regions, GPU models with prices (everyone reads); clusters and nodes (ops)."""

from rest_framework import mixins, serializers, viewsets

from marketplace.api.permissions import IsStaff
from marketplace.inventory import selectors
from marketplace.inventory.models import Cluster, GpuModel, GpuPrice, Node, Region


class RegionSerializer(serializers.ModelSerializer):
    class Meta:
        model = Region
        fields = ["code", "name"]


class GpuPriceSerializer(serializers.ModelSerializer):
    region = serializers.SlugRelatedField(slug_field="code", read_only=True)

    class Meta:
        model = GpuPrice
        fields = ["region", "currency", "price_per_gpu_hour"]


class GpuModelSerializer(serializers.ModelSerializer):
    prices = GpuPriceSerializer(many=True, read_only=True)

    class Meta:
        model = GpuModel
        fields = ["name", "vendor", "memory_gb", "gpus_per_node", "prices"]


class ClusterSerializer(serializers.ModelSerializer):
    region = serializers.SlugRelatedField(slug_field="code", read_only=True)

    class Meta:
        model = Cluster
        fields = ["name", "region", "connection", "status"]


class NodeSerializer(serializers.ModelSerializer):
    cluster = serializers.SlugRelatedField(slug_field="name", read_only=True)
    gpu_model = serializers.SlugRelatedField(slug_field="name", read_only=True)

    class Meta:
        model = Node
        fields = ["id", "name", "cluster", "gpu_model", "gpu_count", "cpu_cores", "memory_gb",
                  "topology_domain", "status", "health", "health_checked_at"]


class RegionViewSet(viewsets.ReadOnlyModelViewSet):
    serializer_class = RegionSerializer
    lookup_field = "code"
    queryset = selectors.region_list()


class GpuModelViewSet(viewsets.ReadOnlyModelViewSet):
    serializer_class = GpuModelSerializer
    lookup_field = "name"
    queryset = selectors.gpu_model_catalogue()


class ClusterViewSet(viewsets.ReadOnlyModelViewSet):
    permission_classes = [IsStaff]
    serializer_class = ClusterSerializer
    lookup_field = "name"
    queryset = selectors.cluster_list()


class NodeViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    permission_classes = [IsStaff]
    serializer_class = NodeSerializer
    filterset_fields = ["status", "health", "cluster__name", "gpu_model__name", "topology_domain"]
    queryset = selectors.node_list()


def register(router) -> None:
    router.register("regions", RegionViewSet, basename="region")
    router.register("gpu-models", GpuModelViewSet, basename="gpu-model")
    router.register("clusters", ClusterViewSet, basename="cluster")
    router.register("nodes", NodeViewSet, basename="node")
