from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import time_machine

from marketplace.core.services import Actor
from tests.factories import ClusterFactory, GpuModelFactory, GpuPriceFactory, NodeFactory, RegionFactory

# A Tuesday morning; every test that books runs at this frozen instant.
NOW = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)


def at(hours: float) -> datetime:
    """NOW + hours (aligned to 15 min when hours is a multiple of 0.25)."""
    return NOW + timedelta(hours=hours)


@pytest.fixture
def frozen():
    with time_machine.travel(NOW, tick=False) as traveller:
        yield traveller


@pytest.fixture
def fleet(db):
    """One region, one H100 cluster: domain ib-a with 4 nodes, ib-b with 2 nodes; price 2.5 USD/GPU-h."""
    region = RegionFactory(code="us-east")
    model = GpuModelFactory(name="H100-SXM-80GB", gpus_per_node=8)
    GpuPriceFactory(gpu_model=model, region=region, price_per_gpu_hour=Decimal("2.5000"), currency="USD")
    cluster = ClusterFactory(name="east-1", region=region)
    nodes = {f"a{i}": NodeFactory(name=f"a{i}", cluster=cluster, gpu_model=model, topology_domain="ib-a")
             for i in range(4)}
    nodes |= {f"b{i}": NodeFactory(name=f"b{i}", cluster=cluster, gpu_model=model, topology_domain="ib-b")
              for i in range(2)}
    return type("Fleet", (), {"region": region, "model": model, "cluster": cluster, "nodes": nodes})


@pytest.fixture
def actor(member):
    return Actor.for_user(member)
