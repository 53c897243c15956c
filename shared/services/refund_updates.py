"""The one place that moves our refund to match what Stripe says about it.

The worker (after ``Refund.create`` or a lookup), the reconciler (polling) and the
webhook handler (after re-fetching the refund named by an event) all call
``apply_stripe_refund``. State only moves forward, through ``transitions.transition``,
so a stale or repeated Stripe object changes nothing. A Stripe refund that none of our
refunds made (Stripe's dashboard, another system) is real money on the payment: it is
recorded as a refund initiated by ``stripe`` so it counts against what is left.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, NamedTuple

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from shared.adapters.db import driver_cursor
from shared.domain.models import Charge, Payment, Refund, RefundStatus, new_id
from shared.domain.stripe_objects import as_dict, id_of
from shared.services.transitions import record_event, transition

log = logging.getLogger(__name__)

S = RefundStatus

#: Stripe refund status -> ours. Stripe's ``pending`` means accepted, money not yet moved.
STRIPE_STATUS: dict[str, RefundStatus] = {
    "pending": S.PROCESSING,
    "requires_action": S.REQUIRES_ACTION,
    "succeeded": S.SUCCEEDED,
    "failed": S.FAILED,
    "canceled": S.CANCELED,
}

#: ``initiated_by`` (and creation-event actor) of refunds made outside this service.
EXTERNAL_INITIATOR = "stripe"


def external_idempotency_key(stripe_refund_id: str) -> str:
    """Placeholder key for refunds we never sent: unique, and never sent to Stripe."""
    return f"external-{stripe_refund_id}"


def apply_stripe_refund(session: Session, stripe_refund: Any, *, actor: str) -> str | None:
    """Bring our view of one Stripe refund up to date; returns our refund's id.

    ``stripe_refund`` is a ``stripe.Refund`` (or its dict) fetched from Stripe. Our refund
    is found by ``metadata.refund_id``, else by ``stripe_refund_id``; if neither matches,
    the refund is recorded as external. Returns None when the refund belongs to a payment
    we do not hold (payments sync brings it later). Flushes but never commits: the caller
    owns the transaction.
    """
    data = as_dict(stripe_refund)
    stripe_id = str(data["id"])
    ours_id = (data.get("metadata") or {}).get("refund_id")

    refund = _load(session, _BY_ID, ours_id) if ours_id else None
    if refund is None:
        refund = _load(session, _BY_STRIPE_ID, stripe_id)
    elif refund.stripe_refund_id not in (None, stripe_id):
        # Two Stripe refunds carry our refund id: money went out twice. Record the second
        # one so what is left stays true, and shout: a person has to look at it.
        log.error(
            "second Stripe refund for one refund",
            extra={"refund_id": refund.id, "stripe_refund_id": stripe_id,
                   "first_stripe_refund_id": refund.stripe_refund_id},
        )
        refund = _load(session, _BY_STRIPE_ID, stripe_id)
    if refund is None:
        return _record_external(session, data, actor=actor)
    _move(session, refund, data, actor=actor)
    return refund.id


def _move(session: Session, refund: _Current, data: Mapping[str, Any], *, actor: str) -> None:
    stripe_id = str(data["id"])
    stripe_status = str(data.get("status"))
    if refund.stripe_refund_id is None:
        session.execute(
            update(Refund)
            .where(Refund.id == refund.id, Refund.stripe_refund_id.is_(None))
            .values(stripe_refund_id=stripe_id)
        )
    if data.get("amount") is not None and int(data["amount"]) != refund.amount:
        log.error(
            "Stripe refund amount differs from ours",
            extra={"refund_id": refund.id, "stripe_refund_id": stripe_id,
                   "amount": refund.amount, "stripe_amount": data["amount"]},
        )
    target = STRIPE_STATUS.get(stripe_status)
    if target is None:
        log.warning("unknown Stripe refund status %r", stripe_status,
                    extra={"refund_id": refund.id})
        return
    fields: dict[str, Any] = {}
    detail: dict[str, Any] = {"stripe_refund_id": stripe_id, "stripe_status": stripe_status}
    if target is S.FAILED:
        fields["failure_reason"] = failure_text(data)
        if refund.status == S.SUCCEEDED:
            detail["late_failure"] = True
    moved_from = transition(session, refund.id, target, actor=actor, detail=detail, **fields)
    if moved_from == S.SUCCEEDED:
        log.warning("refund failed after succeeding", extra={"refund_id": refund.id,
                                                              "stripe_refund_id": stripe_id})
    session.flush()


def _record_external(session: Session, data: Mapping[str, Any], *, actor: str) -> str | None:
    stripe_id = str(data["id"])
    target = STRIPE_STATUS.get(str(data.get("status")))
    charge_id = id_of(data.get("charge"))
    payment_intent_id = id_of(data.get("payment_intent"))
    charge = session.get(Charge, charge_id) if charge_id else None
    # Lock the payment as the API does when it computes what is left, so a refund
    # being accepted right now sees this one.
    if charge is not None:
        payment_filter = Payment.id == charge.payment_id
    elif payment_intent_id:
        payment_filter = Payment.stripe_payment_intent_id == payment_intent_id
    else:
        return None
    payment = session.scalar(select(Payment).where(payment_filter).with_for_update())
    if payment is None or target is None:
        log.info("Stripe refund for a payment we do not hold",
                 extra={"stripe_refund_id": stripe_id})
        return None
    refund_id = new_id("rf")
    inserted = session.scalar(
        pg_insert(Refund)
        .values(
            id=refund_id,
            payment_id=payment.id,
            charge_id=charge.id if charge is not None else None,
            amount=int(data["amount"]),
            currency=str(data.get("currency") or payment.currency).lower(),
            status=target,
            reason=data.get("reason"),
            stripe_refund_id=stripe_id,
            stripe_idempotency_key=external_idempotency_key(stripe_id),
            failure_reason=failure_text(data) if target is S.FAILED else None,
            initiated_by=EXTERNAL_INITIATOR,
        )
        .on_conflict_do_nothing()
        .returning(Refund.id)
    )
    if inserted is None:
        # Recorded a moment ago by a concurrent call: update that row instead.
        existing = _load(session, _BY_STRIPE_ID, stripe_id)
        if existing is None:
            return None
        _move(session, existing, data, actor=actor)
        return existing.id
    record_event(
        session,
        refund_id=refund_id,
        from_status=None,
        to_status=target,
        actor=EXTERNAL_INITIATOR,
        detail={"stripe_refund_id": stripe_id, "stripe_status": data.get("status"),
                "external": True, "recorded_by": actor},
    )
    session.flush()
    log.info("recorded a refund made outside this service",
             extra={"refund_id": refund_id, "stripe_refund_id": stripe_id})
    return refund_id


class _Current(NamedTuple):
    """What bringing a refund up to date needs of its row."""

    id: str
    stripe_refund_id: str | None
    amount: int
    status: str


_BY_ID = "SELECT id, stripe_refund_id, amount, status FROM refunds WHERE id = %s"
_BY_STRIPE_ID = (
    "SELECT id, stripe_refund_id, amount, status FROM refunds WHERE stripe_refund_id = %s"
)


def _load(session: Session, query: str, value: str) -> _Current | None:
    """The row as it is now, in the session's transaction. Plain SQL: loading the ORM
    entity was 7 % of a worker's CPU while it applied a burst of Stripe's refund events
    (make bench, py-spy), and only these four columns are read."""
    row = driver_cursor(session).execute(query, (value,)).fetchone()
    return None if row is None else _Current(*row)


def failure_text(data: Mapping[str, Any]) -> str:
    """``failure_reason`` for a refund Stripe failed after accepting it."""
    return f"refund_failed: {data.get('failure_reason') or 'unknown'}"


