"""Scheduler orchestration test helpers: reservations built with factories (Reservation +
Allocation + events) and the cluster fixtures. Test modules import the fixtures they use."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.conf import settings
from django.utils import timezone

from marketplace.reservations.models import Allocation, Reservation, ReservationEvent
from tests.factories import ClusterFactory, GpuModelFactory, NodeFactory, TenantFactory, UserFactory


def book(*, tenant=None, cluster=None, nodes=None, node_count=2, starts_at=None, duration=timedelta(hours=4),
         status=Reservation.Status.CONFIRMED, same_domain=False, events=True) -> Reservation:
    """A reservation of whole nodes with its allocations and its three due events."""
    tenant = tenant or TenantFactory()
    cluster = cluster or (nodes[0].cluster if nodes else ClusterFactory())
    nodes = nodes or [NodeFactory(cluster=cluster) for _ in range(node_count)]
    starts_at = starts_at or timezone.now() + timedelta(minutes=5)
    ends_at = starts_at + duration
    gpu_model = nodes[0].gpu_model
    reservation = Reservation.objects.create(
        tenant=tenant, created_by=UserFactory(), gpu_model=gpu_model, cluster=cluster,
        gpus=sum(node.gpu_count for node in nodes), same_domain=same_domain, starts_at=starts_at, ends_at=ends_at,
        status=status, currency="USD", unit_price=Decimal("2.5000"), total_price=Decimal("100.00"),
    )
    gap = settings.MARKETPLACE["CLEANING_GAP"]
    for node in nodes:
        Allocation.objects.create(reservation=reservation, node=node, starts_at=starts_at, ends_at=ends_at,
                                  blocked_until=ends_at + gap)
    if events:
        lead = settings.MARKETPLACE["PROVISION_LEAD_TIME"]
        notice = settings.MARKETPLACE["END_NOTICE_LEAD_TIME"]
        for kind, due in ((ReservationEvent.Kind.START, starts_at - lead),
                          (ReservationEvent.Kind.END_NOTICE, ends_at - notice),
                          (ReservationEvent.Kind.END, ends_at)):
            ReservationEvent.objects.create(reservation=reservation, kind=kind, due_at=due)
    return reservation


@pytest.fixture
def h100():
    return GpuModelFactory()


@pytest.fixture
def plan_cluster(db):
    return ClusterFactory(name="plan-east")


@pytest.fixture
def kube_cluster(db):
    """A cluster row of a real (kubeconfig) cluster; tests serve it with the in-memory driver."""
    from marketplace.inventory.models import Cluster

    return ClusterFactory(name="kube-east", connection=Cluster.Connection.KUBECONFIG,
                          kubeconfig_path="/etc/marketplace/kube-east.yaml")


@pytest.fixture
def memory(kube_cluster):
    """The in-memory cluster plus a ``drivers`` callable for the reconcile functions."""
    from tests.scheduler.memory_cluster import MemoryCluster

    cluster = MemoryCluster()
    cluster.drivers = lambda _cluster_row: cluster
    return cluster


def pool_nodes(memory, cluster, count=2, domain="ib-0", spare=0):
    """Nodes in the inventory and on the in-memory cluster; returns (pool nodes, spare nodes)."""
    nodes = [NodeFactory(cluster=cluster, topology_domain=domain) for _ in range(count + spare)]
    for node in nodes:
        memory.add_node(node.name, node.gpu_count)
    return nodes[:count], nodes[count:]


@pytest.fixture
def fake_server():
    """The stateful fake Kubernetes API server (tests/k8s_fake), over real HTTP."""
    from tests.k8s_fake import FakeKube

    fake = FakeKube().start()
    yield fake
    fake.stop()


def server_nodes(fake_server, cluster, count=2, domain="ib-0", spare=0):
    """Nodes in the inventory and registered on the fake API server; returns (pool, spares)."""
    nodes = [NodeFactory(cluster=cluster, topology_domain=domain) for _ in range(count + spare)]
    for node in nodes:
        fake_server.add_node(node.name, gpus=node.gpu_count)
    return nodes[:count], nodes[count:]


def node_marks(fake_server, name, prefix="gpu.marketplace.io"):
    """What of ours is on a Node object on the server: labels, taints, cordon."""
    node = fake_server.get("nodes", name)
    labels = {k: v for k, v in node["metadata"].get("labels", {}).items() if k.startswith(prefix)}
    taints = [t for t in node.get("spec", {}).get("taints") or [] if t["key"].startswith(prefix)]
    return {"labels": labels, "taints": taints, "unschedulable": bool(node["spec"].get("unschedulable"))}
