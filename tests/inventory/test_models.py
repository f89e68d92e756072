"""Every named constraint of the inventory refuses bad rows, with its own message."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from marketplace.inventory.models import Cluster, GpuModel, GpuPrice, MaintenanceWindow, Node
from tests.factories import ClusterFactory, GpuModelFactory, GpuPriceFactory, NodeFactory, RegionFactory


def violates(instance, constraint_name: str) -> None:
    """The row fails validation with the constraint's message, and the database refuses it too."""
    constraint = next(c for c in instance._meta.constraints if c.name == constraint_name)
    with pytest.raises(ValidationError) as caught:
        instance.full_clean()
    assert constraint.violation_error_message in str(caught.value)
    with pytest.raises(IntegrityError), transaction.atomic():
        instance.save()


@pytest.mark.django_db
class TestInventoryConstraints:
    def test_gpu_model_holds_at_least_one_gpu_per_node(self):
        # The field's own validator answers first in validation; the constraint guards the table.
        model = GpuModel(name="X1", memory_gb=1, gpus_per_node=0)
        with pytest.raises(ValidationError) as caught:
            model.full_clean()
        assert "gpus_per_node" in caught.value.message_dict
        with pytest.raises(IntegrityError, match="gpumodel_gpus_per_node_positive"), transaction.atomic():
            model.save()

    def test_one_price_per_model_and_region(self):
        price = GpuPriceFactory()
        violates(GpuPrice(gpu_model=price.gpu_model, region=price.region, price_per_gpu_hour=Decimal("1")),
                 "gpuprice_model_region_unique")

    def test_price_is_positive(self):
        violates(GpuPrice(gpu_model=GpuModelFactory(), region=RegionFactory(), price_per_gpu_hour=Decimal("0")),
                 "gpuprice_positive")

    def test_currency_is_iso_4217(self):
        violates(GpuPrice(gpu_model=GpuModelFactory(), region=RegionFactory(), price_per_gpu_hour=Decimal("1"),
                          currency="usd"), "gpuprice_currency_iso")

    def test_kubeconfig_connection_needs_a_path(self):
        violates(Cluster(name="c-kube", region=RegionFactory(), connection=Cluster.Connection.KUBECONFIG),
                 "cluster_kubeconfig_needs_path")

    def test_node_names_are_unique_within_a_cluster_only(self):
        node = NodeFactory()
        violates(Node(name=node.name, cluster=node.cluster, gpu_model=node.gpu_model, topology_domain="ib-0"),
                 "node_cluster_name_unique")
        elsewhere = Node(name=node.name, cluster=ClusterFactory(), gpu_model=node.gpu_model, topology_domain="ib-0")
        elsewhere.full_clean()

    def test_node_has_at_least_one_gpu(self):
        violates(Node(name="n0", cluster=ClusterFactory(), gpu_model=GpuModelFactory(), gpu_count=0,
                      topology_domain="ib-0"), "node_gpu_count_positive")

    def test_maintenance_window_ends_after_it_starts(self):
        start = timezone.now()
        violates(MaintenanceWindow(node=NodeFactory(), starts_at=start, ends_at=start - timedelta(minutes=1)),
                 "maintenance_window_ends_after_start")
