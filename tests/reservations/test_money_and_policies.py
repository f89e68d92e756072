from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from marketplace.core.exceptions import InvalidInput, PolicyViolation
from marketplace.reservations import money, policies


def test_total_is_unit_times_gpus_times_hours_rounded_half_up_to_cents():
    # given a price whose one GPU-hour total is a half cent
    total = money.reservation_total(unit_price=Decimal("1.0050"), gpus=1, duration=timedelta(hours=1))
    # then the half cent rounds up
    assert total == Decimal("1.01")
    assert money.reservation_total(unit_price=Decimal("2.4900"), gpus=16, duration=timedelta(minutes=75)) == Decimal("49.80")


def test_total_refuses_floats():
    with pytest.raises(TypeError):
        money.reservation_total(unit_price=2.5, gpus=8, duration=timedelta(hours=1))


def test_alignment_helpers_round_to_the_granularity():
    moment = datetime(2026, 12, 1, 9, 7, 30, tzinfo=UTC)
    assert policies.floor_to_granularity(moment) == datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
    assert policies.ceil_to_granularity(moment) == datetime(2026, 12, 1, 9, 15, tzinfo=UTC)
    assert policies.is_aligned(datetime(2026, 12, 1, 9, 45, tzinfo=UTC))


def test_peak_concurrency_treats_touching_periods_as_disjoint():
    t = datetime(2026, 12, 1, tzinfo=UTC)
    h = timedelta(hours=1)
    assert policies.peak_concurrent_gpus([(t, t + h, 8), (t + h, t + 2 * h, 8)]) == 8
    assert policies.peak_concurrent_gpus([(t, t + 2 * h, 8), (t + h, t + 3 * h, 16)]) == 24


@pytest.mark.parametrize("start_minute,end_minute,code", [(5, 60, "misaligned"), (0, 30, "too_short")])
def test_window_policy_refusals(start_minute, end_minute, code):
    now = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
    start = now + timedelta(hours=1, minutes=start_minute)
    with pytest.raises(PolicyViolation) as refused:
        policies.check_window(start=start, end=now + timedelta(hours=1, minutes=end_minute), now=now)
    assert refused.value.code == code and refused.value.http_status == 422


def test_window_in_the_past_is_invalid_even_for_ops():
    now = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
    with pytest.raises(InvalidInput):
        policies.check_window(start=now - timedelta(hours=1), end=now + timedelta(hours=1), now=now, enforce=False)


def test_the_current_slot_counts_as_now():
    now = datetime(2026, 12, 1, 8, 7, tzinfo=UTC)
    start = policies.resolve_start(None, now=now)
    assert start == datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
    policies.check_window(start=start, end=start + timedelta(hours=2), now=now)  # no error
