"""The pools API: a tenant sees its own pools (another tenant's is a 404); ops see the
scheduler's health and retry failures."""

from datetime import timedelta

import pytest
from django.utils import timezone

from marketplace.reservations.models import Reservation, ReservationEvent
from scheduler import reconcile
from tests.factories import MembershipFactory, NodeFactory
from tests.scheduler.helpers import book, plan_cluster  # noqa: F401 - fixtures

S = Reservation.Status


@pytest.fixture
def active_plan_pool(tenant, plan_cluster):
    reservation = book(tenant=tenant, cluster=plan_cluster, starts_at=timezone.now() - timedelta(minutes=1))
    reconcile.run_due_events()
    reservation.refresh_from_db()
    return reservation


@pytest.mark.django_db
def test_a_tenant_sees_its_pool_and_how_to_use_it(api, active_plan_pool, tenant):
    # when the tenant fetches its pool
    response = api.get(f"/api/v1/pools/{active_plan_pool.pk}/")
    # then it sees the namespace, selector, toleration, nodes, readiness and billing start
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "active" and body["namespace"] == f"tenant-{tenant.slug}"
    assert body["node_selector"] == {"gpu.marketplace.io/tenant": tenant.slug,
                                     "gpu.marketplace.io/pool": active_plan_pool.pool_name}
    assert body["toleration"]["effect"] == "NoSchedule"
    assert len(body["nodes"]) == 2 and body["readiness"]["passed"] is True
    assert body["ready_at"] is not None and body["downtime"] == [] and body["end_notice"] == []
    assert f"namespace: tenant-{tenant.slug}" in body["usage"]["kubeconfig"]
    assert "nodeSelector" in body["usage"]["pod_spec"]
    # and the plan-only operations, clearly labelled
    assert body["plan_only"] is True
    assert body["planned_operations"]["label"] == "plan only — no cluster configured"
    assert {op["kind"] for op in body["planned_operations"]["operations"]} == {"Node"}
    # and the list shows it
    listed = api.get("/api/v1/pools/").json()["results"]
    assert [row["reservation_id"] for row in listed] == [str(active_plan_pool.pk)]


@pytest.mark.django_db
def test_another_tenants_pool_is_invisible(api_client_for, active_plan_pool, other_tenant):
    stranger = MembershipFactory(tenant=other_tenant).user
    client = api_client_for(stranger, other_tenant)
    assert client.get(f"/api/v1/pools/{active_plan_pool.pk}/").status_code == 404
    assert client.get("/api/v1/pools/").json()["results"] == []
    assert client.get("/api/v1/pools/not-a-uuid/").status_code == 404


@pytest.mark.django_db
def test_ops_endpoints_are_staff_only(api, active_plan_pool):
    assert api.get("/api/v1/ops/scheduler/").status_code == 403
    assert api.post(f"/api/v1/ops/scheduler/{active_plan_pool.pk}/retry/").status_code == 403


@pytest.mark.django_db
def test_ops_see_overdue_events_and_failures_and_retry(api_client_for, staff_user, plan_cluster):
    ops = api_client_for(staff_user)
    # given an overdue start event and a failed reservation
    overdue = book(cluster=plan_cluster, starts_at=timezone.now() + timedelta(minutes=5))
    ReservationEvent.objects.filter(reservation=overdue, kind="start").update(
        due_at=timezone.now() - timedelta(minutes=5))
    failed = book(cluster=plan_cluster, nodes=[NodeFactory(cluster=plan_cluster)],
                  starts_at=timezone.now() + timedelta(hours=1))
    from marketplace.pools import services

    services.reservation_fail(reservation_id=failed.pk, reason="403 Forbidden", now=timezone.now())
    # when ops look at the scheduler's health
    body = ops.get("/api/v1/ops/scheduler/").json()
    # then both are there
    assert body["ok"] is False
    assert [e["reservation_id"] for e in body["overdue_events"]] == [str(overdue.pk)]
    assert [r["id"] for r in body["failed_reservations"]] == [str(failed.pk)]
    # when ops retry the failed one, it is confirmed again
    response = ops.post(f"/api/v1/ops/scheduler/{failed.pk}/retry/")
    assert response.status_code == 200 and response.json()["status"] == "confirmed"
    # and retrying a reservation that is not failed is a clear 409
    again = ops.post(f"/api/v1/ops/scheduler/{failed.pk}/retry/")
    assert again.status_code == 409 and again.json()["error"]["code"] == "not_failed"
    # and an unknown one a 404
    assert ops.post("/api/v1/ops/scheduler/00000000-0000-0000-0000-000000000000/retry/").status_code == 404


@pytest.mark.django_db
def test_a_tenant_is_told_which_booked_nodes_ops_took_out_of_service_until_they_are_back(
        api, client, tenant, member, plan_cluster, staff_user):
    # given a booking of two nodes of the tenant that has not started
    from marketplace.core.models import AuditLog
    from marketplace.core.services import Actor
    from marketplace.inventory import services as inventory
    from marketplace.inventory.models import Node

    ops = Actor.for_user(staff_user)
    reservation = book(tenant=tenant, cluster=plan_cluster, starts_at=timezone.now() + timedelta(hours=2))
    first, second = [allocation.node for allocation in reservation.allocations.order_by("node__name")]

    def notices():
        body = api.get(f"/api/v1/pools/{reservation.pk}/").json()
        assert body["end_notice"] == []  # the end notice is another kind
        return [notice["message"] for notice in body["notices"]]

    # when ops retire one node with force, then the notice names it and says what happens next
    inventory.node_bulk_set_status(actor=ops, node_ids=[first.pk], status=Node.Status.RETIRED, force=True)
    [message] = notices()
    assert f"{first.name} (retired)" in message and "replaces such a node with a free one" in message
    # and the tenant's pool page shows it, and its audit log says who
    client.force_login(member)
    assert f"{first.name} (retired)" in client.get(f"/pools/{reservation.pk}/").content.decode()
    assert AuditLog.objects.get(action="reservation.node_withdrawn_notice").actor == f"user:{staff_user.username}"
    # when ops also plan maintenance of the other one in the window (times given in another offset),
    # then the one notice names both, with the maintenance in UTC
    starts = (reservation.starts_at + timedelta(hours=1)).astimezone(timezone.get_fixed_timezone(120))
    inventory.maintenance_window_create(actor=ops, node=second, starts_at=starts, ends_at=starts + timedelta(hours=1),
                                        force=True)
    [message] = notices()
    utc = reservation.starts_at + timedelta(hours=1)
    assert f"{first.name} (retired)" in message
    assert f"{second.name} (maintenance {utc:%Y-%m-%d %H:%M} – {utc + timedelta(hours=1):%Y-%m-%d %H:%M} UTC)" in message
    # when the same status is set again, nothing is written
    rows = AuditLog.objects.filter(action="reservation.node_withdrawn_notice").count()
    inventory.node_bulk_set_status(actor=ops, node_ids=[first.pk], status=Node.Status.RETIRED, force=True)
    assert AuditLog.objects.filter(action="reservation.node_withdrawn_notice").count() == rows
    # when ops undo both, then the notice says the nodes are back
    inventory.node_bulk_set_status(actor=ops, node_ids=[first.pk], status=Node.Status.AVAILABLE)
    window = second.maintenance_windows.get()
    inventory.maintenance_window_cancel(actor=ops, window_id=window.pk)
    assert notices() == ["The nodes of this reservation that ops had taken out of service are back in service."]


@pytest.mark.django_db
def test_a_cancelled_booking_gets_no_notice(api, tenant, plan_cluster, staff_user):
    from marketplace.core.services import Actor
    from marketplace.inventory import services as inventory
    from marketplace.inventory.models import Node
    from marketplace.reservations import services as reservations

    reservation = book(tenant=tenant, cluster=plan_cluster, starts_at=timezone.now() + timedelta(hours=2))
    node = reservation.allocations.first().node
    reservations.reservation_cancel(actor=Actor.task("t"), reservation=reservation)
    inventory.node_bulk_set_status(actor=Actor.for_user(staff_user), node_ids=[node.pk], status=Node.Status.RETIRED,
                                   force=True)
    assert api.get(f"/api/v1/pools/{reservation.pk}/").json()["notices"] == []
