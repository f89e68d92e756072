"""The one money rule of the booking engine.

A reservation's total is ``unit price per GPU-hour × GPUs × hours`` computed exactly in Decimal
(hours = seconds / 3600, multiplied before dividing so no precision is lost), then quantised once
to cents with ROUND_HALF_UP. The currency always travels with the amount. Never float.
"""

from dataclasses import dataclass
from datetime import timedelta
from decimal import ROUND_HALF_UP, Decimal

CENT = Decimal("0.01")


@dataclass(frozen=True)
class Money:
    amount: Decimal
    currency: str

    def __str__(self) -> str:
        return f"{self.amount} {self.currency}"


def quantize_cents(amount: Decimal) -> Decimal:
    return amount.quantize(CENT, rounding=ROUND_HALF_UP)


def reservation_total(*, unit_price: Decimal, gpus: int, duration: timedelta) -> Decimal:
    """Total for ``gpus`` GPUs over ``duration`` at ``unit_price`` per GPU-hour, in cents (HALF_UP)."""
    if not isinstance(unit_price, Decimal):
        raise TypeError("unit_price must be a Decimal")
    seconds = Decimal(int(duration.total_seconds()))
    return quantize_cents(unit_price * gpus * seconds / Decimal(3600))
