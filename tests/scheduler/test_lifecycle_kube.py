"""The lifecycle against the fake Kubernetes API server, through the production path: the
cluster row's kubeconfig → ``driver_for`` → ``KubernetesDriver`` → the real ``kubernetes`` client
over HTTP. Assertions are on the objects on the server."""

from datetime import timedelta

import pytest
import time_machine
from django.utils import timezone

from marketplace.pools import services
from marketplace.pools.models import Downtime
from marketplace.reservations.models import Allocation, Reservation
from scheduler import reconcile
from tests.scheduler.helpers import (  # noqa: F401 - fixtures
    book, fake_cluster, fake_server, node_marks, server_nodes,
)

S = Reservation.Status
PREFIX = "gpu.marketplace.io"


@pytest.mark.django_db
def test_from_confirmed_to_completed_on_the_server(fake_server, fake_cluster):
    # given two nodes on the cluster and a confirmed reservation of both
    nodes, _ = server_nodes(fake_server, fake_cluster)
    reservation = book(nodes=nodes, starts_at=timezone.now() + timedelta(minutes=5), duration=timedelta(hours=1))
    namespace = f"tenant-{reservation.tenant.slug}"
    with time_machine.travel(timezone.now(), tick=True) as clock:
        # when the start event is swept
        assert reconcile.run_due_events() == ["done"]
        reservation.refresh_from_db()
        # then both nodes carry the pool's labels and the tenant taint, schedulable
        assert reservation.status == S.ACTIVE and reservation.readiness["passed"] is True
        assert reservation.readiness["plan_only"] is False
        for node in nodes:
            assert node_marks(fake_server, node.name) == {
                "labels": {f"{PREFIX}/pool": reservation.pool_name, f"{PREFIX}/tenant": reservation.tenant.slug},
                "taints": [{"key": f"{PREFIX}/tenant", "value": reservation.tenant.slug, "effect": "NoSchedule"}],
                "unschedulable": False,
            }
        # and the tenant's namespace with its quota, network policy and role binding exists
        assert fake_server.get("namespaces", namespace) is not None
        quota = fake_server.get("resourcequotas", "gpu-quota", namespace)
        assert quota["spec"]["hard"]["requests.nvidia.com/gpu"] == "16"
        assert fake_server.get("networkpolicies", "deny-other-namespaces", namespace) is not None
        assert fake_server.get("rolebindings", "tenant", namespace) is not None
        # when the notice falls due, an Event lands in the tenant's namespace
        clock.move_to(reservation.ends_at - timedelta(minutes=29))
        assert reconcile.run_due_events() == ["done"]
        events = fake_server.list("events", namespace)
        assert [e["reason"] for e in events] == ["ReservationEndingSoon"]
        # when the end falls due, with a tenant pod running on a node
        fake_server.add_pod(namespace, "train-0", nodes[0].name)
        clock.move_to(reservation.ends_at + timedelta(seconds=1))
        # the pod is evicted (gracefully: its kubelet has to confirm), so the release waits
        assert reconcile.run_due_events() == ["retry"]
        reservation.refresh_from_db()
        assert reservation.status == S.RELEASING
        assert all(node_marks(fake_server, n.name)["unschedulable"] for n in nodes)  # cordoned meanwhile
        # when the kubelet has stopped the pod, the release finishes
        assert fake_server.finish_terminations() == 1
        clock.shift(timedelta(seconds=20))
        assert reconcile.run_due_events() == ["done"]
    reservation.refresh_from_db()
    # then the nodes are clean and schedulable, the namespace is gone, the reservation completed
    assert reservation.status == S.COMPLETED
    for node in nodes:
        assert node_marks(fake_server, node.name) == {"labels": {}, "taints": [], "unschedulable": False}
    assert fake_server.get("namespaces", namespace) is None
    assert fake_server.list("pods", namespace) == []


@pytest.mark.django_db
def test_server_errors_are_retried_later(fake_server, fake_cluster):
    # given a due reservation and an API server that answers 500 to node patches for a while
    nodes, _ = server_nodes(fake_server, fake_cluster, count=1)
    reservation = book(nodes=nodes, starts_at=timezone.now() + timedelta(minutes=1))
    fake_server.fail("PATCH", "/api/v1/nodes/", 500, times=8)
    with time_machine.travel(timezone.now(), tick=True) as clock:
        # when the sweep runs, the client's own retries run out and the step is retried later
        assert reconcile.run_due_events() == ["retry"]
        reservation.refresh_from_db()
        assert reservation.status == S.PROVISIONING
        clock.shift(timedelta(minutes=1))
        outcomes = reconcile.run_due_events()
        if outcomes == ["retry"]:
            clock.shift(timedelta(minutes=1))
            outcomes = reconcile.run_due_events()
    # then once the server recovers the pool is active
    assert outcomes == ["done"]
    reservation.refresh_from_db()
    assert reservation.status == S.ACTIVE
    assert node_marks(fake_server, nodes[0].name)["labels"][f"{PREFIX}/pool"] == reservation.pool_name


@pytest.mark.django_db
def test_a_foreign_pod_blocks_readiness_until_it_is_gone(fake_server, fake_cluster):
    # given a node still running someone else's pod
    nodes, _ = server_nodes(fake_server, fake_cluster, count=1)
    fake_server.add_pod("someone-else", "leftover", nodes[0].name)
    reservation = book(nodes=nodes, starts_at=timezone.now() + timedelta(minutes=1))
    with time_machine.travel(timezone.now(), tick=True) as clock:
        # when the pool is provisioned, the isolation check fails and nothing is billed yet
        assert reconcile.run_due_events() == ["retry"]
        reservation.refresh_from_db()
        assert reservation.status == S.PROVISIONING and reservation.ready_at is None
        assert any("runs pods of others" in p for p in reservation.readiness["problems"])
        # when the pod is gone, the next attempt passes
        fake_server.objects.pop(("pods", "someone-else", "leftover"))
        clock.shift(timedelta(minutes=1))
        assert reconcile.run_due_events() == ["done"]
    reservation.refresh_from_db()
    assert reservation.status == S.ACTIVE and reservation.ready_at is not None


@pytest.mark.django_db
def test_a_vanished_node_is_replaced_on_the_server(fake_server, fake_cluster):
    # given an active pool and a spare node
    nodes, (spare,) = server_nodes(fake_server, fake_cluster, spare=1)
    reservation = book(nodes=nodes, starts_at=timezone.now() - timedelta(minutes=1))
    assert reconcile.run_due_events() == ["done"]
    # when a pool node disappears from the cluster and the reconcile runs
    fake_server.delete_node(nodes[0].name)
    assert reconcile.reconcile_reservation(reservation.pk) == "recovered"
    # then the spare carries the pool's labels and taint, and the downtime is on record
    assert node_marks(fake_server, spare.name)["labels"][f"{PREFIX}/pool"] == reservation.pool_name
    assert reservation.allocations.get(node=nodes[0]).state == Allocation.State.REPLACED
    downtime = Downtime.objects.get(reservation=reservation)
    assert downtime.ended_at is not None and "gone" in downtime.reason
    reservation.refresh_from_db()
    assert reservation.status == S.ACTIVE


@pytest.mark.django_db
def test_hand_edits_on_the_server_are_repaired(fake_server, fake_cluster):
    # given an active pool
    nodes, _ = server_nodes(fake_server, fake_cluster)
    reservation = book(nodes=nodes, starts_at=timezone.now() - timedelta(minutes=1))
    reconcile.run_due_events()
    namespace = f"tenant-{reservation.tenant.slug}"
    # when someone removes a label and the taint, and raises the quota, by hand
    node = fake_server.get("nodes", nodes[0].name)
    node["metadata"]["labels"].pop(f"{PREFIX}/pool")
    node["spec"]["taints"] = []
    fake_server.put_object("nodes", node)
    quota = fake_server.get("resourcequotas", "gpu-quota", namespace)
    quota["spec"]["hard"]["requests.nvidia.com/gpu"] = "999"
    fake_server.put_object("resourcequotas", quota)
    # then the next reconcile puts everything back
    assert reconcile.reconcile_reservation(reservation.pk) == "repaired"
    assert node_marks(fake_server, nodes[0].name)["labels"][f"{PREFIX}/pool"] == reservation.pool_name
    assert len(node_marks(fake_server, nodes[0].name)["taints"]) == 1
    assert fake_server.get("resourcequotas", "gpu-quota", namespace)["spec"]["hard"]["requests.nvidia.com/gpu"] == "16"


@pytest.mark.django_db
def test_killed_mid_release_leaves_nothing_orphaned_on_the_server(fake_server, fake_cluster):
    # given an active pool whose release worker drained, unlabelled one node, and died
    nodes, _ = server_nodes(fake_server, fake_cluster)
    reservation = book(nodes=nodes, starts_at=timezone.now() - timedelta(minutes=1), duration=timedelta(hours=1))
    reconcile.run_due_events()
    namespace = f"tenant-{reservation.tenant.slug}"
    with time_machine.travel(reservation.ends_at + timedelta(seconds=1), tick=True) as clock:
        reconcile.claim_due_events(worker="doomed")
        services.reservation_release_begin(reservation_id=reservation.pk, now=timezone.now())
        from scheduler.drivers import driver_for

        driver = driver_for(fake_cluster)
        driver.drain_pool(reconcile.pool_spec(reservation, [n.name for n in nodes]), force=True)
        driver.unlabel_pool(reconcile.pool_spec(reservation, [nodes[0].name]))
        # when the claim timeout passes and the reconcile and the sweep run
        clock.shift(timedelta(minutes=6))
        reconcile.reconcile_reservation(reservation.pk)
        assert sorted(reconcile.run_due_events()) == ["done", "done"]
    # then nothing of ours is left on the server
    reservation.refresh_from_db()
    assert reservation.status == S.COMPLETED
    for node in nodes:
        assert node_marks(fake_server, node.name) == {"labels": {}, "taints": [], "unschedulable": False}
    assert fake_server.get("namespaces", namespace) is None


@pytest.mark.django_db
def test_killed_mid_provision_is_finished_on_the_server(fake_server, fake_cluster):
    # given a start event whose worker made the namespace, labelled one node, and died
    nodes, _ = server_nodes(fake_server, fake_cluster)
    reservation = book(nodes=nodes, starts_at=timezone.now() + timedelta(minutes=1))
    from scheduler.drivers import driver_for

    with time_machine.travel(timezone.now(), tick=True) as clock:
        reconcile.claim_due_events(worker="doomed")
        services.reservation_provision_begin(reservation_id=reservation.pk, now=timezone.now())
        driver = driver_for(fake_cluster)
        driver.ensure_tenant(reconcile.tenant_spec(reservation, gpus=16))
        driver.apply_pool(reconcile.pool_spec(reservation, [nodes[0].name]))
        # when the claim timeout passes and the sweep runs
        clock.shift(timedelta(minutes=6))
        assert reconcile.run_due_events() == ["done"]
    # then the pool is complete on the server and active
    reservation.refresh_from_db()
    assert reservation.status == S.ACTIVE
    for node in nodes:
        assert node_marks(fake_server, node.name)["labels"][f"{PREFIX}/pool"] == reservation.pool_name
