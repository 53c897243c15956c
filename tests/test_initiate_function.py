"""The database's ``initiate_refund`` (migration 0015), which records every refund the API
initiates, applies the rules of ``shared.domain.rules`` (property-tested on their own in
tests/test_rules.py): whatever the payment's history, it takes what they take and
refuses what they refuse, on a real Postgres."""

from __future__ import annotations

import psycopg
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from shared.domain.errors import AlreadyRefunded, AmountExceedsRefundable
from shared.domain.models import Refund, RefundStatus, new_id
from shared.domain.rules import amount_to_refund, refundable_left
from shared.services.refunds import RefundRequest, initiate_refund
from tests.support import seed_payment

PROPERTY = hypothesis_settings(
    max_examples=60, database=None, deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
REFUSALS = (AlreadyRefunded, AmountExceedsRefundable)


@PROPERTY
@given(
    captured=st.integers(min_value=0, max_value=50_000),
    history=st.lists(
        st.tuples(st.integers(min_value=1, max_value=20_000), st.sampled_from(list(RefundStatus))),
        max_size=6,
    ),
    request=st.none() | st.integers(min_value=1, max_value=60_000),
)
def test_the_database_takes_what_the_rules_take_and_refuses_what_they_refuse(
    db, settings, captured, history, request
) -> None:
    payment, charge = seed_payment(db, amount=captured)
    for amount, status in history:
        refund_id = new_id("rf")
        db.add(Refund(id=refund_id, payment_id=payment.id, charge_id=charge.id, amount=amount,
                      currency="usd", status=status, stripe_idempotency_key=f"refund-{refund_id}",
                      initiated_by="history@example.com"))
    db.commit()
    try:
        expected: object = amount_to_refund(
            left=refundable_left(captured, history), amount_cents=request, currency="usd")
    except REFUSALS as refusal:
        expected = (type(refusal), refusal.message)

    with psycopg.connect(settings.libpq_url, autocommit=True) as connection:
        try:
            got: object = initiate_refund(
                connection, request=RefundRequest(charge.id, request, None),
                initiated_by="rules@example.com", idempotency_key=None, fingerprint="",
            ).body["amount_cents"]
        except REFUSALS as refusal:
            got = (type(refusal), refusal.message)

    assert got == expected
    recorded = db.scalar(select(func.count()).where(
        Refund.payment_id == payment.id, Refund.initiated_by == "rules@example.com"))
    assert recorded == (0 if isinstance(expected, tuple) else 1)
