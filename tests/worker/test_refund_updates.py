"""``apply_stripe_refund``: the one place our refunds follow Stripe's, on real Postgres."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.domain.models import Refund, RefundEvent, RefundStatus, new_id
from shared.services.refund_updates import apply_stripe_refund
from shared.services.refunds import stripe_idempotency_key
from tests.support import seed_payment


def _pending_refund(db: Session, *, amount: int = 1_000) -> Refund:
    payment, charge = seed_payment(db)
    assert charge is not None
    refund_id = new_id("rf")
    refund = Refund(
        id=refund_id, payment_id=payment.id, charge_id=charge.id, amount=amount,
        currency="usd", status=RefundStatus.PENDING,
        stripe_idempotency_key=stripe_idempotency_key(refund_id), initiated_by="ops@example.com",
    )
    db.add(refund)
    db.commit()
    return refund


def _stripe(refund: Refund, status: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": extra.pop("id", f"re_{refund.id}"), "object": "refund", "amount": refund.amount,
        "currency": "usd", "charge": refund.charge_id, "status": status,
        "metadata": {"refund_id": refund.id}, **extra,
    }


def _trail(db: Session, refund_id: str) -> list[tuple[str | None, str, str]]:
    rows = db.scalars(
        select(RefundEvent).where(RefundEvent.refund_id == refund_id).order_by(RefundEvent.id)
    )
    return [(e.from_status, e.to_status, e.actor) for e in rows]


def test_stripe_pending_then_succeeded_moves_forward_and_stores_the_stripe_id(db: Session) -> None:
    refund = _pending_refund(db)
    assert apply_stripe_refund(db, _stripe(refund, "pending"), actor="worker") == refund.id
    db.commit()
    assert apply_stripe_refund(db, _stripe(refund, "succeeded"), actor="webhook") == refund.id
    db.commit()
    db.refresh(refund)
    assert (refund.status, refund.stripe_refund_id) == ("succeeded", f"re_{refund.id}")
    assert _trail(db, refund.id) == [
        ("pending", "processing", "worker"), ("processing", "succeeded", "webhook")
    ]


def test_late_or_repeated_updates_never_move_a_refund_backwards(db: Session) -> None:
    refund = _pending_refund(db)
    apply_stripe_refund(db, _stripe(refund, "succeeded"), actor="worker")
    db.commit()
    for status in ("pending", "requires_action", "succeeded", "canceled"):
        apply_stripe_refund(db, _stripe(refund, status), actor="webhook")
        db.commit()
    db.refresh(refund)
    assert refund.status == "succeeded"
    assert _trail(db, refund.id) == [("pending", "succeeded", "worker")]


def test_succeeded_refund_that_fails_later_is_failed_with_stripes_reason(db: Session) -> None:
    refund = _pending_refund(db)
    apply_stripe_refund(db, _stripe(refund, "succeeded"), actor="worker")
    apply_stripe_refund(
        db, _stripe(refund, "failed", failure_reason="expired_or_canceled_card"), actor="webhook"
    )
    db.commit()
    db.refresh(refund)
    assert refund.status == "failed"
    assert refund.failure_reason == "refund_failed: expired_or_canceled_card"
    assert _trail(db, refund.id)[-1] == ("succeeded", "failed", "webhook")


def test_found_by_stripe_id_when_metadata_is_missing(db: Session) -> None:
    refund = _pending_refund(db)
    apply_stripe_refund(db, _stripe(refund, "pending"), actor="worker")
    db.commit()
    found = apply_stripe_refund(db, _stripe(refund, "succeeded", metadata={}), actor="webhook")
    assert found == refund.id
    db.commit()
    db.refresh(refund)
    assert refund.status == "succeeded"


def test_refund_made_in_stripes_dashboard_is_recorded_once_and_counts(db: Session) -> None:
    payment, charge = seed_payment(db, amount=5_000)
    assert charge is not None
    external = {
        "id": new_id("re"), "object": "refund", "amount": 1_500, "currency": "usd",
        "charge": charge.id, "payment_intent": payment.stripe_payment_intent_id,
        "status": "succeeded", "metadata": {}, "reason": "requested_by_customer",
    }
    first = apply_stripe_refund(db, external, actor="webhook")
    db.commit()
    again = apply_stripe_refund(db, external, actor="reconciler")
    db.commit()
    assert first is not None and first == again
    rows = list(db.scalars(select(Refund).where(Refund.payment_id == payment.id)))
    assert [(r.amount, r.status, r.initiated_by, r.stripe_refund_id) for r in rows] == [
        (1_500, "succeeded", "stripe", external["id"])
    ]
    assert _trail(db, first) == [(None, "succeeded", "stripe")]


def test_refund_of_a_payment_we_do_not_hold_is_ignored(db: Session) -> None:
    unknown = {
        "id": new_id("re"), "amount": 100, "currency": "usd", "charge": "ch_nobody",
        "payment_intent": "pi_nobody", "status": "succeeded", "metadata": {},
    }
    assert apply_stripe_refund(db, unknown, actor="webhook") is None
    db.commit()
    assert db.scalar(select(Refund).where(Refund.stripe_refund_id == unknown["id"])) is None


def test_a_second_stripe_refund_for_one_refund_is_recorded_not_merged(db: Session) -> None:
    refund = _pending_refund(db)
    apply_stripe_refund(db, _stripe(refund, "succeeded"), actor="worker")
    second = _stripe(refund, "succeeded", id=new_id("re"))
    other = apply_stripe_refund(db, second, actor="reconciler")
    db.commit()
    db.refresh(refund)
    assert other is not None and other != refund.id
    assert refund.stripe_refund_id == f"re_{refund.id}"
    recorded = db.get(Refund, other)
    assert recorded is not None and recorded.initiated_by == "stripe"
