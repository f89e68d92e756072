"""The pool page (tenant-scoped) and the ops scheduler-health page (staff only, with retry)."""

from datetime import timedelta

import pytest
from django.utils import timezone

from marketplace.pools import services
from marketplace.reservations.models import Reservation
from scheduler import reconcile
from tests.factories import MembershipFactory
from tests.scheduler.helpers import book, plan_cluster  # noqa: F401 - fixtures

S = Reservation.Status


@pytest.mark.django_db
def test_the_tenant_sees_its_pool_page_and_nobody_else_does(client, member, tenant, other_tenant, plan_cluster):
    reservation = book(tenant=tenant, cluster=plan_cluster, starts_at=timezone.now() - timedelta(minutes=1))
    reconcile.run_due_events()
    client.force_login(member)
    page = client.get(f"/pools/{reservation.pk}/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "plan only — no cluster configured" in html and f"tenant-{tenant.slug}" in html
    assert reservation.pool_name in html and "Active" in html
    client.force_login(MembershipFactory(tenant=other_tenant).user)
    assert client.get(f"/pools/{reservation.pk}/").status_code == 404


@pytest.mark.django_db
def test_ops_scheduler_page_lists_failures_and_retries_them(client, member, staff_user, plan_cluster):
    reservation = book(cluster=plan_cluster, starts_at=timezone.now() + timedelta(hours=1))
    services.reservation_fail(reservation_id=reservation.pk, reason="403 Forbidden", now=timezone.now())
    client.force_login(member)
    assert client.get("/ops/scheduler/").status_code == 403  # signed in, not staff: as every ops page
    client.force_login(staff_user)
    page = client.get("/ops/scheduler/").content.decode()
    assert str(reservation.pk) in page and "403 Forbidden" in page and "Needs attention" in page
    response = client.post(f"/ops/scheduler/{reservation.pk}/retry/", follow=True)
    assert "confirmed again" in response.content.decode()
    reservation.refresh_from_db()
    assert reservation.status == S.CONFIRMED
    again = client.post(f"/ops/scheduler/{reservation.pk}/retry/", follow=True).content.decode()
    assert "Only a failed reservation can be retried" in again
