"""Booking, cancelling, extending and releasing through the services."""

from datetime import timedelta
from decimal import Decimal

import pytest

from marketplace.core.exceptions import InvalidInput, PolicyViolation
from marketplace.core.models import AuditLog
from marketplace.core.services import Actor
from marketplace.inventory.models import MaintenanceWindow, Node
from marketplace.reservations import services
from marketplace.reservations.models import Allocation, Reservation
from marketplace.reservations.services import IdempotencyKeyReused, IllegalTransition, InsufficientCapacity
from marketplace.reservations.policies import QuotaExceeded, TenantCannotBook
from tests.reservations.conftest import NOW, at

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("frozen")]


def book(tenant, actor, **kwargs):
    params = {"gpu_model": "H100-SXM-80GB", "gpus": 16, "start": at(2), "end": at(6)} | kwargs
    return services.reservation_create(actor=actor, tenant=tenant, **params)


def nodes_of(reservation):
    return sorted(reservation.allocations.exclude(state="cancelled").values_list("node__name", flat=True))


def test_booking_allocates_whole_nodes_in_one_domain_and_locks_the_price(fleet, tenant, actor):
    # when 16 GPUs (2 nodes) are booked for 4 hours
    result = book(tenant, actor)
    reservation = result.reservation
    # then two nodes of one domain are held, padded by the cleaning gap
    assert result.created and reservation.status == "confirmed"
    names = nodes_of(reservation)
    assert len(names) == 2 and len({n[0] for n in names}) == 1
    assert {a.blocked_until for a in reservation.allocations.all()} == {at(6) + timedelta(minutes=30)}
    # and the price is locked: 2.50 × 16 GPUs × 4 h
    assert (reservation.unit_price, reservation.total_price, reservation.currency) == (
        Decimal("2.5000"), Decimal("160.00"), "USD")
    # and the first domain that fits (ib-a) is used
    assert {n[0] for n in names} == {"a"}


def test_booking_writes_due_events_and_audit_rows(fleet, tenant, actor, settings):
    # given the scheduler provisions 5 minutes ahead and gives notice 15 minutes before the end
    settings.MARKETPLACE = {**settings.MARKETPLACE, "PROVISION_LEAD_TIME": timedelta(minutes=5),
                            "END_NOTICE_LEAD_TIME": timedelta(minutes=15)}
    reservation = book(tenant, actor).reservation
    events = {e.kind: e.due_at for e in reservation.events.all()}
    assert events == {"start": at(2) - timedelta(minutes=5), "end_notice": at(6) - timedelta(minutes=15),
                      "end": at(6)}
    actions = list(AuditLog.objects.filter(object_id=str(reservation.pk)).order_by("id").values_list("action", flat=True))
    assert actions == ["reservation.create", "reservation.confirmed"]


def test_gpus_must_be_whole_nodes(fleet, tenant, actor):
    with pytest.raises(InvalidInput) as refused:
        book(tenant, actor, gpus=12)
    assert "multiple of 8 (e.g. 8 or 16)" in refused.value.message and refused.value.code == "not_whole_nodes"
    # less than one node: the one suggestion is one node
    with pytest.raises(InvalidInput) as refused:
        book(tenant, actor, gpus=4)
    assert refused.value.message.endswith("multiple of 8 (e.g. 8).")
    assert not Reservation.objects.exists()


def test_extending_a_window_that_is_over_says_so(fleet, tenant, actor, frozen):
    # given a confirmed booking whose window has passed (its pool was never provisioned)
    reservation = book(tenant, actor).reservation
    frozen.move_to(at(6))
    # when it is extended, then the refusal names the end that has passed, not its status
    with pytest.raises(IllegalTransition) as refused:
        services.reservation_extend(actor=actor, reservation=reservation, end=at(8))
    assert "window ended at 2026-12-01 14:00 UTC" in refused.value.message
    assert "confirmed reservation cannot" not in refused.value.message


def test_spanning_domains_only_when_allowed(fleet, tenant, actor):
    # 5 nodes: no domain has 5, the cluster has 6
    spread = book(tenant, actor, gpus=40).reservation
    assert len(nodes_of(spread)) == 5
    with pytest.raises(InsufficientCapacity):
        book(tenant, actor, gpus=40, start=at(10), end=at(12), same_domain=True)


def test_all_or_nothing_when_capacity_is_short(fleet, tenant, actor):
    with pytest.raises(InsufficientCapacity) as refused:
        book(tenant, actor, gpus=56)  # 7 nodes, 6 exist
    assert refused.value.http_status == 409 and refused.value.code == "insufficient_capacity"
    assert "you asked for 7" in refused.value.message
    assert not Reservation.objects.exists() and not Allocation.objects.exists()


def test_cleaning_gap_keeps_the_next_booking_off_a_node(fleet, tenant, actor):
    # given all six nodes booked until +6h
    book(tenant, actor, gpus=48)
    # then a booking starting at the end is refused (the nodes are being cleaned)...
    with pytest.raises(InsufficientCapacity):
        book(tenant, actor, gpus=8, start=at(6), end=at(8))
    # ...and one starting after the gap succeeds
    assert book(tenant, actor, gpus=8, start=at(6.5), end=at(8)).created


@pytest.mark.parametrize("change", [{"status": Node.Status.MAINTENANCE}, {"status": Node.Status.OFFLINE},
                                    {"status": Node.Status.RETIRED}, {"health": Node.Health.UNHEALTHY}])
def test_unusable_nodes_are_never_booked(fleet, tenant, actor, change):
    Node.objects.exclude(name="a0").update(**change)
    with pytest.raises(InsufficientCapacity):
        book(tenant, actor)
    assert nodes_of(book(tenant, actor, gpus=8).reservation) == ["a0"]


def test_maintenance_window_blocks_overlapping_bookings(fleet, tenant, actor):
    for node in Node.objects.all():
        MaintenanceWindow.objects.create(node=node, starts_at=at(5), ends_at=at(9))
    with pytest.raises(InsufficientCapacity):
        book(tenant, actor, gpus=8)
    # a cancelled window no longer blocks
    MaintenanceWindow.objects.filter(node__name="a1").update(cancelled_at=NOW)
    assert nodes_of(book(tenant, actor, gpus=8).reservation) == ["a1"]


# --- policies -------------------------------------------------------------------------------------

@pytest.mark.parametrize("window,code", [
    ({"start": at(2) + timedelta(minutes=5)}, "misaligned"),
    ({"end": at(2.5)}, "too_short"),
    ({"end": at(2) + timedelta(days=91)}, "too_long"),
    ({"start": at(24 * 181), "end": at(24 * 181 + 2)}, "too_far_ahead"),
])
def test_window_policies_refuse_tenants_but_not_ops(fleet, tenant, actor, staff_user, window, code):
    with pytest.raises(PolicyViolation) as refused:
        book(tenant, actor, gpus=8, **window)
    assert refused.value.code == code
    assert not Reservation.objects.exists()
    # ops may override
    assert services.reservation_create(actor=Actor.for_user(staff_user), tenant=tenant, gpu_model="H100-SXM-80GB",
                                       gpus=8, enforce_policies=False, **({"start": at(2), "end": at(6)} | window)).created


def test_start_in_the_past_is_refused(fleet, tenant, actor):
    with pytest.raises(InvalidInput):
        book(tenant, actor, start=at(-1), end=at(2))


def test_start_omitted_means_the_current_slot(fleet, tenant, actor):
    reservation = book(tenant, actor, start=None, end=at(2)).reservation
    assert reservation.starts_at == NOW


def test_quota_counts_concurrent_gpus(fleet, tenant, actor):
    tenant.gpu_quota = 24
    tenant.save()
    book(tenant, actor, gpus=16, start=at(2), end=at(6))
    # a disjoint window is fine; an overlapping one would hold 32 GPUs at once
    assert book(tenant, actor, gpus=16, start=at(8), end=at(10)).created
    with pytest.raises(QuotaExceeded) as refused:
        book(tenant, actor, gpus=16, start=at(5), end=at(9))
    assert "quota is 24" in refused.value.message


def test_quota_counts_the_busiest_instant_and_touching_bookings_as_disjoint(fleet, tenant, actor):
    # given a tenant holding 16 GPUs in [2, 4) and 16 more in [4, 7), back to back, with a quota of 32
    tenant.gpu_quota = 32
    tenant.save()
    book(tenant, actor, gpus=16, start=at(2), end=at(4))
    book(tenant, actor, gpus=16, start=at(4), end=at(7))
    # when it books 16 across the boundary, it holds 32 at most: allowed
    assert book(tenant, actor, gpus=16, start=at(3), end=at(5)).created
    # then 8 more in [6, 8) meet only the second booking (24 at once): allowed
    assert book(tenant, actor, gpus=8, start=at(6), end=at(8)).created
    # and 8 more in [1, 4) would hold 40 in [3, 4): refused, with the peak named
    with pytest.raises(QuotaExceeded) as refused:
        book(tenant, actor, gpus=8, start=at(1), end=at(4))
    assert "hold 40 GPUs at once" in refused.value.message


@pytest.mark.parametrize("standing", [{"billing_status": "past_due"}, {"billing_status": "suspended"},
                                      {"is_active": False}])
def test_tenants_in_bad_standing_cannot_book(fleet, tenant, actor, standing):
    for key, value in standing.items():
        setattr(tenant, key, value)
    tenant.save()
    with pytest.raises(TenantCannotBook) as refused:
        book(tenant, actor)
    assert refused.value.http_status == 403
    assert not Reservation.objects.exists()


# --- idempotency ----------------------------------------------------------------------------------

def test_same_key_same_body_returns_the_first_booking(fleet, tenant, actor):
    first = book(tenant, actor, idempotency_key="k-1")
    again = book(tenant, actor, idempotency_key="k-1")
    assert first.created and not again.created
    assert again.reservation.pk == first.reservation.pk
    assert Reservation.objects.count() == 1 and Allocation.objects.count() == 2


def test_same_key_different_body_is_refused(fleet, tenant, actor):
    book(tenant, actor, idempotency_key="k-1")
    with pytest.raises(IdempotencyKeyReused):
        book(tenant, actor, idempotency_key="k-1", gpus=8)
    assert Reservation.objects.count() == 1


def test_keys_are_per_tenant(fleet, tenant, other_tenant, actor):
    book(tenant, actor, idempotency_key="k-1", gpus=8)
    assert book(other_tenant, actor, idempotency_key="k-1", gpus=8).created


# --- cancel, extend, release ------------------------------------------------------------------------

def test_cancel_before_start_frees_nodes_and_events(fleet, tenant, actor):
    reservation = book(tenant, actor, gpus=48).reservation
    services.reservation_cancel(actor=actor, reservation=reservation)
    reservation.refresh_from_db()
    assert reservation.status == "cancelled"
    assert set(reservation.allocations.values_list("state", flat=True)) == {"cancelled"}
    assert set(reservation.events.values_list("status", flat=True)) == {"cancelled"}
    assert book(tenant, actor, gpus=48).created  # the nodes are free again


def test_cancel_once_the_pool_is_provisioning_is_refused_for_release(fleet, tenant, actor, frozen):
    reservation = book(tenant, actor).reservation
    services.reservation_transition(reservation=reservation, to="provisioning", actor=Actor.task("scheduler"))
    frozen.move_to(at(3))
    with pytest.raises(IllegalTransition, match="release it instead"):
        services.reservation_cancel(actor=actor, reservation=reservation)
    assert Reservation.objects.get().status == "provisioning"


def test_a_window_that_began_before_its_pool_can_be_cancelled_not_released(fleet, tenant, actor, frozen):
    # Given a booking for now (its start is the current slot, already begun), not yet picked up by
    # the scheduler
    frozen.move_to(at(0) + timedelta(minutes=7))
    reservation = book(tenant, actor, start=None, end=at(2)).reservation
    assert reservation.status == "confirmed" and reservation.starts_at == at(0)
    # When the tenant changes its mind, release says to cancel, and cancelling works
    with pytest.raises(IllegalTransition, match="cancel it instead"):
        services.reservation_release(actor=actor, reservation=reservation)
    services.reservation_cancel(actor=actor, reservation=reservation)
    # Then the nodes and events are freed, as for any cancellation
    reservation.refresh_from_db()
    assert reservation.status == "cancelled"
    assert set(reservation.allocations.values_list("state", flat=True)) == {"cancelled"}
    assert set(reservation.events.values_list("status", flat=True)) == {"cancelled"}


def test_extend_on_the_same_nodes_reprices_and_moves_events(fleet, tenant, actor):
    reservation = book(tenant, actor).reservation
    services.reservation_extend(actor=actor, reservation=reservation, end=at(8))
    reservation.refresh_from_db()
    assert reservation.ends_at == at(8) and reservation.total_price == Decimal("240.00")
    assert set(reservation.allocations.values_list("blocked_until", flat=True)) == {at(8.5)}
    assert reservation.events.get(kind="end").due_at == at(8)
    assert AuditLog.objects.filter(action="reservation.extend", object_id=str(reservation.pk)).exists()


def test_extend_is_refused_when_a_node_is_taken_later(fleet, tenant, other_tenant, actor):
    reservation = book(tenant, actor).reservation
    mine = nodes_of(reservation)
    # another tenant takes the whole cluster right after our cleaning gap
    assert book(other_tenant, actor, gpus=48, start=at(6.5), end=at(9)).created
    with pytest.raises(InsufficientCapacity) as refused:
        services.reservation_extend(actor=actor, reservation=reservation, end=at(8))
    assert mine[0] in refused.value.message
    reservation.refresh_from_db()
    assert reservation.ends_at == at(6) and reservation.total_price == Decimal("160.00")
    assert set(reservation.allocations.values_list("blocked_until", flat=True)) == {at(6.5)}


def test_release_early_trims_and_moves_to_releasing(fleet, tenant, actor, frozen):
    reservation = book(tenant, actor).reservation
    services.reservation_transition(reservation=reservation, to="provisioning", actor=Actor.task("t"))
    services.reservation_transition(reservation=reservation, to="active", actor=Actor.task("t"))
    frozen.move_to(at(3) + timedelta(minutes=7))
    services.reservation_release(actor=actor, reservation=reservation)
    reservation.refresh_from_db()
    assert reservation.status == "releasing"
    assert reservation.ends_at == at(3.25) and reservation.total_price == Decimal("50.00")
    assert set(reservation.allocations.values_list("blocked_until", flat=True)) == {at(3.75)}
    end = reservation.events.get(kind="end")
    assert end.due_at == at(3) + timedelta(minutes=7) and end.status == "pending"
    assert reservation.events.get(kind="end_notice").status == "cancelled"


def test_a_release_while_the_pool_is_provisioning_before_the_start_costs_nothing(fleet, tenant, actor, frozen):
    # Given a booking from 10:00 whose pool the scheduler began provisioning at 09:50 (not cancellable)
    reservation = book(tenant, actor).reservation
    frozen.move_to(at(2) - timedelta(minutes=10))
    services.reservation_transition(reservation=reservation, to="provisioning", actor=Actor.task("t"))
    # When the tenant releases it at 09:55
    frozen.move_to(at(2) - timedelta(minutes=5))
    services.reservation_release(actor=actor, reservation=reservation)
    # Then nothing is owed for it; the window keeps its first slot, which the scheduler drains now
    reservation.refresh_from_db()
    assert reservation.status == "releasing" and reservation.total_price == Decimal("0.00")
    assert reservation.ends_at == at(2.25) and reservation.events.get(kind="end").due_at == at(2) - timedelta(minutes=5)


def test_release_before_start_is_refused(fleet, tenant, actor):
    reservation = book(tenant, actor).reservation
    with pytest.raises(IllegalTransition):
        services.reservation_release(actor=actor, reservation=reservation)


@pytest.mark.parametrize("path,illegal", [((), "active"), (("cancelled",), "confirmed"),
                                           (("provisioning", "active", "releasing", "completed"), "active")])
def test_transitions_outside_the_table_are_refused(fleet, tenant, actor, path, illegal):
    reservation = book(tenant, actor).reservation
    for step in path:
        services.reservation_transition(reservation=reservation, to=step, actor=Actor.task("t"))
    before = Reservation.objects.get().status
    with pytest.raises(IllegalTransition):
        services.reservation_transition(reservation=reservation, to=illegal, actor=Actor.task("t"))
    assert Reservation.objects.get().status == before
