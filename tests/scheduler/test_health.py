"""Health and healing: a sick node degrades the reservation, opens a downtime, and is swapped for a
free node of the same model; drift is repaired by re-applying the desired state."""

from datetime import timedelta

import pytest
import time_machine
from django.utils import timezone

from marketplace.core.models import AuditLog
from marketplace.core.services import Actor
from marketplace.inventory import services as inventory
from marketplace.inventory.models import Node
from marketplace.pools.models import Downtime
from marketplace.reservations.models import Allocation, Reservation
from marketplace.reservations.selectors import free_nodes
from scheduler import reconcile
from scheduler.driver import namespace_for
from tests.factories import NodeFactory
from tests.scheduler.helpers import book, kube_cluster, memory, plan_cluster, pool_nodes  # noqa: F401 - fixtures
from tests.scheduler.memory_cluster import Pod

S = Reservation.Status


def active_pool(memory, cluster, *, count=2, spare=0, same_domain=False, domain="ib-0"):
    nodes, spares = pool_nodes(memory, cluster, count=count, spare=spare, domain=domain)
    reservation = book(nodes=nodes, starts_at=timezone.now() - timedelta(minutes=1), same_domain=same_domain)
    assert reconcile.run_due_events(drivers=memory.drivers) == ["done"]
    reservation.refresh_from_db()
    assert reservation.status == S.ACTIVE
    return reservation, nodes, spares


def transitions(reservation):
    return list(AuditLog.objects.filter(object_id=str(reservation.pk), action__in=[
        "reservation.degraded", "reservation.active"]).order_by("at", "id").values_list("action", flat=True))


@pytest.mark.django_db
def test_a_notready_node_is_swapped_for_a_free_one(memory, kube_cluster):
    # given an active pool of two nodes and a free spare of the same model
    reservation, nodes, (spare,) = active_pool(memory, kube_cluster, spare=1)
    # when a pool node goes NotReady and the reconcile runs
    memory.nodes[nodes[0].name].ready = False
    assert reconcile.reconcile_reservation(reservation.pk, drivers=memory.drivers) == "recovered"
    reservation.refresh_from_db()
    # then the node is unhealthy, the reservation was degraded and is active again with the spare
    assert Node.objects.get(pk=nodes[0].pk).health == Node.Health.UNHEALTHY
    assert transitions(reservation) == ["reservation.active", "reservation.degraded", "reservation.active"]
    assert reservation.status == S.ACTIVE
    old = reservation.allocations.get(node=nodes[0])
    new = reservation.allocations.get(node=spare)
    assert old.state == Allocation.State.REPLACED and old.ends_at <= timezone.now()
    assert new.state == Allocation.State.ACTIVE and new.ends_at == reservation.ends_at
    # and the spare carries the pool's labels and taint; the sick node no longer does
    assert memory.pool_members() == {nodes[1].name: reservation.pool_name, spare.name: reservation.pool_name}
    # and the downtime (not billed) is recorded and closed
    downtime = Downtime.objects.get(reservation=reservation)
    assert downtime.node_id == nodes[0].pk and downtime.ended_at is not None and "NotReady" in downtime.reason


@pytest.mark.django_db
def test_a_node_swapped_out_sick_is_healthy_and_bookable_again_once_ready(memory, kube_cluster):
    # given a pool node that went NotReady and was swapped out of its pool for a spare
    reservation, nodes, (spare,) = active_pool(memory, kube_cluster, spare=1)
    memory.nodes[nodes[0].name].ready = False
    assert reconcile.reconcile_reservation(reservation.pk, drivers=memory.drivers) == "recovered"
    # when it is still NotReady, the recheck leaves it unhealthy
    assert reconcile.recheck_unhealthy_nodes(drivers=memory.drivers) == 0
    assert Node.objects.get(pk=nodes[0].pk).health == Node.Health.UNHEALTHY
    # when it is Ready again (a kubelet restart, say), the recheck marks it healthy
    memory.nodes[nodes[0].name].ready = True
    assert reconcile.recheck_unhealthy_nodes(drivers=memory.drivers) == 1
    # then it is offered to bookings again, and the change is audited
    node = Node.objects.get(pk=nodes[0].pk)
    assert node.health == Node.Health.HEALTHY
    later = reservation.ends_at + timedelta(hours=1)
    assert node in free_nodes(gpu_model=node.gpu_model, start=later, end=later + timedelta(hours=1))
    assert AuditLog.objects.filter(action="node.health", after__health="healthy").exists()


@pytest.mark.django_db
def test_a_pool_node_ops_retire_with_force_is_swapped_out(memory, kube_cluster):
    # given an active pool and a free spare
    reservation, nodes, (spare,) = active_pool(memory, kube_cluster, spare=1)
    # when ops retire a pool node with force, and the reconcile runs
    inventory.node_bulk_set_status(actor=Actor.task("ops"), node_ids=[nodes[0].pk], status=Node.Status.RETIRED,
                                   force=True)
    assert reconcile.reconcile_reservation(reservation.pk, drivers=memory.drivers) == "recovered"
    # then the spare took its place in the pool, with a downtime for the swap, and its health is untouched
    assert memory.pool_members() == {nodes[1].name: reservation.pool_name, spare.name: reservation.pool_name}
    assert reservation.allocations.get(node=nodes[0]).state == Allocation.State.REPLACED
    assert "retired" in Downtime.objects.get(reservation=reservation, node=nodes[0]).reason
    assert Node.objects.get(pk=nodes[0].pk).health == Node.Health.HEALTHY


@pytest.mark.django_db
def test_a_node_swapped_out_notready_loses_the_tenants_pods_before_its_taint(memory, kube_cluster):
    # given an active pool with a tenant pod on a node, and a free spare
    reservation, nodes, (spare,) = active_pool(memory, kube_cluster, spare=1)
    namespace = namespace_for(reservation.tenant.slug)
    memory.pods.append(Pod(namespace=namespace, name="train-0", node=nodes[0].name))
    # when that node goes NotReady and the reconcile swaps it out
    memory.nodes[nodes[0].name].ready = False
    assert reconcile.reconcile_reservation(reservation.pk, drivers=memory.drivers) == "recovered"
    # then the tenant's pod is gone from it (deleted: a NotReady kubelet cannot confirm an eviction)
    # and only then did it lose the pool's label and taint
    assert memory.pods == []
    assert memory.labels(nodes[0].name) == {} and memory.taint_keys(nodes[0].name) == []
    assert memory.pool_members() == {nodes[1].name: reservation.pool_name, spare.name: reservation.pool_name}


@pytest.mark.django_db
def test_a_node_swapped_out_is_blocked_for_the_cleaning_gap_while_it_is_drained(memory, kube_cluster):
    # given a pool node swapped out for a spare, which is Ready and healthy again at once
    reservation, nodes, (spare,) = active_pool(memory, kube_cluster, spare=1)
    memory.nodes[nodes[0].name].ready = False
    assert reconcile.reconcile_reservation(reservation.pk, drivers=memory.drivers) == "recovered"
    memory.nodes[nodes[0].name].ready = True
    assert reconcile.recheck_unhealthy_nodes(drivers=memory.drivers) == 1
    # then no booking (and no other pool's swap) can take it until the cleaning gap has passed
    node, now = Node.objects.get(pk=nodes[0].pk), timezone.now()
    assert node not in free_nodes(gpu_model=node.gpu_model, start=now, end=now + timedelta(hours=1))
    later = now + timedelta(minutes=30)
    assert node in free_nodes(gpu_model=node.gpu_model, start=later, end=later + timedelta(hours=1))
    assert reservation.allocations.get(node=nodes[0]).ends_at <= now


@pytest.mark.django_db
def test_a_node_swapped_out_keeps_the_pools_taint_until_the_tenants_pods_are_off_it(memory, kube_cluster):
    # given an active pool with a pod that ignores eviction on a node, and a free spare
    reservation, nodes, (spare,) = active_pool(memory, kube_cluster, spare=1)
    namespace = namespace_for(reservation.tenant.slug)
    memory.pods.append(Pod(namespace=namespace, name="train-0", node=nodes[0].name, stubborn=True))
    # when ops retire that (Ready) node with force and the reconcile swaps it out
    inventory.node_bulk_set_status(actor=Actor.task("ops"), node_ids=[nodes[0].pk], status=Node.Status.RETIRED,
                                   force=True)
    assert reconcile.reconcile_reservation(reservation.pk, drivers=memory.drivers) == "recovered"
    # then the pod was asked to leave, and while it runs the node keeps the pool's label and taint
    assert [pod.name for pod in memory.pods] == ["train-0"]
    assert memory.labels(nodes[0].name).get("gpu.marketplace.io/pool") == reservation.pool_name
    assert memory.taint_keys(nodes[0].name) == ["gpu.marketplace.io/tenant"]
    assert "still on node(s) swapped out" in reservation.scheduler_attempts.latest("at").message
    # when the drain grace period has passed, the next reconcile deletes the pod and unlabels the node
    with time_machine.travel(timezone.now() + timedelta(minutes=6), tick=False):
        reconcile.reconcile_reservation(reservation.pk, drivers=memory.drivers)
    assert memory.pods == []
    assert memory.labels(nodes[0].name) == {} and memory.taint_keys(nodes[0].name) == []


@pytest.mark.django_db
def test_the_release_drains_a_swapped_out_node_a_reconcile_had_not_drained(memory, kube_cluster):
    # given a pool whose swapped-out node still runs a stubborn tenant pod, and another pool of the
    # same tenant that runs on (so the tenant's namespace, and its pods, stay)
    reservation, nodes, (spare,) = active_pool(memory, kube_cluster, spare=1)
    other_nodes, _ = pool_nodes(memory, kube_cluster, count=1, domain="ib-1")
    other = book(tenant=reservation.tenant, nodes=other_nodes, starts_at=timezone.now() - timedelta(minutes=1),
                 duration=timedelta(days=2))
    assert reconcile.run_due_events(drivers=memory.drivers) == ["done"]
    memory.pods.append(Pod(namespace=namespace_for(reservation.tenant.slug), name="train-0", node=nodes[0].name,
                           stubborn=True))
    inventory.node_bulk_set_status(actor=Actor.task("ops"), node_ids=[nodes[0].pk], status=Node.Status.RETIRED,
                                   force=True)
    reconcile.reconcile_reservation(reservation.pk, drivers=memory.drivers)
    # when the window ends and the release runs past its grace period
    with time_machine.travel(reservation.ends_at, tick=False) as clock:
        reconcile.run_due_events(drivers=memory.drivers)
        clock.shift(timedelta(minutes=6))
        reconcile.run_due_events(drivers=memory.drivers)
    # then the reservation completed with no pod, label or taint of its pool left on any node
    reservation.refresh_from_db()
    assert reservation.status == S.COMPLETED
    assert memory.pods == [] and memory.pool_members() == {other_nodes[0].name: other.pool_name}
    assert all(memory.taint_keys(node.name) == [] for node in [*nodes, spare])


@pytest.mark.django_db
def test_a_pool_node_with_maintenance_planned_now_with_force_is_swapped_out(memory, kube_cluster):
    # given an active pool and a free spare
    reservation, nodes, (spare,) = active_pool(memory, kube_cluster, spare=1)
    # when ops plan maintenance of a pool node from now, with force, and the reconcile runs
    inventory.maintenance_window_create(actor=Actor.task("ops"), node=nodes[0], starts_at=timezone.now(),
                                        ends_at=timezone.now() + timedelta(hours=2), force=True)
    assert reconcile.reconcile_reservation(reservation.pk, drivers=memory.drivers) == "recovered"
    # then the spare took its place, with a downtime that says why
    assert memory.pool_members() == {nodes[1].name: reservation.pool_name, spare.name: reservation.pool_name}
    assert "planned maintenance" in Downtime.objects.get(reservation=reservation, node=nodes[0]).reason


@pytest.mark.django_db
def test_a_pool_node_is_swapped_out_before_maintenance_that_begins_before_the_next_reconcile(memory, kube_cluster):
    # given an active pool and a free spare, and maintenance planned with force on a pool node
    reservation, nodes, (spare,) = active_pool(memory, kube_cluster, spare=1)
    begins = timezone.now() + timedelta(minutes=10)
    inventory.maintenance_window_create(actor=Actor.task("ops"), node=nodes[0], starts_at=begins,
                                        ends_at=begins + timedelta(hours=1), force=True)
    # when a reconcile runs well before it, nothing changes
    assert reconcile.reconcile_reservation(reservation.pk, drivers=memory.drivers) == "in sync"
    # when the last reconcile before it runs (the next would come after it has begun), the node is
    # swapped out now, so it is empty when the maintenance begins
    with time_machine.travel(begins - timedelta(minutes=2), tick=False):
        assert reconcile.reconcile_reservation(reservation.pk, drivers=memory.drivers) == "recovered"
    assert memory.pool_members() == {nodes[1].name: reservation.pool_name, spare.name: reservation.pool_name}


@pytest.mark.django_db
def test_maintenance_that_begins_when_the_booking_ends_takes_nothing_from_it(memory, kube_cluster):
    # given an active pool and a free spare, and maintenance planned (no force needed) on a pool node
    # from the booking's end
    reservation, nodes, (spare,) = active_pool(memory, kube_cluster, spare=1)
    _, holds = inventory.maintenance_window_create(actor=Actor.task("ops"), node=nodes[0],
                                                   starts_at=reservation.ends_at,
                                                   ends_at=reservation.ends_at + timedelta(hours=2))
    assert holds == []
    # when the last reconcile before the end runs, nothing changes: the node is not needed after it
    with time_machine.travel(reservation.ends_at - timedelta(minutes=2), tick=False):
        assert reconcile.reconcile_reservation(reservation.pk, drivers=memory.drivers) == "in sync"
    assert not Downtime.objects.exists()
    assert memory.pool_members() == {nodes[0].name: reservation.pool_name, nodes[1].name: reservation.pool_name}


@pytest.mark.django_db
def test_a_booked_node_with_maintenance_later_in_the_window_and_no_free_node_serves_until_then(memory,
                                                                                               kube_cluster):
    # given a booking of two nodes with no free node, and maintenance planned with force on one of
    # them from an hour into the window for an hour
    nodes, _ = pool_nodes(memory, kube_cluster, count=2)
    reservation = book(nodes=nodes, starts_at=timezone.now() + timedelta(minutes=5))
    maintenance_start = reservation.starts_at + timedelta(hours=1)
    inventory.maintenance_window_create(actor=Actor.task("ops"), node=nodes[0], starts_at=maintenance_start,
                                        ends_at=maintenance_start + timedelta(hours=1), force=True)
    # when the start falls due, then the pool is built on both nodes: the first serves until then
    with time_machine.travel(reservation.starts_at - timedelta(minutes=5), tick=False) as clock:
        assert reconcile.run_due_events(drivers=memory.drivers) == ["done"]
        reservation.refresh_from_db()
        assert reservation.status == S.ACTIVE and not Downtime.objects.exists()
        assert set(memory.pool_members()) == {nodes[0].name, nodes[1].name}
        assert set(reservation.readiness["nodes"]) == {nodes[0].name, nodes[1].name}  # both were checked
        # and a reconcile before the maintenance changes nothing
        assert reconcile.reconcile_reservation(reservation.pk, drivers=memory.drivers) == "in sync"
        # when the maintenance begins, the reconcile degrades the pool with a downtime for that node
        clock.move_to(maintenance_start + timedelta(minutes=1))
        assert reconcile.reconcile_reservation(reservation.pk, drivers=memory.drivers) == "degraded"
        assert Downtime.objects.get(reservation=reservation, node=nodes[0]).ended_at is None
        # and once it is over, the pool is whole and active again
        clock.move_to(maintenance_start + timedelta(hours=1, minutes=1))
        assert reconcile.reconcile_reservation(reservation.pk, drivers=memory.drivers) == "recovered"
    reservation.refresh_from_db()
    assert reservation.status == S.ACTIVE


@pytest.mark.django_db
def test_a_booked_node_out_of_service_with_no_free_node_is_left_out_and_the_pool_starts_degraded(memory,
                                                                                                kube_cluster):
    # given a booking of two nodes that has not started, and no free node
    nodes, _ = pool_nodes(memory, kube_cluster, count=2)
    reservation = book(nodes=nodes, starts_at=timezone.now() + timedelta(minutes=5))
    # when ops retire one of them with force, and the start falls due
    inventory.node_bulk_set_status(actor=Actor.task("ops"), node_ids=[nodes[0].pk], status=Node.Status.RETIRED,
                                   force=True)
    with time_machine.travel(reservation.starts_at - timedelta(minutes=5), tick=False):
        assert reconcile.run_due_events(drivers=memory.drivers) == ["done"]
    # then the pool runs on the other node only, degraded, with the retired node's downtime open (not billed)
    reservation.refresh_from_db()
    assert reservation.status == S.DEGRADED and "retired" in reservation.status_reason
    assert memory.pool_members() == {nodes[1].name: reservation.pool_name}
    downtime = Downtime.objects.get(reservation=reservation, node=nodes[0])
    assert downtime.ended_at is None


@pytest.mark.django_db
def test_a_booking_whose_every_node_is_out_of_service_with_no_free_node_fails(memory, kube_cluster):
    # given a booking of two nodes, both retired with force before the start, and no free node
    nodes, _ = pool_nodes(memory, kube_cluster, count=2)
    reservation = book(nodes=nodes, starts_at=timezone.now() + timedelta(minutes=5))
    inventory.node_bulk_set_status(actor=Actor.task("ops"), node_ids=[n.pk for n in nodes], status=Node.Status.RETIRED,
                                   force=True)
    # when the start falls due, then it fails (nothing delivered, nothing billed) and nothing is labelled
    with time_machine.travel(reservation.starts_at - timedelta(minutes=5), tick=False):
        reconcile.run_due_events(drivers=memory.drivers)
    reservation.refresh_from_db()
    assert reservation.status == S.FAILED and "None of the booked nodes can be used" in reservation.status_reason
    assert memory.pool_members() == {}


def retire(node, reservation):
    inventory.node_bulk_set_status(actor=Actor.task("ops"), node_ids=[node.pk], status=Node.Status.RETIRED, force=True)


def plan_maintenance_in_the_window(node, reservation):
    inventory.maintenance_window_create(actor=Actor.task("ops"), node=node,
                                        starts_at=reservation.starts_at + timedelta(hours=1),
                                        ends_at=reservation.starts_at + timedelta(hours=2), force=True)


@pytest.mark.django_db
@pytest.mark.parametrize("take_out", [retire, plan_maintenance_in_the_window], ids=["retired", "maintenance"])
def test_a_booked_node_ops_take_out_before_the_start_is_replaced_when_the_pool_is_built(memory, kube_cluster,
                                                                                        take_out):
    # given a booking that has not started, and a free spare
    nodes, (spare,) = pool_nodes(memory, kube_cluster, count=2, spare=1)
    reservation = book(nodes=nodes, starts_at=timezone.now() + timedelta(minutes=5))
    # when ops retire one of its nodes, or plan its maintenance inside the window, with force, and
    # the start falls due
    take_out(nodes[0], reservation)
    with time_machine.travel(reservation.starts_at - timedelta(minutes=5), tick=False):
        assert reconcile.run_due_events(drivers=memory.drivers) == ["done"]
    # then the pool is built on the other node and the spare, and the first node's period is freed
    reservation.refresh_from_db()
    assert reservation.status == S.ACTIVE
    assert memory.pool_members() == {nodes[1].name: reservation.pool_name, spare.name: reservation.pool_name}
    assert reservation.allocations.get(node=nodes[0]).state == Allocation.State.CANCELLED


@pytest.mark.django_db
def test_without_a_free_node_the_downtime_stays_open_until_the_node_recovers(memory, kube_cluster):
    # given an active pool and no free node anywhere
    reservation, nodes, _ = active_pool(memory, kube_cluster)
    with time_machine.travel(timezone.now(), tick=True) as clock:
        # when a node loses GPUs
        memory.nodes[nodes[1].name].gpus = 6
        assert reconcile.reconcile_reservation(reservation.pk, drivers=memory.drivers) == "degraded"
        # then the reservation stays degraded with an open downtime, even after another reconcile
        clock.shift(timedelta(minutes=3))
        assert reconcile.reconcile_reservation(reservation.pk, drivers=memory.drivers) == "degraded"
        reservation.refresh_from_db()
        assert reservation.status == S.DEGRADED
        downtime = Downtime.objects.get(reservation=reservation)
        assert downtime.ended_at is None and "6 of 8 GPUs" in downtime.reason
        # when the node is healthy again
        memory.nodes[nodes[1].name].gpus = 8
        clock.shift(timedelta(minutes=3))
        assert reconcile.reconcile_reservation(reservation.pk, drivers=memory.drivers) == "recovered"
    reservation.refresh_from_db()
    downtime.refresh_from_db()
    # then the downtime is closed after about six minutes and the reservation is active again
    assert reservation.status == S.ACTIVE
    assert timedelta(minutes=5) < downtime.ended_at - downtime.started_at < timedelta(minutes=7)
    assert reservation.allocations.filter(state=Allocation.State.ACTIVE).count() == 2


@pytest.mark.django_db
def test_a_same_domain_pool_only_takes_a_spare_from_its_domain(memory, kube_cluster):
    # given a same-domain pool in ib-0 and a free spare only in ib-1
    reservation, nodes, _ = active_pool(memory, kube_cluster, same_domain=True)
    elsewhere = NodeFactory(cluster=kube_cluster, topology_domain="ib-1")
    memory.add_node(elsewhere.name)
    # when a node disappears from the cluster
    del memory.nodes[nodes[0].name]
    assert reconcile.reconcile_reservation(reservation.pk, drivers=memory.drivers) == "degraded"
    # then no swap happened: the spare is in the wrong domain
    assert not Allocation.objects.filter(node=elsewhere).exists()
    assert Downtime.objects.get(reservation=reservation).reason.endswith("gone from the cluster")
    # when a spare appears in the pool's domain, the next reconcile swaps it in
    spare = NodeFactory(cluster=kube_cluster, topology_domain="ib-0")
    memory.add_node(spare.name)
    assert reconcile.reconcile_reservation(reservation.pk, drivers=memory.drivers) == "recovered"
    assert reservation.allocations.get(node=spare).state == Allocation.State.ACTIVE


@pytest.mark.django_db
def test_a_spare_booked_by_someone_else_is_not_taken(memory, kube_cluster):
    # given an active pool and a spare that another reservation holds right now
    reservation, nodes, (spare,) = active_pool(memory, kube_cluster, spare=1)
    book(nodes=[spare], starts_at=timezone.now() - timedelta(minutes=5), status=S.ACTIVE, events=False)
    # when a pool node fails
    memory.nodes[nodes[0].name].ready = False
    reconcile.reconcile_reservation(reservation.pk, drivers=memory.drivers)
    # then the spare was not double booked
    assert Allocation.objects.filter(node=spare, state=Allocation.State.ACTIVE).count() == 1
    reservation.refresh_from_db()
    assert reservation.status == S.DEGRADED


@pytest.mark.django_db
def test_drift_is_repaired_by_the_next_reconcile(memory, kube_cluster):
    # given an active pool
    reservation, nodes, _ = active_pool(memory, kube_cluster)
    namespace = f"tenant-{reservation.tenant.slug}"
    # when someone removes a label and a taint by hand, and edits the quota
    memory.nodes[nodes[0].name].labels.pop("gpu.marketplace.io/pool")
    memory.nodes[nodes[1].name].taints = []
    memory.namespaces[namespace]["gpus"] = 999
    # then the reconcile puts them back
    assert reconcile.reconcile_reservation(reservation.pk, drivers=memory.drivers) == "repaired"
    assert memory.pool_members() == {node.name: reservation.pool_name for node in nodes}
    assert memory.taint_keys(nodes[1].name) == ["gpu.marketplace.io/tenant"]
    assert memory.namespaces[namespace]["gpus"] == 16
    # and a reconcile of a pool in sync patches no node
    patches = memory.calls["apply_pool"]
    assert reconcile.reconcile_reservation(reservation.pk, drivers=memory.drivers) == "in sync"
    assert memory.calls["apply_pool"] == patches


@pytest.mark.django_db
def test_plan_only_nodes_follow_the_inventory_health(plan_cluster):
    # given an active plan-only pool and a free spare
    nodes = [NodeFactory(cluster=plan_cluster) for _ in range(3)]
    reservation = book(nodes=nodes[:2], starts_at=timezone.now() - timedelta(minutes=1))
    reconcile.run_due_events()
    # when ops mark a pool node unhealthy in the inventory
    Node.objects.filter(pk=nodes[0].pk).update(health=Node.Health.UNHEALTHY)
    # then the reconcile swaps in the spare
    assert reconcile.reconcile_reservation(reservation.pk) == "recovered"
    assert reservation.allocations.get(node=nodes[2]).state == Allocation.State.ACTIVE
