"""Refunds end to end on real processes: API -> Redis -> celery worker -> Stripe emulator."""

from __future__ import annotations

import httpx
from sqlalchemy.orm import Session

from tests.support import auth
from tests.worker.conftest import (
    INITIATOR,
    Stack,
    seed_payments,
    stripe_refunds_per_id,
    trail,
    wait_for_statuses,
)


def test_refund_posted_to_the_api_is_sent_to_stripe_once_and_succeeds(
    stack: Stack, db: Session, settings
) -> None:
    charges = seed_payments(stack, db, 3, amount=5_000)
    ids = []
    for charge_id in charges:
        response = httpx.post(
            f"{stack.api_url}/v1/admin/refunds",
            json={"charge_id": charge_id, "amount_cents": 1_200, "reason": "requested_by_customer"},
            headers=auth(settings, sub=INITIATOR),
            timeout=10,
        )
        assert response.status_code == 201, response.text
        assert response.json()["status"] == "pending"
        ids.append(response.json()["refund_id"])

    rows = wait_for_statuses(db, ids, "succeeded", timeout=15)

    assert stripe_refunds_per_id(stack, ids) == {i: 1 for i in ids}
    for refund_id, refund in rows.items():
        stripe_refund = stack.admin.refunds(refund_id)[0]
        assert refund.stripe_refund_id == stripe_refund["id"]
        assert stripe_refund["amount"] == 1_200
        assert stripe_refund["reason"] == "requested_by_customer"
        assert refund.attempts == 1
        # Whichever records Stripe's answer first, the worker or the refund.created
        # webhook, moves it; the other finds nothing left to do.
        [created, moved] = trail(db, refund_id)
        assert created == (None, "pending", INITIATOR)
        assert moved in {("pending", "succeeded", "worker"), ("pending", "succeeded", "webhook")}
    body = httpx.get(
        f"{stack.api_url}/v1/admin/refunds/{ids[0]}", headers=auth(settings), timeout=10
    ).json()
    assert body["status"] == "succeeded"
    assert body["stripe_refund_id"].startswith("re_")
