"""The booking benchmark runs end to end at a tiny size and finds no double or partial bookings."""

import json
from io import StringIO

import pytest
from django.core.management import call_command

from marketplace.reservations.models import Allocation


@pytest.mark.postgres_only
@pytest.mark.django_db(transaction=True)
def test_benchmark_booking_reports_figures_and_no_double_bookings():
    out = StringIO()
    call_command("benchmark", "booking", "--nodes", "64", "--reservations", "256", "--searches", "5",
                 "--bookings", "16", "--floor-seconds", "0.2", stdout=out)
    figures = json.loads(out.getvalue()[out.getvalue().index("{\n"):])
    assert figures["nodes"] == 64 and figures["reservations"] == 256
    assert figures["double_bookings"] == 0 and figures["partial_bookings"] == 0 and figures["server_errors"] == 0
    assert {"p50_ms", "p95_ms", "p99_ms", "sql_floor_p95_ms"} <= set(figures["search"])
    assert set(figures["bookings"]) == {"1", "4", "16"}
    assert sum(level["booked"] for level in figures["bookings"].values()) > 0
    assert Allocation.objects.count() >= 256
