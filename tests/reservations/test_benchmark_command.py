"""The booking benchmark runs end to end at a tiny size and finds no double or partial bookings."""

import json
import os
import subprocess
import sys
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command
from django.db import connection

from marketplace.reservations.models import Allocation

REPO = Path(__file__).resolve().parents[2]
TINY = ["--nodes", "64", "--reservations", "256", "--searches", "5", "--earliest", "2", "--bookings", "16",
        "--busy-bookings", "6", "--floor-seconds", "0.2"]


def figures_of(output: str) -> dict:
    return json.loads(output[output.index("{\n"):])


@pytest.mark.postgres_only
@pytest.mark.django_db(transaction=True)
def test_benchmark_booking_reports_figures_and_no_double_bookings():
    out = StringIO()
    # thread clients only: the test process has other threads alive, and must not fork
    call_command("benchmark", "booking", *TINY, "--clients", "threads", stdout=out)
    figures = figures_of(out.getvalue())
    assert figures["nodes"] == 64 and figures["reservations"] == 256
    assert figures["double_bookings"] == 0 and figures["partial_bookings"] == 0 and figures["server_errors"] == 0
    assert {"p50_ms", "p95_ms", "p99_ms", "sql_floor_p95_ms"} <= set(figures["search"])
    assert figures["earliest"]["searches"] == 2 and {"found", "p50_ms", "max_ms"} <= set(figures["earliest"])
    assert figures["capacity"]["buckets"] == 2 * 14 * 24 and figures["capacity"]["ms"] > 0
    busy = figures["busy_bookings"]
    assert busy["bookings"] == 6 and busy["booked"] + busy["refused"] == 6 and busy["server_errors"] == 0
    assert 0 < busy["p50_ms"] <= busy["p95_ms"] <= busy["max_ms"]
    assert set(figures["bookings"]) == {"1", "4", "16"}
    assert sum(level["booked"] for level in figures["bookings"].values()) > 0
    # each level is the median of three runs, each on its own week
    assert all(len(level["runs_per_s"]) == 3 for level in figures["bookings"].values())
    assert figures["bookings"]["16"]["bookings_per_s"] == sorted(figures["bookings"]["16"]["runs_per_s"])[1]
    # the target compares each round's booking run with the floor measured in the same round
    floors16 = figures["insert_floor_runs_tx_per_s"]["16"]
    assert len(floors16) == 3 and figures["insert_floor_tx_per_s"]["16"] == sorted(floors16)[1]
    ratios = sorted(rate / floor for rate, floor in zip(figures["bookings"]["16"]["runs_per_s"], floors16))
    assert figures["targets"]["bookings16_over_insert_floor_16_clients"] == round(ratios[1], 3)
    assert Allocation.objects.count() >= 256


def test_benchmark_refuses_more_runs_than_the_lead_time_policy_allows():
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="lead-time"):
        call_command("benchmark", "booking", *TINY, "--repeat", "9", stdout=StringIO())


@pytest.mark.postgres_only
@pytest.mark.django_db(transaction=True)
def test_benchmark_booking_with_process_clients():
    # given a clean, single-threaded process (the command as an operator runs it) on the test database
    s = connection.settings_dict
    url = f"postgres://{s['USER']}@{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}/{s['NAME']}"
    env = {**os.environ, "DJANGO_ENV": "test", "DATABASE_URL": url}
    result = subprocess.run([sys.executable, "manage.py", "benchmark", "booking", *TINY, "--clients", "processes"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = figures_of(result.stdout)
    # then forked clients booked, with nothing double- or half-booked
    assert set(figures["processes"]["bookings"]) == {"1", "4", "16"}
    assert sum(level["booked"] for level in figures["processes"]["bookings"].values()) > 0
    assert figures["double_bookings"] == 0 and figures["partial_bookings"] == 0 and figures["server_errors"] == 0


@pytest.mark.timeout(60)
def test_a_client_that_fails_before_the_start_ends_the_run_with_its_error():
    from marketplace.reservations import benchmark

    # given four thread clients, the second of which fails while warming up
    def warm_up(index):
        if index == 1:
            raise ValueError("client 1 could not book its warm-up")

    # when they run, then the run ends with that client's error, not with the others waiting for it
    with pytest.raises(RuntimeError, match="client 1 could not book its warm-up"):
        benchmark._in_threads(4, work=lambda index: index, warm_up=warm_up)
    # and a failure inside the measured work is raised the same way
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        benchmark._in_threads(4, work=lambda index: 1 / (index - 2), warm_up=lambda index: None)
