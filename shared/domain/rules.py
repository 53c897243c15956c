"""Pure refund-amount rules: what is left on a payment and how much a request takes.

Kept free of I/O so the property tests can hammer them. Every refund the API initiates is
recorded by the database's ``initiate_refund`` (migration 0015), which applies them in SQL
under the payment's row lock, one round trip per request; tests/test_initiate_function.py
checks that it takes and refuses exactly what these take and refuse."""

from __future__ import annotations

from collections.abc import Iterable

from shared.domain.errors import AlreadyRefunded, AmountExceedsRefundable
from shared.domain.models import RELEASED_STATUSES


def refundable_left(captured: int, refunds: Iterable[tuple[int, str]]) -> int:
    """Captured amount minus every refund that still holds money (pending ones count)."""
    held = sum(amount for amount, status in refunds if status not in RELEASED_STATUSES)
    return max(captured - held, 0)


def amount_to_refund(*, left: int, amount_cents: int | None, currency: str) -> int:
    """The amount a request refunds: ``amount_cents``, or everything left when it is None."""
    if left <= 0:
        raise AlreadyRefunded("This payment has nothing left to refund.")
    if amount_cents is None:
        return left
    if amount_cents > left:
        raise AmountExceedsRefundable(requested=amount_cents, left=left, currency=currency)
    return amount_cents
