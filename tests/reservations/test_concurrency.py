"""Real concurrent connections racing for the same nodes: the database keeps them apart."""

import threading
from datetime import timedelta

import factory
import pytest
from django.db import IntegrityError, connection, connections, transaction

from marketplace.core.exceptions import ServiceError
from marketplace.core.services import Actor
from marketplace.inventory.models import MaintenanceWindow, Node
from marketplace.reservations import services
from marketplace.reservations.policies import QuotaExceeded
from marketplace.reservations.models import Allocation, Reservation
from tests.factories import (ClusterFactory, GpuModelFactory, GpuPriceFactory, MembershipFactory, NodeFactory,
                             RegionFactory, TenantFactory)
from tests.reservations.conftest import at

pytestmark = [pytest.mark.postgres_only, pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("frozen")]


def race(count, attempt):
    """Run attempt(i) in ``count`` threads, each with its own connection, released together."""
    barrier = threading.Barrier(count)
    outcomes = [None] * count

    def body(index):
        try:
            barrier.wait()
            outcomes[index] = attempt(index)
        except Exception as exc:  # noqa: BLE001 - the test inspects what each client got
            outcomes[index] = exc
        finally:
            connections.close_all()

    threads = [threading.Thread(target=body, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return outcomes


def overlapping_pairs() -> int:
    with connection.cursor() as cursor:
        cursor.execute("""SELECT count(*) FROM reservations_allocation a JOIN reservations_allocation b
                          ON a.node_id = b.node_id AND a.id < b.id
                          AND tstzrange(a.starts_at, a.blocked_until) && tstzrange(b.starts_at, b.blocked_until)
                          WHERE a.state <> 'cancelled' AND b.state <> 'cancelled'""")
        return cursor.fetchone()[0]


def assert_booked_and_refused(outcomes, *, booked: int, refused: int) -> None:
    """``booked`` of the racers booked, and the other ``refused`` got a clear 409 for want of capacity."""
    bookings = [o for o in outcomes if isinstance(o, services.BookingResult)]
    refusals = [o for o in outcomes if isinstance(o, ServiceError)]
    assert len(bookings) == booked and len(refusals) == refused, outcomes
    assert all(o.code == "insufficient_capacity" and o.http_status == 409 for o in refusals)


def test_racing_bookings_never_overlap_and_are_all_or_nothing(fleet):
    # given 6 nodes and 8 tenants each wanting 2 nodes for overlapping windows at the same moment
    tenants = [TenantFactory() for _ in range(8)]
    users = [MembershipFactory(tenant=t).user for t in tenants]

    def attempt(i):
        start = at(2) + timedelta(minutes=15 * (i % 3))
        return services.reservation_create(actor=Actor.for_user(users[i]), tenant=tenants[i],
                                           gpu_model="H100-SXM-80GB", gpus=16, start=start, end=start + timedelta(hours=4))

    outcomes = race(8, attempt)
    # then exactly three bookings of 2 nodes succeed, the rest are clear 409s
    assert_booked_and_refused(outcomes, booked=3, refused=5)
    # and no node is held twice, and every reservation holds exactly its 2 nodes
    assert overlapping_pairs() == 0
    for reservation in Reservation.objects.all():
        assert reservation.allocations.exclude(state="cancelled").count() == 2
    assert Reservation.objects.count() == 3


def test_racing_bookings_past_the_walk_s_reach_never_overlap_either(fleet):
    # given more domains in maintenance for the window than a walk tries, and 4 free nodes in the
    # last domain by name, which only the free-node count reaches
    for index in range(services.WALK_MAX_DOMAINS):
        NodeFactory(name=f"m{index}", cluster=fleet.cluster, gpu_model=fleet.model, topology_domain=f"ib-m{index}")
    busy = list(Node.objects.all())
    free = [NodeFactory(name=f"z{index}", cluster=fleet.cluster, gpu_model=fleet.model, topology_domain="ib-z")
            for index in range(4)]
    MaintenanceWindow.objects.bulk_create(MaintenanceWindow(node=node, starts_at=at(0), ends_at=at(12))
                                          for node in busy)
    tenants = [TenantFactory() for _ in range(5)]
    users = [MembershipFactory(tenant=t).user for t in tenants]

    # when 5 tenants ask for 2 nodes of one domain for the same window at the same moment
    def attempt(i):
        return services.reservation_create(actor=Actor.for_user(users[i]), tenant=tenants[i],
                                           gpu_model="H100-SXM-80GB", gpus=16, start=at(2), end=at(6),
                                           same_domain=True)

    outcomes = race(5, attempt)
    # then two get 2 nodes of ib-z each, the other three a clear 409, and no node is held twice
    assert_booked_and_refused(outcomes, booked=2, refused=3)
    assert overlapping_pairs() == 0
    held = sorted(Allocation.objects.exclude(state="cancelled").values_list("node_id", flat=True))
    assert held == sorted(node.pk for node in free)


def test_the_exclusion_constraint_refuses_overlap_even_without_the_service(fleet, tenant, member):
    reservation = services.reservation_create(actor=Actor.for_user(member), tenant=tenant, gpu_model="H100-SXM-80GB",
                                              gpus=8, start=at(2), end=at(4)).reservation
    node = reservation.allocations.get().node
    with pytest.raises(IntegrityError), transaction.atomic():
        Allocation.objects.create(reservation=reservation, node=node, starts_at=at(4.25), ends_at=at(6),
                                  blocked_until=at(6.5))


def test_racing_identical_requests_with_one_key_book_once(fleet, tenant, member):
    def attempt(i):
        return services.reservation_create(actor=Actor.for_user(member), tenant=tenant, gpu_model="H100-SXM-80GB",
                                           gpus=16, start=at(2), end=at(6), idempotency_key="same-key")

    outcomes = race(6, attempt)
    assert all(isinstance(o, services.BookingResult) for o in outcomes), outcomes
    assert len({o.reservation.pk for o in outcomes}) == 1
    assert sum(o.created for o in outcomes) == 1
    assert Reservation.objects.count() == 1 and Allocation.objects.count() == 2


def test_racing_bookings_of_one_tenant_never_exceed_its_quota(fleet, tenant, member):
    # given a tenant with a quota of two nodes, and six of its requests for one node each, in
    # overlapping windows, at the same moment (each booking reads the tenant's holdings only after it
    # holds the tenant's lock, or two could both see room for one more)
    tenant.gpu_quota = 16
    tenant.save()

    def attempt(i):
        start = at(2) + timedelta(minutes=15 * (i % 3))
        return services.reservation_create(actor=Actor.for_user(member), tenant=tenant, gpu_model="H100-SXM-80GB",
                                           gpus=8, start=start, end=start + timedelta(hours=4))

    outcomes = race(6, attempt)
    # then two are booked and four refused for the quota, with nothing written for them
    bookings = [o for o in outcomes if isinstance(o, services.BookingResult)]
    refusals = [o for o in outcomes if isinstance(o, ServiceError)]
    assert len(bookings) == 2 and len(refusals) == 4, outcomes
    assert all(o.code == "quota_exceeded" and o.http_status == 422 for o in refusals), refusals
    assert Reservation.objects.count() == 2 and Allocation.objects.count() == 2


def test_a_burst_of_one_tenant_s_bookings_that_fit_all_get_their_nodes(tenant, member):
    # given 48 free nodes in six domains of eight, and 24 requests of one tenant for two nodes each,
    # for one window, at the same moment (each waits for the one before it, on the tenant's lock)
    region = RegionFactory(code="us-east")
    model = GpuModelFactory(name="H100-SXM-80GB", gpus_per_node=8)
    GpuPriceFactory(gpu_model=model, region=region)
    cluster = ClusterFactory(name="east-1", region=region)
    NodeFactory.create_batch(48, cluster=cluster, gpu_model=model,
                             topology_domain=factory.Iterator([f"ib-{d}" for d in range(6) for _ in range(8)]))

    def attempt(i):
        return services.reservation_create(actor=Actor.for_user(member), tenant=tenant, gpu_model="H100-SXM-80GB",
                                           gpus=16, start=at(2), end=at(6))

    outcomes = race(24, attempt)
    # then every one is booked (none picked the nodes the one before it had just taken), and no node twice
    assert all(isinstance(o, services.BookingResult) for o in outcomes), outcomes
    assert overlapping_pairs() == 0 and Allocation.objects.count() == 48


def lockable_nodes() -> int:
    """Nodes another connection could lock now (a booking in progress elsewhere holds the others)."""
    counted = []

    def count():
        try:
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.execute("SELECT count(*) FROM (SELECT id FROM inventory_node FOR NO KEY UPDATE SKIP LOCKED) n")
                counted.append(cursor.fetchone()[0])
        finally:
            connections.close_all()

    thread = threading.Thread(target=count)
    thread.start()
    thread.join(timeout=60)
    return counted[0]


def test_a_booking_refused_inside_a_transaction_leaves_no_node_locked(fleet, tenant, member):
    # given a tenant whose quota is one node
    tenant.gpu_quota = 8
    tenant.save()
    # when, inside a caller's transaction, it asks for two nodes and is refused for its quota
    with transaction.atomic():
        with pytest.raises(QuotaExceeded):
            services.reservation_create(actor=Actor.for_user(member), tenant=tenant, gpu_model="H100-SXM-80GB",
                                        gpus=16, start=at(2), end=at(6))
        # then, while that transaction is still open, no node it looked at is held from other bookings
        assert lockable_nodes() == len(fleet.nodes)


def test_a_lost_race_inside_the_booking_function_is_not_taken_for_an_idempotency_race(fleet, tenant, member):
    # given a booking on node a0
    booked = services.reservation_create(actor=Actor.for_user(member), tenant=tenant, gpu_model="H100-SXM-80GB",
                                         gpus=8, start=at(2), end=at(6)).reservation
    node = booked.allocations.get().node_id
    # when a PL/pgSQL block (whose error context quotes its statement, as the booking function's
    # does) inserts an overlapping allocation on it, in a statement that names idempotency_key
    with pytest.raises(IntegrityError) as raised, transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(f"""DO $$ BEGIN
                INSERT INTO reservations_allocation (reservation_id, node_id, starts_at, ends_at, blocked_until,
                                                     state, created_at)
                SELECT id, {node}, starts_at, ends_at, ends_at, 'active', now() FROM reservations_reservation
                WHERE idempotency_key = '';
            END $$""")
    # then it is a lost race for a node (retried), not an identical request that went first
    assert "idempotency_key" in str(raised.value)
    assert services._is_double_booking(raised.value) and not services._is_idempotency_race(raised.value)


def test_migrates_running_at_once_install_the_booking_function_once(db):
    # given a database without this code's booking function
    with connection.cursor() as cursor:
        cursor.execute(f"DROP FUNCTION {services.BOOK_FUNCTION}")
    # when four migrates install it at the same moment
    outcomes = race(4, lambda i: services.booking_function_install())
    # then none fails, and there is one
    assert outcomes == [services.BOOK_FUNCTION] * 4, outcomes
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_proc WHERE proname = %s", [services.BOOK_FUNCTION])
        assert cursor.fetchone()[0] == 1


def test_extend_racing_bookings_of_the_extension_never_overlaps(fleet, tenant, member):
    # given a reservation on every node until +4h
    mine = services.reservation_create(actor=Actor.for_user(member), tenant=tenant, gpu_model="H100-SXM-80GB",
                                       gpus=48, start=at(2), end=at(4)).reservation
    others = [TenantFactory() for _ in range(4)]
    users = [MembershipFactory(tenant=t).user for t in others]

    def attempt(i):
        if i == 0:
            return services.reservation_extend(actor=Actor.for_user(member), reservation=mine, end=at(6))
        return services.reservation_create(actor=Actor.for_user(users[i - 1]), tenant=others[i - 1],
                                           gpu_model="H100-SXM-80GB", gpus=16, start=at(4.5), end=at(6))

    outcomes = race(5, attempt)
    # then whichever won, nothing overlaps and every loser got a clear 409
    assert not [o for o in outcomes if isinstance(o, Exception) and not isinstance(o, ServiceError)], outcomes
    assert all(o.http_status == 409 for o in outcomes if isinstance(o, ServiceError))
    assert overlapping_pairs() == 0
    mine.refresh_from_db()
    extended = mine.ends_at == at(6)
    booked = Reservation.objects.exclude(pk=mine.pk).count()
    assert extended != (booked > 0)
