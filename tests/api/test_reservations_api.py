"""The booking API: shapes, errors, idempotency, tenant isolation, no N+1."""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from marketplace.core.services import Actor
from marketplace.reservations import services
from marketplace.reservations.models import Allocation, Reservation
from tests.factories import MembershipFactory
from tests.reservations.conftest import at, fleet, frozen  # noqa: F401 - fixtures

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("frozen", "fleet")]

BODY = {"gpu_model": "H100-SXM-80GB", "gpus": 16, "start": "2026-12-01T10:00:00Z", "end": "2026-12-01T14:00:00Z"}


def assert_error(response, status, code=None):
    assert response.status_code == status, response.content
    error = response.json()["error"]
    assert set(error) == {"code", "message", "fields"} and error["message"]
    if code:
        assert error["code"] == code
    return error


def test_book_returns_the_reservation(api):
    response = api.post("/api/v1/reservations/", BODY, format="json")
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["status"] == "confirmed" and len(body["nodes"]) == 2
    assert body["nodes"] == sorted(Allocation.objects.values_list("node__name", flat=True))
    assert (body["cluster"], body["region"], body["gpu_model"], body["gpus"]) == ("east-1", "us-east", "H100-SXM-80GB", 16)
    assert (body["unit_price"], body["total_price"], body["currency"]) == ("2.5000", "160.00", "USD")
    assert body["start"] == "2026-12-01T10:00:00Z" and body["end"] == "2026-12-01T14:00:00Z"
    assert body["readiness"] is None and body["ready_at"] is None and "status_reason" in body
    assert api.get(f"/api/v1/reservations/{body['id']}/").json() == body


def test_no_capacity_is_409_insufficient_capacity(api):
    error = assert_error(api.post("/api/v1/reservations/", BODY | {"gpus": 64}, format="json"), 409,
                         "insufficient_capacity")
    assert "asked for 8" in error["message"]
    assert not Reservation.objects.exists()


@pytest.mark.parametrize("body,status,code", [
    ({"gpus": 12}, 400, "not_whole_nodes"),
    ({"gpus": "many"}, 400, "invalid"),
    ({"gpus": -8}, 400, "invalid"),
    ({"gpu_model": "Z80"}, 400, "unknown_gpu_model"),
    ({"region": "moon"}, 400, "unknown_region"),
    ({"end": "not a time"}, 400, "invalid"),
    ({"end": "2026-12-01T09:00:00Z"}, 400, "invalid"),
    ({"start": "2026-12-01T10:05:00Z"}, 422, "misaligned"),
    ({"end": "2026-12-01T10:30:00Z"}, 422, "too_short"),
    ({"start": "2026-11-30T10:00:00Z"}, 400, "invalid"),
])
def test_bad_create_input_is_a_clear_4xx_and_writes_nothing(api, body, status, code):
    assert_error(api.post("/api/v1/reservations/", BODY | body, format="json"), status, code)
    assert not Reservation.objects.exists() and not Allocation.objects.exists()


def test_missing_fields_are_named(api):
    error = assert_error(api.post("/api/v1/reservations/", {}, format="json"), 400, "invalid")
    assert {"gpu_model", "gpus", "end"} <= set(error["fields"])


def test_idempotency_key_replays_and_refuses_a_different_body(api):
    first = api.post("/api/v1/reservations/", BODY, format="json", HTTP_IDEMPOTENCY_KEY="abc")
    again = api.post("/api/v1/reservations/", BODY, format="json", HTTP_IDEMPOTENCY_KEY="abc")
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"] and again["Idempotent-Replayed"] == "true"
    assert_error(api.post("/api/v1/reservations/", BODY | {"gpus": 8}, format="json", HTTP_IDEMPOTENCY_KEY="abc"),
                 422, "idempotency_key_reused")
    assert Reservation.objects.count() == 1


def test_cancel_extend_release_through_the_api(api, frozen):
    rid = api.post("/api/v1/reservations/", BODY, format="json").json()["id"]
    extended = api.post(f"/api/v1/reservations/{rid}/extend/", {"end": "2026-12-01T16:00:00Z"}, format="json")
    assert extended.status_code == 200 and extended.json()["total_price"] == "240.00"
    assert_error(api.post(f"/api/v1/reservations/{rid}/extend/", {"end": "soon"}, format="json"), 400, "invalid")
    assert_error(api.post(f"/api/v1/reservations/{rid}/extend/", {"end": "2026-12-01T12:00:00Z"}, format="json"), 400)
    assert_error(api.post(f"/api/v1/reservations/{rid}/release/"), 409, "illegal_transition")
    cancelled = api.post(f"/api/v1/reservations/{rid}/cancel/")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert_error(api.post(f"/api/v1/reservations/{rid}/cancel/"), 409, "illegal_transition")


def test_release_of_an_active_reservation(api, frozen, member):
    rid = api.post("/api/v1/reservations/", BODY, format="json").json()["id"]
    reservation = Reservation.objects.get(pk=rid)
    for step in ("provisioning", "active"):
        services.reservation_transition(reservation=reservation, to=step, actor=Actor.task("scheduler"))
    frozen.move_to(at(3))
    released = api.post(f"/api/v1/reservations/{rid}/release/").json()
    assert released["status"] == "releasing" and released["end"] == "2026-12-01T11:00:00Z"


def test_other_tenants_reservations_are_invisible(api, api_client_for, other_tenant):
    stranger = MembershipFactory(tenant=other_tenant).user
    theirs = api_client_for(stranger, other_tenant).post("/api/v1/reservations/", BODY, format="json").json()["id"]
    assert api.get("/api/v1/reservations/").json()["results"] == []
    for method, url in [("get", ""), ("post", "cancel/"), ("post", "extend/"), ("post", "release/")]:
        response = getattr(api, method)(f"/api/v1/reservations/{theirs}/{url}", {"end": "2026-12-01T16:00:00Z"},
                                        format="json")
        assert_error(response, 404, "not_found")
    assert Reservation.objects.get(pk=theirs).status == "confirmed"
    assert Reservation.objects.get(pk=theirs).ends_at == at(6)


def test_viewers_cannot_write(api_client_for, tenant):
    viewer = MembershipFactory(tenant=tenant, role="viewer").user
    client = api_client_for(viewer, tenant)
    assert_error(client.post("/api/v1/reservations/", BODY, format="json"), 403)
    assert client.get("/api/v1/reservations/").status_code == 200
    assert not Reservation.objects.exists()


def test_list_filters_and_has_no_n_plus_1(api, tenant, member):
    actor = Actor.for_user(member)
    for hours in (2, 8, 14):
        services.reservation_create(actor=actor, tenant=tenant, gpu_model="H100-SXM-80GB", gpus=16,
                                    start=at(hours), end=at(hours + 4))
    first = Reservation.objects.order_by("starts_at").first()
    services.reservation_cancel(actor=actor, reservation=first)
    api.get("/api/v1/reservations/")  # the token's first use of the minute records last_used_at
    with CaptureQueriesContext(connection) as three:
        assert len(api.get("/api/v1/reservations/").json()["results"]) == 3
    services.reservation_create(actor=actor, tenant=tenant, gpu_model="H100-SXM-80GB", gpus=48,
                                start=at(20), end=at(24))
    with CaptureQueriesContext(connection) as four:
        assert len(api.get("/api/v1/reservations/").json()["results"]) == 4
    assert len(four) == len(three)
    assert len(api.get("/api/v1/reservations/", {"status": "cancelled"}).json()["results"]) == 1
    window = {"start": "2026-12-01T17:00:00Z", "end": "2026-12-01T23:00:00Z"}
    assert [r["start"] for r in api.get("/api/v1/reservations/", window).json()["results"]] == [
        "2026-12-01T22:00:00Z", "2026-12-01T16:00:00Z"]
    assert_error(api.get("/api/v1/reservations/", {"status": "nope"}), 400, "invalid")


def test_availability_endpoint(api):
    response = api.get("/api/v1/availability/", {"gpu_model": "H100-SXM-80GB", "gpus": 16,
                                                 "start": "2026-12-01T10:00:00Z", "end": "2026-12-01T14:00:00Z",
                                                 "same_domain": "true"})
    assert response.status_code == 200, response.content
    offer = response.json()["offers"][0]
    assert offer | {"domains": None} == {"region": "us-east", "cluster": "east-1", "nodes": 2, "gpus": 16,
                                          "same_domain": True, "domains": None, "unit_price": "2.5000",
                                          "total_price": "160.00", "currency": "USD",
                                          "start": "2026-12-01T10:00:00Z", "end": "2026-12-01T14:00:00Z"}
    none = api.get("/api/v1/availability/", {"gpu_model": "H100-SXM-80GB", "gpus": 64,
                                             "end": "2026-12-01T14:00:00Z"}).json()
    assert none["offers"] == [] and none["reason"]["code"] == "insufficient_capacity"
    assert none["start"] == "2026-12-01T08:00:00Z"


def test_availability_earliest_and_bad_input(api, member, tenant):
    services.reservation_create(actor=Actor.for_user(member), tenant=tenant, gpu_model="H100-SXM-80GB", gpus=48,
                                start=at(0), end=at(4))
    body = api.get("/api/v1/availability/", {"gpu_model": "H100-SXM-80GB", "gpus": 8, "end": "2026-12-01T10:00:00Z",
                                             "earliest": "true", "horizon": "2d"}).json()
    assert body["start"] == "2026-12-01T12:30:00Z" and body["offers"]
    # a horizon given with an offset is stated back in UTC
    none = api.get("/api/v1/availability/", {"gpu_model": "H100-SXM-80GB", "gpus": 8, "end": "2026-12-01T10:00:00Z",
                                             "earliest": "true", "horizon": "2026-12-01T15:00:00+05:00"}).json()
    assert none["offers"] == [] and "starting before 2026-12-01 10:00 UTC" in none["reason"]["message"]
    assert_error(api.get("/api/v1/availability/", {"gpu_model": "H100-SXM-80GB", "gpus": 8,
                                                   "end": "2026-12-01T10:00:00Z", "earliest": "true",
                                                   "horizon": "soon"}), 400, "invalid")
    assert_error(api.get("/api/v1/availability/", {"gpu_model": "H100-SXM-80GB", "gpus": 8}), 400, "invalid")
    assert_error(api.get("/api/v1/availability/", {"gpu_model": "H100-SXM-80GB", "gpus": 8,
                                                   "end": "2026-12-01T10:10:00Z"}), 422, "misaligned")


def test_capacity_endpoint(api, member, tenant):
    services.reservation_create(actor=Actor.for_user(member), tenant=tenant, gpu_model="H100-SXM-80GB", gpus=16,
                                start=at(1), end=at(2))
    body = api.get("/api/v1/capacity/", {"gpu_model": "H100-SXM-80GB", "start": "2026-12-01T08:00:00Z",
                                         "end": "2026-12-01T12:00:00Z", "step": "1h"}).json()
    series = body["gpu_models"]["H100-SXM-80GB"]
    # the hour before the booking too: its cleaning gap would run into the booking
    assert [b["free_gpus"] for b in series] == [32, 32, 32, 48] and body["step_seconds"] == 3600
    assert body["as_of"].endswith("Z")  # when it was counted: a calendar is shared for up to a minute
    assert_error(api.get("/api/v1/capacity/", {"start": "2026-12-01T08:00:00Z", "end": "2026-12-31T08:00:00Z",
                                               "step": "1m"}), 400, "invalid")
    assert_error(api.get("/api/v1/capacity/", {"start": "2026-12-01T08:00:00Z", "end": "2026-12-01T07:00:00Z"}), 400)


def test_capacity_without_a_step_has_hourly_buckets(api, member, tenant):
    # Given a booking from 09:00 to 10:00
    services.reservation_create(actor=Actor.for_user(member), tenant=tenant, gpu_model="H100-SXM-80GB", gpus=16,
                                start=at(1), end=at(2))
    # When the calendar is asked for without a step
    response = api.get("/api/v1/capacity/", {"gpu_model": "H100-SXM-80GB", "start": "2026-12-01T08:00:00Z",
                                             "end": "2026-12-01T11:00:00Z"})
    # Then the buckets are the documented default of one hour
    assert response.status_code == 200, response.content[:300]
    body = response.json()
    assert body["step_seconds"] == 3600
    assert [(b["start"], b["free_gpus"]) for b in body["gpu_models"]["H100-SXM-80GB"]] == [
        ("2026-12-01T08:00:00Z", 32), ("2026-12-01T09:00:00Z", 32), ("2026-12-01T10:00:00Z", 32)]


def test_anonymous_callers_get_401(client):
    assert client.get("/api/v1/availability/").status_code in (401, 403)
    assert client.post("/api/v1/reservations/", BODY).status_code in (401, 403)


def test_a_misspelt_field_is_refused_not_booked_as_if_it_were_absent(api):
    # Given a booking body whose start is misspelt (without the check it books from now)
    body = {key: value for key, value in BODY.items() if key != "start"} | {"strat": BODY["start"]}
    # When it is posted, then it is refused, naming the field, and nothing is booked
    error = assert_error(api.post("/api/v1/reservations/", body, format="json"), 400, "invalid")
    assert error["fields"] == {"strat": ["Unknown field."]}
    assert not Reservation.objects.exists()
    # And extend, cancel and release refuse fields they do not take, changing nothing
    rid = api.post("/api/v1/reservations/", BODY, format="json").json()["id"]
    assert_error(api.post(f"/api/v1/reservations/{rid}/extend/", {"end": "2026-12-01T16:00:00Z", "force": True},
                          format="json"), 400, "invalid")
    assert_error(api.post(f"/api/v1/reservations/{rid}/cancel/", {"reason": "x"}, format="json"), 400, "invalid")
    assert_error(api.post(f"/api/v1/reservations/{rid}/release/", {"at": "now"}, format="json"), 400, "invalid")
    kept = Reservation.objects.get(pk=rid)
    assert (kept.status, kept.ends_at) == ("confirmed", at(6))


@pytest.mark.parametrize("span", ["99999999999d", "3000000d", "P99999999D", "P9999999999D", "²h", "3651d"])
def test_a_huge_or_odd_span_is_a_400_not_a_500(api, span):
    window = {"start": "2026-12-01T08:00:00Z", "end": "2026-12-02T08:00:00Z"}
    error = assert_error(api.get("/api/v1/capacity/", window | {"step": span}), 400, "invalid")
    assert set(error["fields"]) == {"step"}
    search = {"gpu_model": "H100-SXM-80GB", "gpus": 8, "end": "2026-12-01T10:00:00Z", "earliest": "true"}
    error = assert_error(api.get("/api/v1/availability/", search | {"horizon": span}), 400, "invalid")
    assert set(error["fields"]) == {"horizon"}


@pytest.mark.parametrize("span", ["999999999999999d", "0000000000000000001d"])
def test_a_span_of_many_digits_is_refused_as_too_long_or_read_as_its_value(api, span):
    window = {"start": "2026-12-01T08:00:00Z", "end": "2026-12-02T08:00:00Z"}
    response = api.get("/api/v1/capacity/", window | {"step": span})
    if span.startswith("0"):
        assert response.status_code == 200 and response.json()["step_seconds"] == 86400
    else:
        assert "at most 3650d" in assert_error(response, 400, "invalid")["message"]


def test_a_step_with_a_fraction_of_a_second_is_refused(api):
    window = {"start": "2026-12-01T08:00:00Z", "end": "2026-12-01T09:00:00Z"}
    error = assert_error(api.get("/api/v1/capacity/", window | {"step": "PT90.5S"}), 400, "invalid")
    assert set(error["fields"]) == {"step"}
    assert api.get("/api/v1/capacity/", window | {"step": "PT90S"}).json()["step_seconds"] == 90


def test_far_future_times_are_a_400_for_ops_too(api_client_for, staff_user, tenant):
    # Given ops (who may book outside the tenant policies) with a token of the tenant
    MembershipFactory(tenant=tenant, user=staff_user, role="member")
    ops = api_client_for(staff_user, tenant)
    far = "9999-12-31T23:45:00Z"
    # When windows end near the year 9999, then each is a clear refusal, and nothing is booked
    assert_error(api_client_for(staff_user, tenant).get(
        "/api/v1/availability/", {"gpu_model": "H100-SXM-80GB", "gpus": 8, "end": far}), 400, "invalid")
    assert_error(ops.post("/api/v1/reservations/", BODY | {"end": far}, format="json"), 400, "invalid")
    rid = ops.post("/api/v1/reservations/", BODY, format="json").json()["id"]
    assert_error(ops.post(f"/api/v1/reservations/{rid}/extend/", {"end": far}, format="json"), 400, "invalid")
    assert_error(ops.get("/api/v1/capacity/", {"start": "9999-12-31T00:00:00Z", "end": far}), 400, "invalid")
    assert Reservation.objects.get().ends_at == at(6)


def test_a_time_without_a_utc_offset_is_refused_not_read_as_utc(api, frozen):
    # given times a caller wrote in its own local time, with no offset
    naive = {"start": "2026-12-01T10:00:00", "end": "2026-12-01T14:00:00"}
    # when they book, search, page or read the calendar with them, then each is a 400 naming the field
    for response, field in (
        (api.post("/api/v1/reservations/", {"gpu_model": "H100-SXM-80GB", "gpus": 8, **naive}, format="json"), "start"),
        (api.get("/api/v1/availability/", {"gpu_model": "H100-SXM-80GB", "gpus": 8, **naive}), "start"),
        (api.get("/api/v1/capacity/", naive), "start"),
        (api.get("/api/v1/reservations/", {"start": naive["start"]}), "start"),
    ):
        error = assert_error(response, 400, "invalid")
        assert field in error["fields"] and "must carry a timezone" in str(error["fields"][field])
    assert not Reservation.objects.exists()
    # and an extension's end the same
    booked = api.post("/api/v1/reservations/", {"gpu_model": "H100-SXM-80GB", "gpus": 8,
                                                "start": "2026-12-01T10:00:00Z", "end": "2026-12-01T14:00:00Z"},
                      format="json").json()
    error = assert_error(api.post(f"/api/v1/reservations/{booked['id']}/extend/", {"end": "2026-12-01T16:00:00"},
                                  format="json"), 400, "invalid")
    assert "must carry a timezone" in str(error["fields"]["end"])
