"""PostgreSQL books in a few statements; the portable path (SQLite's) must come to the same result."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from marketplace.core.exceptions import ServiceError
from marketplace.core.models import AuditLog
from marketplace.core.services import Actor
from marketplace.reservations import money, selectors, services
from marketplace.reservations.models import Allocation, Reservation, ReservationEvent
from marketplace.reservations.policies import QuotaExceeded
from marketplace.reservations.services import InsufficientCapacity
from marketplace.inventory.models import GpuPrice, MaintenanceWindow, Node
from tests.factories import ClusterFactory, GpuPriceFactory, NodeFactory, RegionFactory, TenantFactory
from tests.reservations.conftest import at

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("frozen")]


def book(tenant, actor, **kwargs):
    params = {"gpu_model": "H100-SXM-80GB", "gpus": 16, "start": at(2), "end": at(6)} | kwargs
    return services.reservation_create(actor=actor, tenant=tenant, **params)


def written(reservation: Reservation) -> dict:
    """What a booking wrote, in terms that do not depend on which nodes or ids it got."""
    allocations = list(Allocation.objects.filter(reservation=reservation).select_related("node"))
    audit = AuditLog.objects.filter(object_id=str(reservation.pk)).order_by("id")
    return {
        "reservation": {field: getattr(reservation, field) for field in (
            "status", "status_reason", "gpus", "same_domain", "cluster_id", "gpu_model_id", "tenant_id",
            "created_by_id", "currency", "unit_price", "total_price", "idempotency_key", "readiness", "ready_at",
            "released_at")},
        "allocations": sorted((a.state, a.starts_at - reservation.starts_at, a.ends_at - reservation.ends_at,
                               a.blocked_until - a.ends_at) for a in allocations),
        "domains": sorted({a.node.topology_domain for a in allocations}),
        "events": sorted((e.kind, e.status, e.due_at - reservation.starts_at) for e in reservation.events.all()),
        "audit": [(row.action, row.actor, row.actor_user_id, row.tenant_id, row.before,
                   {k: v for k, v in (row.after or {}).items() if k != "nodes"}, len((row.after or {}).get("nodes", [])))
                  for row in audit],
    }


@pytest.mark.postgres_only
def test_the_booking_function_the_two_statements_and_the_portable_path_write_the_same_booking(fleet, tenant, actor,
                                                                                            monkeypatch):
    # given one booking made by the booking function, read back from the database
    made = [Reservation.objects.get(pk=book(tenant, actor, idempotency_key="k1").reservation.pk)]
    # when the same request (another key, a later window) goes the two-statement way, then the portable way
    monkeypatch.setattr(services, "_book_in_one_call", lambda **request: services._UNDECIDED)
    made.append(Reservation.objects.get(pk=book(tenant, actor, idempotency_key="k2", start=at(12),
                                                end=at(16)).reservation.pk))
    monkeypatch.setattr(services, "_book_once_postgresql", services._book_once_portable)
    made.append(Reservation.objects.get(pk=book(tenant, actor, idempotency_key="k3", start=at(22),
                                                end=at(26)).reservation.pk))
    # then all three wrote the same rows, up to the key, the window and the fingerprint
    rows = [written(reservation) for reservation in made]
    for each, start in zip(rows, (at(2), at(12), at(22))):
        each["reservation"]["idempotency_key"] = None
        created = each["audit"][0]
        assert created[5]["start"] == start.isoformat() and created[5]["end"] == (start + timedelta(hours=4)).isoformat()
        created[5]["start"] = created[5]["end"] = None
    assert rows[0] == rows[1] == rows[2]
    assert rows[0]["audit"][1][4] == {"status": "pending"} and rows[0]["domains"] == ["ib-a"]


@pytest.mark.parametrize(("change", "code"), [
    ({"gpu_model": "no-such-gpu"}, "unknown_gpu_model"),
    ({"billing_status": "suspended"}, "tenant_cannot_book"),
])
def test_a_task_booking_for_a_tenant_with_no_members_hears_the_first_refusal_that_applies(fleet, change, code):
    # given a tenant with no members (a task's booking is recorded as made by one) and a request
    # that is refused anyway, for its model or its standing
    lonely = TenantFactory(billing_status=change.get("billing_status", "good"))
    # when a task books for it
    with pytest.raises(ServiceError) as refused:
        services.reservation_create(actor=Actor.task("nightly"), tenant=lonely, **{
            "gpu_model": "H100-SXM-80GB", "gpus": 8, "start": at(2), "end": at(6)} | {
            key: value for key, value in change.items() if key == "gpu_model"})
    # then it hears that refusal, on every path, before the missing member
    assert refused.value.code == code


@pytest.mark.postgres_only
def test_the_returned_reservation_matches_the_stored_row(fleet, tenant, actor):
    returned = book(tenant, actor).reservation
    stored = Reservation.objects.get(pk=returned.pk)
    for field in Reservation._meta.concrete_fields:
        assert getattr(returned, field.attname) == getattr(stored, field.attname), field.name


@pytest.mark.postgres_only
def test_a_booking_on_postgresql_is_one_call_of_the_booking_function(fleet, tenant, actor):
    book(tenant, actor)  # warm the connection (and let this process price the cluster's unit price)
    with CaptureQueriesContext(connection) as one_node:
        book(tenant, actor, gpus=8, start=at(10), end=at(12))
    with CaptureQueriesContext(connection) as two_nodes:
        book(tenant, actor, gpus=16, start=at(20), end=at(24))
    # the tenant lock, the pick and every insert in one call (the test's own transaction makes it a
    # savepoint; outside one it is a transaction of its own)
    statements = [[q["sql"] for q in run if "SAVEPOINT" not in q["sql"]] for run in (one_node, two_nodes)]
    assert [len(run) for run in statements] == [1, 1], statements
    assert all(run[0].startswith(f"SELECT * FROM {services.BOOK_FUNCTION}(") for run in statements)


@pytest.mark.postgres_only
def test_a_price_the_process_has_not_priced_costs_one_more_call_and_is_booked_exactly(fleet, tenant, actor):
    # given a booking at the cluster's price, and then a new price with more decimals
    book(tenant, actor, gpus=8)
    GpuPrice.objects.filter(gpu_model=fleet.model).update(price_per_gpu_hour=Decimal("2.3333"))
    # when a booking comes for 1 h 45 min at the new price, and another after it
    with CaptureQueriesContext(connection) as first:
        priced = book(tenant, actor, gpus=16, start=at(10), end=at(11) + timedelta(minutes=45)).reservation
    with CaptureQueriesContext(connection) as second:
        book(tenant, actor, gpus=8, start=at(20), end=at(22))
    # then the first took two calls (the function does not price; Python's money rule does) and
    # the second one; both are locked at the new price, to the cent of money.reservation_total
    calls = [[q for q in run if q["sql"].startswith("SELECT * FROM reservation_book_")] for run in (first, second)]
    assert [len(run) for run in calls] == [2, 1]
    stored = Reservation.objects.get(pk=priced.pk)
    expected = money.reservation_total(unit_price=Decimal("2.3333"), gpus=16, duration=timedelta(hours=1.75))
    assert (stored.unit_price, stored.total_price) == (Decimal("2.3333"), expected) == (priced.unit_price,
                                                                                         priced.total_price)
    assert expected == Decimal("65.33")
    assert AuditLog.objects.get(object_id=str(priced.pk), action="reservation.create").after["total_price"] == "65.33"


@pytest.mark.postgres_only
def test_without_the_booking_function_bookings_go_the_two_statement_way(fleet, tenant, actor, caplog, monkeypatch):
    # given a database whose booking function is not (yet) this code's: a deploy before its migrate
    monkeypatch.setattr(services, "_book_function_missing_at", services._book_function_missing_at)  # restored after
    with connection.cursor() as cursor:
        cursor.execute(f"DROP FUNCTION {services.BOOK_FUNCTION}")
    # when two bookings come
    with CaptureQueriesContext(connection) as queries:
        booked = [book(tenant, actor), book(tenant, actor, start=at(10), end=at(12))]
    # then both are booked by the two statements, the log says why, and only the first tried the function
    assert [Reservation.objects.get(pk=b.reservation.pk).allocations.count() for b in booked] == [2, 2]
    statements = [q["sql"] for q in queries.captured_queries]
    assert sum(sql.lstrip().startswith("WITH tenant AS") for sql in statements) == 2
    assert sum(sql.startswith(f"SELECT * FROM {services.BOOK_FUNCTION}(") for sql in statements) == 1
    assert f"{services.BOOK_FUNCTION} cannot be called (42883" in caplog.text


@pytest.mark.postgres_only
def test_a_database_role_that_may_not_execute_the_booking_function_books_the_two_statement_way(
        fleet, tenant, actor, caplog, monkeypatch):
    # given a role with the rights on the tables but not on the function (REVOKE … FROM PUBLIC)
    monkeypatch.setattr(services, "_book_function_missing_at", services._book_function_missing_at)  # restored after
    with connection.cursor() as cursor:
        cursor.execute("CREATE ROLE booking_without_function NOLOGIN")
        cursor.execute("GRANT USAGE ON SCHEMA public TO booking_without_function")
        cursor.execute("GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO booking_without_function")
        cursor.execute("GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO booking_without_function")
        cursor.execute(f"REVOKE EXECUTE ON FUNCTION {services.BOOK_FUNCTION} FROM PUBLIC")
        cursor.execute("SET ROLE booking_without_function")
    # when a booking comes
    try:
        booked = book(tenant, actor)
    finally:
        with connection.cursor() as cursor:
            cursor.execute("RESET ROLE")
    # then it is booked, the two-statement way, and the log says why
    assert Reservation.objects.get(pk=booked.reservation.pk).allocations.count() == 2
    assert f"{services.BOOK_FUNCTION} cannot be called (42501" in caplog.text


@pytest.mark.postgres_only
def test_migrate_installs_this_code_s_booking_function_and_drops_the_others(fleet, tenant, actor):
    def installed() -> list[str]:
        with connection.cursor() as cursor:
            cursor.execute("SELECT proname FROM pg_proc WHERE proname LIKE 'reservation\\_book\\_%%' ORDER BY 1")
            return [name for (name,) in cursor.fetchall()]

    # given only the booking function of an earlier version of the code
    with connection.cursor() as cursor:
        cursor.execute(f"DROP FUNCTION {services.BOOK_FUNCTION}")
        cursor.execute("CREATE FUNCTION reservation_book_000000000000(bigint) RETURNS int LANGUAGE sql AS 'SELECT 1'")
        cursor.execute("CREATE FUNCTION reservation_book_stats() RETURNS int LANGUAGE sql AS 'SELECT 1'")  # not ours
    # when the function is installed, as every migrate does, twice
    assert services.booking_function_install() == services.BOOK_FUNCTION
    assert installed() == [services.BOOK_FUNCTION, "reservation_book_stats"]
    assert services.booking_function_install() == services.BOOK_FUNCTION
    # then only this code's is there (and a function that only shares the prefix), and bookings use it
    assert installed() == [services.BOOK_FUNCTION, "reservation_book_stats"]
    with CaptureQueriesContext(connection) as queries:
        book(tenant, actor)
    assert [q["sql"] for q in queries.captured_queries if "SAVEPOINT" not in q["sql"]][-1].startswith(
        f"SELECT * FROM {services.BOOK_FUNCTION}(")


def test_the_cheapest_cluster_first_then_by_name_then_the_next_that_fits(fleet, tenant, actor):
    # given two more clusters at the same, lower price, whose names sort differently by code point
    # ("B-…" before "b-…") than by a linguistic collation
    region = RegionFactory(code="us-west")
    GpuPriceFactory(gpu_model=fleet.model, region=region, price_per_gpu_hour=Decimal("2.0000"), currency="USD")
    lower, upper = ClusterFactory(name="b-x", region=region), ClusterFactory(name="B-y", region=region)
    for cluster in (lower, upper):
        NodeFactory(name=f"{cluster.name}-0", cluster=cluster, gpu_model=fleet.model, topology_domain="ib-z")
    expected = [cluster.name for cluster in selectors.priced_clusters(gpu_model=fleet.model)]
    assert expected[:2] == ["B-y", "b-x"]
    # when three one-node bookings of one window are made
    placed = [book(tenant, actor, gpus=8).reservation for _ in range(3)]
    # then they go to the cheap clusters in that order, at their price, and then to the next cluster
    assert [r.cluster.name for r in placed] == ["B-y", "b-x", "east-1"]
    assert [(r.unit_price, r.currency) for r in placed] == [(Decimal("2.0000"), "USD")] * 2 + [
        (Decimal("2.5000"), "USD")]


def test_prices_in_another_currency_are_not_compared_as_numbers(fleet, tenant, actor, settings):
    # given a region priced lower in figures, but in euros, while the marketplace's currency is USD
    settings.MARKETPLACE = {**settings.MARKETPLACE, "DEFAULT_CURRENCY": "USD"}
    region = RegionFactory(code="eu-west")
    GpuPriceFactory(gpu_model=fleet.model, region=region, price_per_gpu_hour=Decimal("2.4000"), currency="EUR")
    cluster = ClusterFactory(name="eu-1", region=region)
    NodeFactory(name="eu-1-0", cluster=cluster, gpu_model=fleet.model, topology_domain="ib-e")
    # when offers are listed and a booking names no region
    found = selectors.availability_search(gpu_model=fleet.model, gpus=8, start=at(2), end=at(6))
    # then the USD offer comes first and is booked; the EUR one is still offered, after it
    assert [(o.cluster, o.currency) for o in found.offers] == [("east-1", "USD"), ("eu-1", "EUR")]
    booked = book(tenant, actor, gpus=8).reservation
    assert (booked.cluster.name, booked.currency, booked.unit_price) == ("east-1", "USD", Decimal("2.5000"))
    # and a booking in that region gets the euro price
    in_eu = book(tenant, actor, gpus=8, region="eu-west").reservation
    assert (in_eu.cluster.name, in_eu.currency, in_eu.unit_price) == ("eu-1", "EUR", Decimal("2.4000"))


def test_quota_is_refused_before_capacity(fleet, tenant, actor):
    # given a tenant whose quota is one node
    tenant.gpu_quota = 8
    tenant.save()
    # when it asks for more nodes than exist, it hears about its quota (as before any capacity check)
    with pytest.raises(QuotaExceeded):
        book(tenant, actor, gpus=56)
    # and with capacity to spare, still about its quota, and nothing is written
    with pytest.raises(QuotaExceeded):
        book(tenant, actor, gpus=16)
    assert not Reservation.objects.exists() and not AuditLog.objects.filter(action__startswith="reservation.").exists()


def test_a_quota_refusal_after_placement_leaves_nothing_behind(fleet, tenant, actor):
    # given a tenant holding one node, with a quota of two
    tenant.gpu_quota = 16
    tenant.save()
    book(tenant, actor, gpus=8)
    # when it asks for two more in an overlapping window
    with pytest.raises(QuotaExceeded):
        book(tenant, actor, gpus=16, start=at(4), end=at(8))
    # then only the first booking exists, and its nodes are the only ones held
    assert Reservation.objects.count() == 1 and Allocation.objects.count() == 1
    assert AuditLog.objects.filter(action="reservation.create").count() == 1
    # and the same request fits once the windows no longer overlap
    assert book(tenant, actor, gpus=8, start=at(7), end=at(9)).created


def test_no_domain_fits_and_spanning_refused_is_insufficient_capacity(fleet, tenant, actor):
    # given every node of ib-a booked, 2 nodes left in ib-b
    book(tenant, actor, gpus=32)
    with pytest.raises(InsufficientCapacity):
        book(tenant, actor, gpus=24, start=at(3), end=at(5), same_domain=True)
    # a window after the cleaning gap gets ib-a again
    later = book(tenant, actor, gpus=32, start=at(6) + timedelta(minutes=30), end=at(8)).reservation
    assert {a.node.topology_domain for a in later.allocations.all()} == {"ib-a"}


@pytest.mark.parametrize("model", [Reservation, Allocation, ReservationEvent, AuditLog])
def test_the_postgresql_insert_names_every_column(model):
    # a column added to one of these models must be written by the one-statement booking too
    statement = services._INSERT_BOOKING_SQL
    table = model._meta.db_table
    columns_part = statement[statement.index(f"INSERT INTO {table} (") + len(f"INSERT INTO {table} ("):]
    named = {name.strip() for name in columns_part[:columns_part.index(")")].split(",")}
    expected = {field.column for field in model._meta.concrete_fields if not (field.primary_key and field.column == "id"
                                                                                and model is not Reservation)}
    assert named == expected


@pytest.mark.postgres_only
def test_a_window_s_later_bookings_start_near_the_latest_one_and_still_reach_every_domain(fleet, tenant, actor):
    # given six more one-node domains, named to sort after ib-a and ib-b
    for index in range(6):
        NodeFactory(name=f"z{index}", cluster=fleet.cluster, gpu_model=fleet.model, topology_domain=f"ib-z{index}")
    # when one-node bookings of one window take every node, the first by plain first fit
    first = book(tenant, actor, gpus=8).reservation
    later = [book(tenant, actor, gpus=8).reservation for _ in range(11)]
    # then the first went to the first domain, and the walk, starting near the latest booking's
    # domain and wrapping round, found every free node (12 nodes) before refusing
    assert {a.node.topology_domain for a in first.allocations.select_related("node")} == {"ib-a"}
    booked = Allocation.objects.filter(reservation__in=[first, *later]).values_list("node__name", flat=True)
    assert sorted(booked) == sorted(node.name for node in Node.objects.all())
    with pytest.raises(InsufficientCapacity):
        book(tenant, actor, gpus=8)


@pytest.mark.postgres_only
def test_a_walk_gives_up_after_its_last_domain_and_the_count_still_finds_a_free_one(fleet, tenant, actor):
    # given more domains than a walk tries, every one in maintenance for the window except the
    # last by name (maintenance is no booking: no hint, so the walk is first fit from ib-a)
    for index in range(services.WALK_MAX_DOMAINS):
        NodeFactory(name=f"m{index}", cluster=fleet.cluster, gpu_model=fleet.model, topology_domain=f"ib-m{index}")
    free = NodeFactory(name="z", cluster=fleet.cluster, gpu_model=fleet.model, topology_domain="ib-z")
    MaintenanceWindow.objects.bulk_create(MaintenanceWindow(node=node, starts_at=at(0), ends_at=at(12))
                                          for node in Node.objects.exclude(pk=free.pk))
    # when a one-node booking comes for that window
    with CaptureQueriesContext(connection) as queries:
        booked = book(tenant, actor, gpus=8).reservation
    # then the walk stopped after WALK_MAX_DOMAINS busy domains, and the free-node count over the
    # cluster (the search's) found the last one, which the booking got
    assert any(query["sql"].lstrip().startswith("SELECT n.cluster_id, n.topology_domain, count(*)")
               for query in queries.captured_queries)
    assert list(booked.allocations.values_list("node__name", flat=True)) == ["z"]


@pytest.mark.postgres_only
@pytest.mark.parametrize("walk", [True, False])
def test_after_the_function_s_walk_found_nothing_the_two_statements_do_not_walk_again(fleet, tenant, actor, walk):
    # given a fleet with room: the walk would find nodes
    # when the two-statement path books, told to walk or (as after the function's walk found nothing) not
    with CaptureQueriesContext(connection) as queries, transaction.atomic():
        booked = services._book_once_postgresql(
            actor=actor, tenant=tenant, model_name="H100-SXM-80GB", region_code=None, gpus=8, start=at(2), end=at(4),
            same_domain=False, idempotency_key="", fingerprint="", enforce=True, walk=walk)
    # then it books either way; without the walk, the free-node count over the clusters placed it
    assert booked.created and booked.reservation.allocations.count() == 1
    counted = any(query["sql"].lstrip().startswith("SELECT n.cluster_id, n.topology_domain, count(*)")
                  for query in queries.captured_queries)
    assert counted is not walk


def test_a_cheapest_cluster_the_walk_gives_up_on_still_gets_the_booking_at_the_quoted_price(fleet, tenant, actor):
    # given the cheapest cluster's only free node in the last of more domains than a walk tries,
    # and a dearer cluster with a free node
    for index in range(services.WALK_MAX_DOMAINS):
        NodeFactory(name=f"m{index}", cluster=fleet.cluster, gpu_model=fleet.model, topology_domain=f"ib-m{index}")
    free = NodeFactory(name="z", cluster=fleet.cluster, gpu_model=fleet.model, topology_domain="ib-z")
    dear = RegionFactory(code="eu-west")
    GpuPriceFactory(gpu_model=fleet.model, region=dear, price_per_gpu_hour=Decimal("3.0000"), currency="USD")
    dear_node = NodeFactory(name="w0", cluster=ClusterFactory(name="west-1", region=dear), gpu_model=fleet.model,
                            topology_domain="ib-w")
    MaintenanceWindow.objects.bulk_create(MaintenanceWindow(node=node, starts_at=at(0), ends_at=at(12))
                                          for node in Node.objects.exclude(pk__in=[free.pk, dear_node.pk]))
    quote = selectors.availability_search(gpu_model=fleet.model, gpus=8, start=at(2), end=at(6)).offers[0]
    # when a one-node booking comes for that window
    booked = book(tenant, actor, gpus=8).reservation
    # then it is the quote: the cheapest cluster's free node at its price, not the dearer cluster
    assert (quote.cluster, quote.unit_price) == ("east-1", Decimal("2.5000"))
    assert (booked.cluster.name, booked.unit_price, booked.total_price) == ("east-1", quote.unit_price,
                                                                            quote.total_price)
    assert list(booked.allocations.values_list("node__name", flat=True)) == ["z"]


def prepared_statements() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_prepared_statements")
        return cursor.fetchone()[0]


@pytest.mark.postgres_only
@pytest.mark.django_db(transaction=True)
def test_a_refused_booking_ends_its_transaction_without_losing_the_prepared_statements(fleet, tenant, actor):
    from marketplace.core.exceptions import ServiceError

    # given a connection that has booked once and been refused once, so its booking call and the
    # statements of the two-statement path (where refusals are decided) are prepared
    book(tenant, actor)
    with pytest.raises(InsufficientCapacity):
        book(tenant, actor, gpus=8 * 64)
    prepared = prepared_statements()
    assert prepared >= 2
    # when bookings are refused: no capacity, then an unknown GPU model
    with pytest.raises(InsufficientCapacity):
        book(tenant, actor, gpus=8 * 64)
    with pytest.raises(ServiceError):
        book(tenant, actor, gpu_model="no-such-gpu")
    # then they wrote nothing, and the statements are still prepared (a ROLLBACK would have made
    # psycopg deallocate them all, and the next booking would plan them again)
    assert Reservation.objects.count() == 1 and Allocation.objects.count() == 2
    assert prepared_statements() == prepared
    assert book(tenant, actor, start=at(8), end=at(10)).created
    assert prepared_statements() == prepared
