"""Property tests for the refund-amount rules (``shared.domain.rules``): whatever the history of
a payment, refunds never add up to more than was captured."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from shared.domain.errors import AlreadyRefunded, AmountExceedsRefundable
from shared.domain.models import RELEASED_STATUSES, RefundStatus
from shared.domain.rules import amount_to_refund, refundable_left

PROPERTY = hypothesis_settings(max_examples=400, database=None, deadline=None)

HOLDING = [s for s in RefundStatus if s not in RELEASED_STATUSES]
captured_amounts = st.integers(min_value=0, max_value=2**53)
statuses = st.sampled_from(list(RefundStatus))
refund_rows = st.lists(st.tuples(st.integers(min_value=1, max_value=2**40), statuses), max_size=30)
# A request: an amount in cents, or None for "full".
requests = st.none() | st.integers(min_value=1, max_value=20_000)


@PROPERTY
@given(captured=captured_amounts, refunds=refund_rows)
def test_left_is_never_negative_and_never_exceeds_captured(captured, refunds) -> None:
    left = refundable_left(captured, refunds)
    assert 0 <= left <= captured


@PROPERTY
@given(captured=captured_amounts, refunds=refund_rows)
def test_left_is_captured_minus_what_holding_refunds_hold(captured, refunds) -> None:
    held = sum(amount for amount, status in refunds if status in HOLDING)
    assert refundable_left(captured, refunds) == max(captured - held, 0)


@PROPERTY
@given(
    captured=captured_amounts,
    refunds=refund_rows,
    amount=st.integers(min_value=1, max_value=2**40),
    status=st.sampled_from(list(RELEASED_STATUSES)),
)
def test_failed_and_canceled_refunds_release_their_amount(
    captured, refunds, amount, status
) -> None:
    assert refundable_left(captured, [*refunds, (amount, status)]) == refundable_left(
        captured, refunds
    )


@PROPERTY
@given(captured=captured_amounts, refunds=refund_rows, status=st.sampled_from(HOLDING))
def test_pending_and_later_refunds_hold_their_amount(captured, refunds, status) -> None:
    left = refundable_left(captured, refunds)
    if left > 0:
        taken = (left + 1) // 2
        assert refundable_left(captured, [*refunds, (taken, status)]) == left - taken


@PROPERTY
@given(left=st.integers(min_value=1, max_value=2**53))
def test_full_takes_exactly_what_is_left(left) -> None:
    assert amount_to_refund(left=left, amount_cents=None, currency="usd") == left


@PROPERTY
@given(request=requests)
def test_nothing_left_refuses_every_request(request) -> None:
    with pytest.raises(AlreadyRefunded):
        amount_to_refund(left=0, amount_cents=request, currency="usd")


@PROPERTY
@given(
    left=st.integers(min_value=1, max_value=2**53), amount=st.integers(min_value=1, max_value=2**53)
)
def test_an_amount_is_taken_as_asked_or_refused_with_what_is_left(left, amount) -> None:
    if amount <= left:
        assert amount_to_refund(left=left, amount_cents=amount, currency="eur") == amount
    else:
        with pytest.raises(AmountExceedsRefundable) as refused:
            amount_to_refund(left=left, amount_cents=amount, currency="eur")
        assert refused.value.left == left
        assert str(left) in refused.value.message


@PROPERTY
@given(
    captured=st.integers(min_value=0, max_value=50_000),
    history=st.lists(st.tuples(requests, statuses), max_size=40),
)
def test_any_sequence_of_accepted_refunds_stays_within_captured(captured, history) -> None:
    """Replay a payment's life: requests arrive one by one (as the row lock serializes
    them), each accepted refund later ends in some status, failed ones free money up."""
    refunds: list[tuple[int, str]] = []
    for request, final_status in history:
        left = refundable_left(captured, refunds)
        try:
            amount = amount_to_refund(left=left, amount_cents=request, currency="usd")
        except (AlreadyRefunded, AmountExceedsRefundable):
            continue
        assert 0 < amount <= left
        refunds.append((amount, RefundStatus.PENDING))
        held = sum(a for a, s in refunds if s not in RELEASED_STATUSES)
        assert held <= captured
        refunds[-1] = (amount, final_status)
    held = sum(a for a, s in refunds if s not in RELEASED_STATUSES)
    assert held <= captured
    assert refundable_left(captured, refunds) == captured - held
