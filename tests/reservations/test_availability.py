"""Availability search, earliest start, and the capacity calendar."""

from collections import Counter
from datetime import timedelta
from decimal import Decimal

import pytest

from marketplace.inventory.models import Cluster, MaintenanceWindow, Node
from marketplace.reservations import selectors, services
from marketplace.reservations.models import Allocation
from tests.factories import (AllocationFactory, ClusterFactory, GpuPriceFactory, NodeFactory, RegionFactory,
                             ReservationFactory)
from tests.reservations.conftest import at

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("frozen")]


def search(fleet, **kwargs):
    params = {"gpu_model": fleet.model, "gpus": 16, "start": at(2), "end": at(6)} | kwargs
    return selectors.availability_search(**params)


def test_offer_prefers_one_domain_and_quotes_the_price(fleet):
    found = search(fleet)
    [offer] = found.offers
    assert (offer.cluster, offer.region, offer.nodes, offer.same_domain) == ("east-1", "us-east", 2, True)
    assert (offer.unit_price, offer.total_price, offer.currency) == (Decimal("2.5000"), Decimal("160.00"), "USD")
    assert found.reason is None


def test_cheaper_region_ranks_first_among_equal_offers(fleet):
    eu = RegionFactory(code="eu-west", name="EU")
    GpuPriceFactory(gpu_model=fleet.model, region=eu, price_per_gpu_hour=Decimal("2.0000"))
    cluster = ClusterFactory(name="west-1", region=eu)
    NodeFactory.create_batch(2, cluster=cluster, gpu_model=fleet.model, topology_domain="ib-w")
    offers = search(fleet).offers
    assert [o.cluster for o in offers] == ["west-1", "east-1"]
    assert [o.cluster for o in search(fleet, region=eu).offers] == ["west-1"]


def test_a_disabled_cluster_is_never_offered(fleet):
    # given a cheaper region whose only cluster, with free nodes, is disabled
    eu = RegionFactory(code="eu-west", name="EU")
    GpuPriceFactory(gpu_model=fleet.model, region=eu, price_per_gpu_hour=Decimal("1.0000"))
    cluster = ClusterFactory(name="west-1", region=eu, status=Cluster.Status.DISABLED)
    NodeFactory.create_batch(4, cluster=cluster, gpu_model=fleet.model, topology_domain="ib-w")
    # when searching anywhere, and in that region
    # then only the active cluster is priced and offered, and the region has no bookable nodes
    assert [cluster.name for cluster in selectors.priced_clusters(gpu_model=fleet.model)] == ["east-1"]
    assert [offer.cluster for offer in search(fleet).offers] == ["east-1"]
    assert search(fleet, region=eu).reason["code"] == "no_nodes"


def test_no_offer_says_why(fleet):
    found = search(fleet, gpus=40, same_domain=True)
    assert found.offers == [] and found.reason["code"] == "insufficient_capacity"
    assert "share one topology domain" in found.reason["message"]
    Node.objects.update(status=Node.Status.MAINTENANCE)
    assert search(fleet).reason["code"] == "no_nodes"


def test_free_node_counts_are_the_free_nodes_by_domain(fleet):
    # given, around the window [2h, 6h) and its cleaning gap up to 6h30:
    nodes = fleet.nodes
    AllocationFactory(node=nodes["a0"], starts_at=at(0), ends_at=at(1.5), blocked_until=at(2))  # free again at 2h
    AllocationFactory(node=nodes["a1"], starts_at=at(5), ends_at=at(7), blocked_until=at(7.5))  # busy
    AllocationFactory(node=nodes["a2"], starts_at=at(2), ends_at=at(6), blocked_until=at(6.5),
                      state=Allocation.State.CANCELLED)  # cancelled: free
    MaintenanceWindow.objects.create(node=nodes["b0"], starts_at=at(6.25), ends_at=at(9))  # in the gap: busy
    MaintenanceWindow.objects.create(node=nodes["a3"], starts_at=at(6.5), ends_at=at(9))  # after the gap: free
    Node.objects.filter(pk=nodes["b1"].pk).update(health=Node.Health.UNHEALTHY)
    # when the free nodes of the window are counted (in SQL of its own on PostgreSQL)
    counts = selectors.free_node_counts(gpu_model=fleet.model, start=at(2), end=at(6), cluster_ids=[fleet.cluster.pk])
    # then they are exactly the free nodes, by domain
    free = selectors.free_nodes(gpu_model=fleet.model, start=at(2), end=at(6), cluster_ids=[fleet.cluster.pk])
    assert counts == {fleet.cluster.pk: dict(Counter(free.values_list("topology_domain", flat=True)))}
    assert counts == {fleet.cluster.pk: {"ib-a": 3}}
    assert selectors.free_node_counts(gpu_model=fleet.model, start=at(2), end=at(6), cluster_ids=[]) == {}


def test_booked_nodes_and_their_cleaning_gap_are_not_offered(fleet, tenant, member):
    from marketplace.core.services import Actor

    services.reservation_create(actor=Actor.for_user(member), tenant=tenant, gpu_model=fleet.model.name, gpus=32,
                                start=at(2), end=at(6))
    # the four ib-a nodes are held until 6h + 30 min
    assert sum(o.nodes for o in search(fleet, gpus=8).offers) == 1
    assert search(fleet, gpus=24, start=at(6.25), end=at(8)).offers == []
    assert search(fleet, gpus=32, start=at(6.5), end=at(8), same_domain=True).offers[0].domains == ("ib-a",)


def test_earliest_finds_the_first_window_that_fits(fleet, tenant, member):
    from marketplace.core.services import Actor

    services.reservation_create(actor=Actor.for_user(member), tenant=tenant, gpu_model=fleet.model.name, gpus=48,
                                start=at(2), end=at(6))
    for node in Node.objects.filter(topology_domain="ib-a"):
        MaintenanceWindow.objects.create(node=node, starts_at=at(6), ends_at=at(10) + timedelta(minutes=5))
    found = selectors.availability_earliest(gpu_model=fleet.model, gpus=32, start=at(2), end=at(4),
                                            horizon=at(48), same_domain=True)
    # ib-a is cleaned by 6:30, then in maintenance until 10:05: the first aligned start is 10:15
    assert found.start == at(10.25) and found.end == at(12.25)
    assert found.offers[0].domains == ("ib-a",)
    nothing = selectors.availability_earliest(gpu_model=fleet.model, gpus=64, start=at(2), end=at(4), horizon=at(48))
    assert nothing.offers == [] and "No window" in nothing.reason["message"]


def test_earliest_looks_through_the_whole_horizon(fleet):
    # given ib-a's four nodes busy for 15 minutes of every half hour for five days: 240 moments at
    # which a node frees up, none leaving room for a two-hour window
    reservation = ReservationFactory(gpu_model=fleet.model, cluster=fleet.cluster)
    Allocation.objects.bulk_create(
        Allocation(reservation=reservation, node=fleet.nodes[f"a{i}"], starts_at=at(2 + k / 2),
                   ends_at=at(2.25 + k / 2), blocked_until=at(2.25 + k / 2))
        for i in range(4) for k in range(240))
    # when the earliest two-hour window of the whole domain is asked for, within a week
    found = selectors.availability_earliest(gpu_model=fleet.model, gpus=32, start=at(2), end=at(4),
                                            horizon=at(24 * 7), same_domain=True)
    # then it starts when the last of those periods ends, five days on
    assert (found.start, found.end, found.offers[0].domains) == (at(121.75), at(123.75), ("ib-a",))
    # and with a horizon before that, none is found, and the refusal says up to when it looked
    nothing = selectors.availability_earliest(gpu_model=fleet.model, gpus=32, start=at(2), end=at(4),
                                              horizon=at(121.5), same_domain=True)
    assert nothing.offers == [] and "starting before 2026-12-06 09:30 UTC" in nothing.reason["message"]


def test_capacity_buckets_count_free_gpus(fleet, tenant, member):
    from marketplace.core.services import Actor

    Node.objects.filter(name="a3").update(status=Node.Status.OFFLINE)
    services.reservation_create(actor=Actor.for_user(member), tenant=tenant, gpu_model=fleet.model.name, gpus=16,
                                start=at(2), end=at(4))
    MaintenanceWindow.objects.create(node=fleet.nodes["a0"], starts_at=at(0), ends_at=at(1))
    timeline = selectors.capacity_timeline(start=at(0), end=at(6), step=timedelta(hours=1), gpu_model=fleet.model)
    free = [b.free_gpus for b in timeline["H100-SXM-80GB"]]
    # 5 usable nodes (a3 offline); a0 in maintenance 0-1h; 2 nodes held 2h-4h30 (incl. cleaning gap),
    # which a booking of 1h-2h (free until 2h30 with its own gap) cannot take either
    assert [b.total_gpus for b in timeline["H100-SXM-80GB"]] == [40] * 6
    assert free == [32, 24, 24, 24, 24, 40]


def test_capacity_counts_a_node_once_however_its_busy_periods_overlap(fleet):
    # given a0 allocated 1h-2h and again 2h-3h (back to back), in maintenance 1h30-2h30 across both,
    # and b0 allocated 4h10-4h20, inside one bucket
    reservation = ReservationFactory(gpu_model=fleet.model, cluster=fleet.cluster)
    Allocation.objects.bulk_create([
        Allocation(reservation=reservation, node=fleet.nodes["a0"], starts_at=at(1), ends_at=at(2), blocked_until=at(2)),
        Allocation(reservation=reservation, node=fleet.nodes["a0"], starts_at=at(2), ends_at=at(3), blocked_until=at(3)),
        Allocation(reservation=reservation, node=fleet.nodes["b0"], starts_at=at(4) + timedelta(minutes=10),
                   ends_at=at(4) + timedelta(minutes=20), blocked_until=at(4) + timedelta(minutes=20)),
    ])
    MaintenanceWindow.objects.create(node=fleet.nodes["a0"], starts_at=at(1.5), ends_at=at(2.5))
    # when the free GPUs are counted per hour
    timeline = selectors.capacity_timeline(start=at(0), end=at(6), step=timedelta(hours=1), gpu_model=fleet.model)
    # then each node's 8 GPUs are taken once in every hour a booking could not have it, that hour's
    # cleaning gap (30 min) included: a0 from 0h (its gap reaches 1h) to 3h, b0 at 3h (its gap reaches
    # 4h10) and 4h
    assert [b.free_gpus for b in timeline["H100-SXM-80GB"]] == [40, 40, 40, 40, 40, 48]


def test_the_calendar_agrees_with_the_search_about_the_cleaning_gap(fleet, tenant, member):
    from marketplace.core.services import Actor

    # given every node booked from 3h15
    services.reservation_create(actor=Actor.for_user(member), tenant=tenant, gpu_model=fleet.model.name, gpus=48,
                                start=at(3.25), end=at(5))
    # when the hour 2h-3h is looked at, in the calendar and by the search
    [bucket] = selectors.capacity_timeline(start=at(2), end=at(3), step=timedelta(hours=1),
                                           gpu_model=fleet.model)["H100-SXM-80GB"]
    found = selectors.availability_search(gpu_model=fleet.model, gpus=8, start=at(2), end=at(3))
    # then neither offers a node: a booking of that hour would end 15 minutes before the next one,
    # inside its 30-minute cleaning gap
    assert bucket.free_gpus == 0 and found.offers == []
    assert "Only 0 free" in found.reason["message"] and "30-minute cleaning gap after it" in found.reason["message"]
    # and a bucket whose gap ends at 3h15 is free in both
    [earlier] = selectors.capacity_timeline(start=at(1.75), end=at(2.75), step=timedelta(hours=1),
                                            gpu_model=fleet.model)["H100-SXM-80GB"]
    assert earlier.free_gpus == 48
    assert len(selectors.availability_search(gpu_model=fleet.model, gpus=48, start=at(1.75), end=at(2.75)).offers) == 1


def test_the_calendar_counts_only_clusters_where_the_model_has_a_price(fleet):
    # given an active cluster in a region with no price for the model
    cluster = ClusterFactory(name="west-1", region=RegionFactory(code="eu-west"))
    NodeFactory.create_batch(4, cluster=cluster, gpu_model=fleet.model, topology_domain="ib-w")
    # when the calendar is counted, then its nodes are not in it: no booking could take them
    [bucket] = selectors.capacity_timeline(start=at(2), end=at(3), step=timedelta(hours=1),
                                           gpu_model=fleet.model)["H100-SXM-80GB"]
    assert (bucket.total_gpus, bucket.free_gpus) == (48, 48)


def test_the_calendar_is_shared_for_its_ttl_then_recounted(fleet, tenant, member, frozen,
                                                           django_assert_num_queries):
    from marketplace.core.services import Actor

    def calendar():
        return selectors.capacity_calendar(start=at(0), end=at(4), step=timedelta(hours=1), gpu_model=fleet.model)

    # given a calendar counted once
    first = calendar()
    assert [b.free_gpus for b in first.models["H100-SXM-80GB"]] == [48] * 4 and first.as_of == at(0)
    # when a booking takes two nodes, and the calendar is asked for again within a minute
    services.reservation_create(actor=Actor.for_user(member), tenant=tenant, gpu_model=fleet.model.name, gpus=16,
                                start=at(1), end=at(2))
    frozen.shift(timedelta(seconds=59))
    # then it is the same count, with the time it was made, and costs no query
    with django_assert_num_queries(0):
        assert calendar() == first
    # and after the minute it is counted again
    frozen.shift(timedelta(seconds=2))
    again = calendar()
    assert [b.free_gpus for b in again.models["H100-SXM-80GB"]] == [32, 32, 32, 48]
    assert again.as_of == at(0) + timedelta(seconds=61)


def test_a_calendar_ttl_of_zero_counts_every_time(fleet, tenant, member, settings):
    from marketplace.core.services import Actor

    settings.MARKETPLACE = {**settings.MARKETPLACE, "CAPACITY_CACHE_TTL": timedelta(0)}
    before = selectors.capacity_calendar(start=at(0), end=at(4), step=timedelta(hours=1), gpu_model=fleet.model)
    services.reservation_create(actor=Actor.for_user(member), tenant=tenant, gpu_model=fleet.model.name, gpus=16,
                                start=at(1), end=at(2))
    after = selectors.capacity_calendar(start=at(0), end=at(4), step=timedelta(hours=1), gpu_model=fleet.model)
    assert [b.free_gpus for b in before.models["H100-SXM-80GB"]] == [48] * 4
    assert [b.free_gpus for b in after.models["H100-SXM-80GB"]] == [32, 32, 32, 48]


def test_an_unreachable_cache_costs_a_recount_not_the_calendar(fleet, settings, caplog):
    # given a cache server that refuses connections
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                                   "LOCATION": "redis://127.0.0.1:1/0"}}
    # when the calendar is asked for, then it is counted all the same, and the outage is logged
    calendar = selectors.capacity_calendar(start=at(0), end=at(2), step=timedelta(hours=1), gpu_model=fleet.model)
    assert [b.free_gpus for b in calendar.models["H100-SXM-80GB"]] == [48, 48]
    assert "the cache is unavailable" in caplog.text


def test_the_offered_domain_is_the_one_a_booking_takes(fleet, tenant, member):
    from marketplace.core.services import Actor

    offer = search(fleet, gpus=16).offers[0]
    reservation = services.reservation_create(actor=Actor.for_user(member), tenant=tenant,
                                              gpu_model=fleet.model.name, gpus=16, start=at(2), end=at(6)).reservation
    assert offer.domains == ("ib-a",)
    assert set(reservation.allocations.values_list("node__topology_domain", flat=True)) == {"ib-a"}
