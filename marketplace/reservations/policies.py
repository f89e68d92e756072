"""Booking policies: the window rules every tenant booking obeys, and the tenant's own limits.

Each check raises a ServiceError subclass with a message a person can act on; ops (staff) may
override the policy checks (``enforce=False``) but never the input checks (a window that ends
before it starts, a start in the past, GPUs that are not whole nodes).
"""

from datetime import datetime, timedelta
from datetime import timezone as dt_timezone

from django.conf import settings
from django.utils import timezone

from marketplace.core.exceptions import InvalidInput, PolicyViolation, PermissionDenied

EPOCH = datetime(1970, 1, 1, tzinfo=dt_timezone.utc)
# An input bound, not a policy (ops cannot override it): no window, horizon or calendar reaches
# further from now than this, which keeps every date sum of the engine far from the year 9999.
FARTHEST = timedelta(days=3650)


class TenantCannotBook(PermissionDenied):
    code = "tenant_cannot_book"


class QuotaExceeded(PolicyViolation):
    code = "quota_exceeded"


def policy(name: str):
    return settings.MARKETPLACE[name]


def granularity() -> timedelta:
    return policy("BOOKING_GRANULARITY")


def _minutes(delta: timedelta) -> str:
    minutes = int(delta.total_seconds() // 60)
    if minutes % (24 * 60) == 0:
        return f"{minutes // (24 * 60)} days"
    if minutes % 60 == 0:
        return f"{minutes // 60} h"
    return f"{minutes} min"


def floor_to_granularity(moment: datetime) -> datetime:
    step = granularity()
    return moment - ((moment - EPOCH) % step)


def ceil_to_granularity(moment: datetime) -> datetime:
    floored = floor_to_granularity(moment)
    return floored if floored == moment else floored + granularity()


def is_aligned(moment: datetime) -> bool:
    return (moment - EPOCH) % granularity() == timedelta(0)


def resolve_start(start: datetime | None, *, now: datetime | None = None) -> datetime:
    """``start`` omitted means now: the current granularity slot (it has already begun)."""
    return start if start is not None else floor_to_granularity(now or timezone.now())


def check_window(*, start: datetime, end: datetime, enforce: bool = True, now: datetime | None = None,
                 extending: bool = False) -> None:
    """Input and policy checks of a booking window [start, end)."""
    now = now or timezone.now()
    if timezone.is_naive(start) or timezone.is_naive(end):
        raise InvalidInput("Times must carry a timezone (e.g. 2026-12-01T09:00:00Z).")
    if end <= start:
        raise InvalidInput("The window must end after it starts.", fields={"end": ["must be after start"]})
    if not extending and start < floor_to_granularity(now):
        raise InvalidInput("The window cannot start in the past.", fields={"start": ["is in the past"]})
    if end - now > FARTHEST:
        raise InvalidInput(f"The window must end within {_minutes(FARTHEST)} from now.",
                           fields={"end": ["too far in the future"]})
    if not enforce:
        return
    step = granularity()
    misaligned = {name: [f"must be on a {_minutes(step)} boundary"]
                  for name, value in (("start", start), ("end", end)) if not is_aligned(value)}
    if misaligned:
        raise PolicyViolation(
            f"Reservation boundaries must be on {_minutes(step)} boundaries (e.g. 09:00, 09:15).",
            code="misaligned", fields=misaligned,
        )
    duration = end - start
    if duration < policy("MIN_DURATION"):
        raise PolicyViolation(f"A reservation lasts at least {_minutes(policy('MIN_DURATION'))}.",
                              code="too_short", fields={"end": ["window too short"]})
    if duration > policy("MAX_DURATION"):
        raise PolicyViolation(f"A reservation lasts at most {_minutes(policy('MAX_DURATION'))}.",
                              code="too_long", fields={"end": ["window too long"]})
    if not extending and start - now > policy("MAX_LEAD_TIME"):
        raise PolicyViolation(f"Reservations can start at most {_minutes(policy('MAX_LEAD_TIME'))} ahead.",
                              code="too_far_ahead", fields={"start": ["too far in the future"]})


def check_gpus(*, gpus: int, gpus_per_node: int, model_name: str) -> int:
    """Whole nodes only: returns the number of nodes ``gpus`` means."""
    if gpus <= 0:
        raise InvalidInput("Ask for at least one node's worth of GPUs.", fields={"gpus": ["must be positive"]})
    if gpus % gpus_per_node:
        below, above = gpus - gpus % gpus_per_node, gpus - gpus % gpus_per_node + gpus_per_node
        raise InvalidInput(
            f"{model_name} is rented in whole nodes of {gpus_per_node} GPUs: ask for a multiple of "
            f"{gpus_per_node} (e.g. {f'{below} or {above}' if below else above}).",
            code="not_whole_nodes", fields={"gpus": [f"must be a multiple of {gpus_per_node}"]},
        )
    return gpus // gpus_per_node


def check_tenant_standing(*, tenant, enforce: bool = True) -> None:
    if not enforce or tenant.can_book:
        return
    if not tenant.is_active:
        raise TenantCannotBook(f"Tenant {tenant.slug} is inactive and cannot book.")
    raise TenantCannotBook(
        f"Tenant {tenant.slug} cannot book while its billing status is "
        f"{tenant.get_billing_status_display().lower()}: settle the account or contact support."
    )


def peak_concurrent_gpus(periods: list[tuple[datetime, datetime, int]]) -> int:
    """Highest sum of GPUs held at one instant by half-open periods (start, end, gpus)."""
    edges: list[tuple[datetime, int]] = []
    for start, end, gpus in periods:
        edges.append((start, gpus))
        edges.append((end, -gpus))
    # At equal instants ends sort before starts: [a, b) and [b, c) do not overlap.
    edges.sort(key=lambda edge: (edge[0], edge[1]))
    peak = current = 0
    for _, delta in edges:
        current += delta
        peak = max(peak, current)
    return peak


def held_peak_gpus(*, held: list[tuple[datetime, datetime, int]], start: datetime, end: datetime) -> int:
    """Most GPUs these held periods (start, end, gpus) hold at one instant within [start, end)."""
    return peak_concurrent_gpus([(max(s, start), min(e, end), g) for s, e, g in held if s < end and e > start])


def check_quota(*, tenant, held_peak: int, gpus: int, enforce: bool = True) -> None:
    """The tenant's concurrent GPUs over a window stay within its quota with ``gpus`` more held
    over the whole window; ``held_peak`` is the most it already holds at one instant in it."""
    if not enforce:
        return
    # The request spans the whole window, so it adds to every instant, the busiest one included.
    peak = held_peak + gpus
    if peak > tenant.gpu_quota:
        raise QuotaExceeded(
            f"This would hold {peak} GPUs at once; tenant {tenant.slug}'s quota is {tenant.gpu_quota} concurrent GPUs.",
            fields={"gpus": [f"quota {tenant.gpu_quota}, peak would be {peak}"]},
        )
