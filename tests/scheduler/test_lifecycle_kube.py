"""The scheduler's lifecycle against a Kubernetes API server, through the production path: the
cluster row's kubeconfig → ``driver_for`` → ``KubernetesDriver`` → the real ``kubernetes`` client
over HTTP. Assertions are on the objects on the server.

Every test runs against the fake API server (``tests/k8s_fake``) and, when ``K8S_TEST_KUBECONFIG``
names one, against a real cluster too (the ``cluster`` fixture of ``conftest.py``: Node objects
of its own under unique names, no kubelet, everything it made deleted afterwards). Fault
injection runs on the fake only.
"""

from datetime import timedelta

import pytest
import time_machine
from django.utils import timezone

from marketplace.inventory.models import Cluster as ClusterRow
from marketplace.pools import services
from marketplace.pools.models import Downtime
from marketplace.reservations.models import Allocation, Reservation
from scheduler import reconcile
from scheduler.drivers import driver_for
from tests.factories import ClusterFactory, NodeFactory, TenantFactory
from tests.scheduler.helpers import book

S = Reservation.Status
PREFIX = "gpu.marketplace.io"
GRACE_PASSED = timedelta(minutes=6)  # past the drain grace period (and the claim timeout)


@pytest.fixture
def row(db, cluster):
    """The cluster as the marketplace registers it: a kubeconfig (the fake's, or the real one)."""
    return ClusterFactory(name=f"k8s-{cluster.uid}", connection=ClusterRow.Connection.KUBECONFIG,
                          kubeconfig_path=cluster.kubeconfig)


@pytest.fixture
def tenant_on(cluster):
    """A tenant with a name unique to this run; its namespace is removed after the test."""
    tenant = TenantFactory(slug=f"t-{cluster.uid}")
    cluster.namespaces.append(f"tenant-{tenant.slug}")
    return tenant


def add_nodes(cluster, row, count, *, spare=0, domain="ib-0"):
    nodes = []
    for index in range(count + spare):
        name = cluster.add_node(f"gpu-{index}")
        nodes.append(NodeFactory(name=name, cluster=row, topology_domain=domain))
    return nodes[:count], nodes[count:]


def book_an_hour(tenant, nodes):
    """A confirmed reservation of ``nodes`` from five minutes from now, for an hour."""
    return book(tenant=tenant, nodes=nodes, starts_at=timezone.now() + timedelta(minutes=5), duration=timedelta(hours=1))


def marks(cluster, name):
    """What of ours is on the Node object: labels, taints, cordon."""
    node = cluster.node(name)
    labels = {k: v for k, v in (node["metadata"].get("labels") or {}).items() if k.startswith(PREFIX)}
    taints = [{k: t.get(k) for k in ("key", "value", "effect")}
              for t in (node.get("spec") or {}).get("taints") or [] if t["key"].startswith(PREFIX)]
    return {"labels": labels, "taints": taints, "unschedulable": bool((node.get("spec") or {}).get("unschedulable"))}


def in_pool(reservation):
    return {
        "labels": {f"{PREFIX}/pool": reservation.pool_name, f"{PREFIX}/tenant": reservation.tenant.slug},
        "taints": [{"key": f"{PREFIX}/tenant", "value": reservation.tenant.slug, "effect": "NoSchedule"}],
        "unschedulable": False,
    }


CLEAN = {"labels": {}, "taints": [], "unschedulable": False}


def assert_released(cluster, reservation, nodes, namespace):
    """Completed, every node clean and schedulable, the tenant's namespace gone (or going)."""
    reservation.refresh_from_db()
    assert reservation.status == S.COMPLETED
    assert [marks(cluster, node.name) for node in nodes] == [CLEAN] * len(nodes)
    namespace_left = cluster.read(cluster.api.core.read_namespace, namespace)
    assert namespace_left is None or namespace_left["status"]["phase"] == "Terminating"


def quota(cluster, namespace):
    found = cluster.read(cluster.api.core.read_namespaced_resource_quota, "gpu-quota", namespace)
    return found and found["spec"]["hard"]["requests.nvidia.com/gpu"]


@pytest.mark.django_db
def test_from_confirmed_to_completed_on_the_server(cluster, row, tenant_on):
    # given two nodes on the cluster and a confirmed reservation of both
    nodes, _ = add_nodes(cluster, row, 2)
    reservation = book_an_hour(tenant_on, nodes)
    namespace = f"tenant-{tenant_on.slug}"
    with time_machine.travel(timezone.now(), tick=True) as clock:
        # when the start event is swept
        assert reconcile.run_due_events() == ["done"]
        reservation.refresh_from_db()
        # then both nodes carry the pool's labels and the tenant taint, schedulable
        assert reservation.status == S.ACTIVE and reservation.readiness["passed"] is True
        assert reservation.readiness["plan_only"] is False
        assert [marks(cluster, node.name) for node in nodes] == [in_pool(reservation)] * 2
        # and the tenant's namespace with its quota, network policy and role binding exists
        assert cluster.read(cluster.api.core.read_namespace, namespace) is not None
        assert quota(cluster, namespace) == "16"
        assert cluster.read(cluster.api.networking.read_namespaced_network_policy, "deny-other-namespaces",
                            namespace) is not None
        assert cluster.read(cluster.api.rbac.read_namespaced_role_binding, "tenant", namespace) is not None
        # when the notice falls due, an Event lands in the tenant's namespace
        clock.move_to(reservation.ends_at - timedelta(minutes=29))
        assert reconcile.run_due_events() == ["done"]
        events = cluster.api.list_all("list", cluster.api.core.list_namespaced_event, namespace)
        assert "ReservationEndingSoon" in [event["reason"] for event in events]
        # when the end falls due with a tenant pod on a node
        cluster.add_pod(namespace, "train", nodes[0].name)
        clock.move_to(reservation.ends_at + timedelta(seconds=1))
        # the pod is evicted, but it is still terminating (no kubelet confirms): the release waits,
        # with the nodes cordoned meanwhile
        assert reconcile.run_due_events() == ["retry"]
        reservation.refresh_from_db()
        assert reservation.status == S.RELEASING
        assert all(marks(cluster, node.name)["unschedulable"] for node in nodes)
        # after the grace period the pod is deleted with force and the release finishes
        clock.shift(GRACE_PASSED)
        assert reconcile.run_due_events() == ["done"]
    # then the nodes are clean and schedulable, the namespace is gone, the reservation completed
    assert_released(cluster, reservation, nodes, namespace)


@pytest.mark.django_db
def test_server_errors_are_retried_later(cluster, fake_only, row, tenant_on):
    # given a due reservation and an API server that answers 500 to node patches for a while
    nodes, _ = add_nodes(cluster, row, 1)
    reservation = book(tenant=tenant_on, nodes=nodes, starts_at=timezone.now() + timedelta(minutes=1))
    fake_only.fail("PATCH", "/api/v1/nodes/", 500, times=8)
    with time_machine.travel(timezone.now(), tick=True) as clock:
        # when the sweep runs, the client's own retries run out and the step is retried later
        assert reconcile.run_due_events() == ["retry"]
        reservation.refresh_from_db()
        assert reservation.status == S.PROVISIONING
        outcomes = []
        for _ in range(3):
            clock.shift(timedelta(minutes=1))
            outcomes = reconcile.run_due_events()
            if outcomes == ["done"]:
                break
    # then once the server recovers the pool is active
    assert outcomes == ["done"]
    reservation.refresh_from_db()
    assert reservation.status == S.ACTIVE
    assert marks(cluster, nodes[0].name) == in_pool(reservation)


@pytest.mark.django_db
def test_a_foreign_pod_blocks_readiness_until_it_is_gone(cluster, row, tenant_on):
    # given a node still running someone else's pod
    nodes, _ = add_nodes(cluster, row, 1)
    other = cluster.name("someone-else")
    leftover = cluster.add_pod(other, "leftover", nodes[0].name)
    reservation = book(tenant=tenant_on, nodes=nodes, starts_at=timezone.now() + timedelta(minutes=1))
    with time_machine.travel(timezone.now(), tick=True) as clock:
        # when the pool is provisioned, the isolation check fails and nothing is billed yet
        assert reconcile.run_due_events() == ["retry"]
        reservation.refresh_from_db()
        assert reservation.status == S.PROVISIONING and reservation.ready_at is None
        assert any("runs pods of others" in problem for problem in reservation.readiness["problems"])
        # when the pod is gone, the next attempt passes
        cluster.api.call("delete", cluster.api.core.delete_namespaced_pod, leftover, other, grace_period_seconds=0)
        clock.shift(timedelta(minutes=1))
        assert reconcile.run_due_events() == ["done"]
    reservation.refresh_from_db()
    assert reservation.status == S.ACTIVE and reservation.ready_at is not None


@pytest.mark.django_db
def test_a_vanished_node_is_replaced_on_the_server(cluster, row, tenant_on):
    # given an active pool and a spare node
    nodes, (spare,) = add_nodes(cluster, row, 2, spare=1)
    reservation = book(tenant=tenant_on, nodes=nodes, starts_at=timezone.now() - timedelta(minutes=1))
    assert reconcile.run_due_events() == ["done"]
    # when a pool node disappears from the cluster and the reconcile runs
    cluster.api.call("delete", cluster.api.core.delete_node, nodes[0].name)
    assert reconcile.reconcile_reservation(reservation.pk) == "recovered"
    # then the spare carries the pool's labels and taint, and the downtime is on record
    assert marks(cluster, spare.name) == in_pool(reservation)
    assert reservation.allocations.get(node=nodes[0]).state == Allocation.State.REPLACED
    downtime = Downtime.objects.get(reservation=reservation)
    assert downtime.ended_at is not None and "gone" in downtime.reason
    reservation.refresh_from_db()
    assert reservation.status == S.ACTIVE


@pytest.mark.django_db
def test_hand_edits_on_the_server_are_repaired(cluster, row, tenant_on):
    # given an active pool
    nodes, _ = add_nodes(cluster, row, 2)
    reservation = book(tenant=tenant_on, nodes=nodes, starts_at=timezone.now() - timedelta(minutes=1))
    reconcile.run_due_events()
    namespace = f"tenant-{tenant_on.slug}"
    # when someone removes a label and the taint, and raises the quota, by hand
    cluster.patch_node(nodes[0].name, [{"op": "remove", "path": f"/metadata/labels/{PREFIX.replace('/', '~1')}~1pool"}])
    cluster.patch_node(nodes[1].name, {"spec": {"taints": []}})
    cluster.api.call("patch", cluster.api.core.patch_namespaced_resource_quota, "gpu-quota", namespace,
                     {"spec": {"hard": {"requests.nvidia.com/gpu": "999"}}})
    # then the next reconcile puts everything back
    assert reconcile.reconcile_reservation(reservation.pk) == "repaired"
    assert [marks(cluster, node.name) for node in nodes] == [in_pool(reservation)] * 2
    assert quota(cluster, namespace) == "16"


@pytest.mark.django_db
def test_a_node_whose_pool_label_was_removed_by_hand_is_still_drained_at_the_end(cluster, row, tenant_on):
    # given an active pool with a tenant pod on a node whose pool label someone removed by hand
    nodes, _ = add_nodes(cluster, row, 2)
    reservation = book_an_hour(tenant_on, nodes)
    namespace = f"tenant-{tenant_on.slug}"
    with time_machine.travel(timezone.now(), tick=True) as clock:
        assert reconcile.run_due_events() == ["done"]
        cluster.add_pod(namespace, "train", nodes[0].name)
        cluster.patch_node(nodes[0].name, [{"op": "remove", "path": f"/metadata/labels/{PREFIX.replace('/', '~1')}~1pool"}])
        # when the end falls due
        clock.move_to(reservation.ends_at + timedelta(seconds=1))
        # then the pod is evicted first (the notice is done too): the release waits with the node cordoned
        assert sorted(reconcile.run_due_events()) == ["done", "retry"]
        assert marks(cluster, nodes[0].name)["unschedulable"]
        clock.shift(GRACE_PASSED)
        assert reconcile.run_due_events() == ["done"]
    # and the node goes back clean, with no tenant pod left on it
    assert_released(cluster, reservation, nodes, namespace)
    assert [pod for pod in cluster.pods(namespace) if pod["spec"].get("nodeName") == nodes[0].name] == []


@pytest.mark.django_db
def test_killed_mid_provision_is_finished_on_the_server(cluster, row, tenant_on):
    # given a start event whose worker made the namespace, labelled one node, and died
    nodes, _ = add_nodes(cluster, row, 2)
    reservation = book(tenant=tenant_on, nodes=nodes, starts_at=timezone.now() + timedelta(minutes=1))
    with time_machine.travel(timezone.now(), tick=True) as clock:
        reconcile.claim_due_events(worker="doomed")
        services.reservation_provision_begin(reservation_id=reservation.pk, now=timezone.now())
        driver = driver_for(row)
        driver.ensure_tenant(reconcile.tenant_spec(reservation, gpus=16))
        driver.apply_pool(reconcile.pool_spec(reservation, [nodes[0].name]))
        # when the claim timeout passes and the sweep runs
        clock.shift(GRACE_PASSED)
        assert reconcile.run_due_events() == ["done"]
    # then the pool is complete on the server and active
    reservation.refresh_from_db()
    assert reservation.status == S.ACTIVE
    assert [marks(cluster, node.name) for node in nodes] == [in_pool(reservation)] * 2


@pytest.mark.django_db
def test_killed_mid_release_leaves_nothing_orphaned_on_the_server(cluster, row, tenant_on):
    # given an active pool whose release worker drained, unlabelled one node, and died
    nodes, _ = add_nodes(cluster, row, 2)
    reservation = book(tenant=tenant_on, nodes=nodes, starts_at=timezone.now() - timedelta(minutes=1),
                       duration=timedelta(hours=1))
    reconcile.run_due_events()
    namespace = f"tenant-{tenant_on.slug}"
    with time_machine.travel(reservation.ends_at + timedelta(seconds=1), tick=True) as clock:
        reconcile.claim_due_events(worker="doomed")
        services.reservation_release_begin(reservation_id=reservation.pk, now=timezone.now())
        driver = driver_for(row)
        driver.drain_pool(reconcile.pool_spec(reservation, [n.name for n in nodes]), force=True)
        driver.unlabel_pool(reconcile.pool_spec(reservation, [nodes[0].name]))
        # when the claim timeout passes and the reconcile and the sweep run
        clock.shift(GRACE_PASSED)
        reconcile.reconcile_reservation(reservation.pk)
        assert sorted(reconcile.run_due_events()) == ["done", "done"]
    # then nothing of ours is left on the server
    assert_released(cluster, reservation, nodes, namespace)


@pytest.mark.django_db
def test_every_step_again_sends_no_writes_and_leaves_the_same_objects(cluster, fake_only, row, tenant_on):
    # given a pool provisioned once
    nodes, _ = add_nodes(cluster, row, 2)
    reservation = book(tenant=tenant_on, nodes=nodes, starts_at=timezone.now() - timedelta(minutes=1))
    assert reconcile.run_due_events() == ["done"]
    objects = sorted(fake_only.objects)
    fake_only.reset_log()
    # when provision and reconcile run again, twice
    for _ in range(2):
        reconcile.provision(reservation.pk)
        reconcile.reconcile_reservation(reservation.pk)
    # then nothing was written and the same objects exist
    assert [fake_only.count(verb) for verb in ("POST", "PUT", "PATCH", "DELETE")] == [0, 0, 0, 0]
    assert sorted(fake_only.objects) == objects
