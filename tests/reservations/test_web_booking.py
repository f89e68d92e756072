"""Tenant booking pages: search, book, list, detail, cancel/extend/release — errors are messages."""

from datetime import timedelta

import pytest
from django.test import Client

from marketplace.reservations.models import Reservation
from tests.factories import MembershipFactory
from tests.reservations.conftest import at

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("frozen", "fleet")]

SEARCH = {"gpu_model": "H100-SXM-80GB", "gpus": 16, "start": "2026-12-01T10:00", "end": "2026-12-01T14:00",
          "region": "", "same_domain": "on"}


@pytest.fixture
def browser(member):
    client = Client(enforce_csrf_checks=True)
    client.force_login(member)
    return client


def csrf(client, url="/reservations/search/"):
    client.get(url)
    return client.cookies["csrftoken"].value


def messages_of(response):
    return [str(m) for m in response.context["messages"]]


def test_search_shows_offers_with_price(browser):
    page = browser.get("/reservations/search/", SEARCH)
    assert page.status_code == 200
    assert b"east-1" in page.content and b"160.00 USD" in page.content


def test_book_from_the_page_then_see_it_listed_and_detailed(browser):
    token = csrf(browser)
    response = browser.post("/reservations/book/", SEARCH | {"region": "us-east", "csrfmiddlewaretoken": token},
                            follow=True)
    reservation = Reservation.objects.get()
    assert response.status_code == 200 and "Booked 16 GPUs for 160.00 USD." in messages_of(response)
    names = sorted(reservation.allocations.values_list("node__name", flat=True))
    assert ", ".join(names).encode() in response.content
    listing = browser.get("/reservations/")
    assert str(reservation.pk).encode() in listing.content


def test_double_submitted_book_button_books_once(browser):
    page = browser.get("/reservations/search/", SEARCH)
    key = page.context["idempotency_key"]
    token = browser.cookies["csrftoken"].value
    for _ in range(2):
        browser.post("/reservations/book/", SEARCH | {"idempotency_key": key, "csrfmiddlewaretoken": token})
    assert Reservation.objects.count() == 1


def test_each_region_offer_can_be_booked_from_the_page(browser, fleet):
    # given a second, dearer region with its own H100 cluster
    from decimal import Decimal

    from tests.factories import ClusterFactory, GpuPriceFactory, NodeFactory, RegionFactory

    west = RegionFactory(code="eu-west", name="EU West")
    GpuPriceFactory(gpu_model=fleet.model, region=west, price_per_gpu_hour=Decimal("3.0000"))
    west_cluster = ClusterFactory(name="west-1", region=west)
    for index in range(2):
        NodeFactory(name=f"w{index}", cluster=west_cluster, gpu_model=fleet.model, topology_domain="ib-w")
    # when the tenant searches, then both regions' offers carry a Book button with its own key
    page = browser.get("/reservations/search/", SEARCH)
    assert page.content.count(b">Book</button>") == 2
    key = page.context["idempotency_key"]
    assert f'value="{key}-eu-west"'.encode() in page.content
    # and booking the dearer region's offer books there
    token = browser.cookies["csrftoken"].value
    browser.post("/reservations/book/", SEARCH | {"region": "eu-west", "idempotency_key": f"{key}-eu-west",
                                                 "csrfmiddlewaretoken": token})
    assert Reservation.objects.get().cluster == west_cluster


def test_search_page_shows_the_capacity_calendar(browser):
    # given 48 H100 GPUs, of which a booking holds 16 from 10:00 to 14:00 today (plus the cleaning gap),
    # booked by this tenant after the page (and with it the shared calendar) was first shown
    token = csrf(browser)
    browser.post("/reservations/book/", SEARCH | {"region": "us-east", "csrfmiddlewaretoken": token})
    # when the tenant opens the booking page
    page = browser.get("/reservations/search/")
    # then the calendar, counted again for them, shows free GPUs per half day from the start of today:
    # both of today's halves overlap the booking, tomorrow is all free
    free = [bucket.free_gpus for bucket in page.context["calendar"]["H100-SXM-80GB"]]
    assert free[:3] == [32, 32, 48] and len(free) == 14
    assert b"Free GPUs, next 7 days" in page.content
    # and says when it was counted: the calendar is shared for up to a minute
    assert f"Counted at {page.context['calendar_as_of']:%H:%M:%S} UTC".encode() in page.content


def test_book_without_csrf_is_refused(browser):
    assert browser.post("/reservations/book/", SEARCH).status_code == 403
    assert not Reservation.objects.exists()


def test_errors_are_messages_not_500s(browser):
    token = csrf(browser)
    response = browser.post("/reservations/book/", SEARCH | {"gpus": 12, "csrfmiddlewaretoken": token}, follow=True)
    assert response.status_code == 200 and any("multiple of 8" in m for m in messages_of(response))
    response = browser.post("/reservations/book/", SEARCH | {"gpus": 64, "csrfmiddlewaretoken": token}, follow=True)
    assert any("you asked for 8" in m for m in messages_of(response))
    # more GPUs than a database integer: a message, not a 500 (PostgreSQL refused the value)
    response = browser.post("/reservations/book/", SEARCH | {"gpus": 2**32, "csrfmiddlewaretoken": token},
                            follow=True)
    assert response.status_code == 200 and any("gpus:" in m for m in messages_of(response))
    response = browser.get("/reservations/search/", SEARCH | {"start": "2026-12-01T10:05"})
    assert response.status_code == 200 and any("boundaries" in m for m in messages_of(response))
    assert not Reservation.objects.exists()


def test_cancel_and_extend_from_the_detail_page(browser):
    token = csrf(browser)
    browser.post("/reservations/book/", SEARCH | {"csrfmiddlewaretoken": token})
    reservation = Reservation.objects.get()
    extended = browser.post(f"/reservations/{reservation.pk}/extend/",
                            {"end": "2026-12-01T16:00", "csrfmiddlewaretoken": token}, follow=True)
    assert "Reservation extended." in messages_of(extended)
    # a refused extension says why and keeps the end that was asked for in the form
    refused = browser.post(f"/reservations/{reservation.pk}/extend/",
                           {"end": "2027-12-01T14:00", "csrfmiddlewaretoken": token}, follow=True)
    assert any("at most" in m for m in messages_of(refused))
    assert refused.context["extend_form"]["end"].value() == "2027-12-01T14:00"
    assert b'value="2027-12-01T14:00"' in refused.content
    refused = browser.post(f"/reservations/{reservation.pk}/release/", {"csrfmiddlewaretoken": token}, follow=True)
    assert any("cancel it instead" in m for m in messages_of(refused))
    browser.post(f"/reservations/{reservation.pk}/cancel/", {"csrfmiddlewaretoken": token})
    reservation.refresh_from_db()
    assert reservation.status == "cancelled" and reservation.ends_at == at(8)


def test_a_search_for_now_books_from_when_book_is_pressed(browser, frozen):
    # Given a search with the start left empty (now: 08:05, so the 08:00 slot)
    frozen.move_to(at(0) + timedelta(minutes=5))
    page = browser.get("/reservations/search/", SEARCH | {"start": ""})
    assert page.context["result"].start == at(0)
    assert b'<input type="hidden" name="start" value="">' in page.content  # the Book form's
    # When Book is pressed after the next slot has begun (the form posts the start it was given: none)
    frozen.move_to(at(0) + timedelta(minutes=16))
    token = browser.cookies["csrftoken"].value
    response = browser.post("/reservations/book/", SEARCH | {"start": "", "csrfmiddlewaretoken": token}, follow=True)
    # Then it books from the current slot instead of refusing a start in the past
    assert any(m.startswith("Booked 16 GPUs") for m in messages_of(response)), messages_of(response)
    assert Reservation.objects.get().starts_at == at(0) + timedelta(minutes=15)


def test_a_refused_booking_says_why_once(browser, frozen):
    # Given a search with an explicit start, whose Book is pressed after that start has passed
    token = csrf(browser)
    frozen.move_to(at(2) + timedelta(minutes=20))
    response = browser.post("/reservations/book/", SEARCH | {"csrfmiddlewaretoken": token}, follow=True)
    # Then the search page it goes back to says so once, not again from its own check
    assert messages_of(response) == ["The window cannot start in the past."]
    assert not Reservation.objects.exists()


def test_other_tenants_reservation_pages_are_not_reachable(browser, other_tenant):
    stranger = MembershipFactory(tenant=other_tenant).user
    theirs = Client()
    theirs.force_login(stranger)
    theirs.post("/reservations/book/", SEARCH)
    reservation = Reservation.objects.get()
    assert browser.get(f"/reservations/{reservation.pk}/", follow=True).redirect_chain[-1][0] == "/reservations/"
    token = csrf(browser)
    browser.post(f"/reservations/{reservation.pk}/cancel/", {"csrfmiddlewaretoken": token})
    reservation.refresh_from_db()
    assert reservation.status == "confirmed"


def test_viewers_cannot_book(tenant):
    viewer = MembershipFactory(tenant=tenant, role="viewer").user
    client = Client()
    client.force_login(viewer)
    response = client.post("/reservations/book/", SEARCH, follow=True)
    assert any("Viewers cannot" in m for m in messages_of(response))
    assert not Reservation.objects.exists()


def test_the_reservation_list_pages_through_every_reservation_in_a_fixed_number_of_queries(
        browser, tenant, django_assert_max_num_queries):
    # given 55 reservations of the tenant, one a day, and one of another tenant
    from tests.factories import ReservationFactory

    for day in range(55):
        ReservationFactory(tenant=tenant, starts_at=at(24 * day), ends_at=at(24 * day + 4))
    ReservationFactory()
    # when the list is opened, then it shows the 50 newest, says how many there are, and links on
    with django_assert_max_num_queries(12):
        first = browser.get("/reservations/")
    assert len(first.context["rows"]) == 50 and "Page 1 of 2 (55 reservations)" in first.content.decode()
    assert 'href="?page=2"' in first.content.decode()
    # and the second page holds the 5 oldest, which the list could not reach before
    second = browser.get("/reservations/", {"page": 2})
    assert [r.starts_at for r, _ in second.context["rows"]] == [at(24 * day) for day in (4, 3, 2, 1, 0)]
    # and a filter is kept from page to page
    assert 'href="?status=confirmed&page=2"' in browser.get("/reservations/", {"status": "confirmed"}).content.decode()


def test_the_detail_page_links_to_the_pool_and_offers_viewers_no_actions(browser, tenant):
    # given a booking made from the page
    token = csrf(browser)
    browser.post("/reservations/book/", SEARCH | {"region": "us-east", "csrfmiddlewaretoken": token})
    reservation = Reservation.objects.get()
    # then its page links to its pool page, which opens, and offers its member the actions
    page = browser.get(f"/reservations/{reservation.pk}/").content.decode()
    assert f'href="/pools/{reservation.pk}/"' in page and "Release now" in page
    assert browser.get(f"/pools/{reservation.pk}/").status_code == 200
    # and a viewer of the tenant sees the page without buttons it could not use
    viewer = Client()
    viewer.force_login(MembershipFactory(tenant=tenant, role="viewer").user)
    page = viewer.get(f"/reservations/{reservation.pk}/").content.decode()
    assert str(reservation.pk) in page and "Release now" not in page and "Extend" not in page


def test_staff_acting_for_no_tenant_are_told_so_once(browser, staff_user):
    # given a booking of a tenant, and an ops user who is a member of no tenant
    token = csrf(browser)
    browser.post("/reservations/book/", SEARCH | {"region": "us-east", "csrfmiddlewaretoken": token})
    reservation = Reservation.objects.get()
    ops = Client()
    ops.force_login(staff_user)
    # when they post a cancel for it, then one message says why nothing happened
    response = ops.post(f"/reservations/{reservation.pk}/cancel/", follow=True)
    assert messages_of(response) == ["You act for no tenant, so there is nothing of yours to change here."]
    reservation.refresh_from_db()
    assert reservation.status == "confirmed"
