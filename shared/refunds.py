"""Refund use cases: initiate one (SPEC 3.1), read one, list them (SPEC 3.2)."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import or_, select, tuple_
from sqlalchemy.orm import Session

from shared import idempotency
from shared.errors import ChargeDisputed, NotFound, PaymentNotSucceeded
from shared.models import Charge, Payment, Refund, RefundEvent, RefundStatus, new_id
from shared.rules import amount_to_refund, refundable_left
from shared.transitions import record_event

REFUND_ID_MAX = 40  # refunds.id is String(40): no longer id exists


@dataclass(frozen=True)
class RefundRequest:
    charge_id: str
    amount_cents: int | None  # None means "full": everything that is left
    reason: str | None


@dataclass(frozen=True)
class Initiated:
    status: int
    body: dict[str, Any]
    replayed: bool

    @property
    def refund_id(self) -> str:
        return str(self.body["refund_id"])


def stripe_idempotency_key(refund_id: str) -> str:
    """The key every Stripe call for this refund uses, identical on every attempt."""
    return f"refund-{refund_id}"


def initiate_refund(
    *,
    session: Session,
    request: RefundRequest,
    initiated_by: str,
    idempotency_key: str | None,
    fingerprint: str,
) -> Initiated:
    """Record a pending refund in one transaction and commit it.

    The caller enqueues the refund for the worker after this returns (never before the
    commit). Raises a ``RefundServiceError`` for every rejected request; nothing is
    written then.
    """
    if idempotency_key is not None:
        stored = idempotency.claim(
            session, subject=initiated_by, key=idempotency_key, fingerprint=fingerprint
        )
        if stored is not None:
            # JSONB does not keep key order: put the fields back in the published order so
            # that a replay is byte for byte the first answer.
            body = {name: stored.body[name] for name in INITIATED_FIELDS if name in stored.body}
            return Initiated(status=stored.status, body=body, replayed=True)

    payment, charge = _lock_payment(session, request.charge_id)
    if payment.status != "succeeded" or (charge is not None and charge.status != "succeeded"):
        state = payment.status
        if charge is not None and charge.status != "succeeded":
            state = charge.status
        raise PaymentNotSucceeded(
            f"The payment is '{state}', not 'succeeded': only a succeeded payment can be refunded."
        )
    if charge is not None and charge.disputed:
        raise ChargeDisputed(
            "The charge is disputed; money is returned through the dispute, not a refund."
        )
    # Every refund of the payment, pending ones included, read under the payment's lock:
    # the rules in ``shared.rules`` decide what is left, in one place.
    existing = session.execute(
        select(Refund.amount, Refund.status).where(Refund.payment_id == payment.id)
    ).all()  # rows unpack as tuples; Result.tuples() is deprecated in SQLAlchemy 2.1
    amount = amount_to_refund(
        left=refundable_left(payment.amount, existing),
        amount_cents=request.amount_cents,
        currency=payment.currency,
    )

    refund_id = new_id("rf")
    refund = Refund(
        id=refund_id,
        payment_id=payment.id,
        charge_id=charge.id if charge is not None else None,
        amount=amount,
        currency=payment.currency,
        status=RefundStatus.PENDING,
        reason=request.reason,
        stripe_idempotency_key=stripe_idempotency_key(refund_id),
        initiated_by=initiated_by,
    )
    session.add(refund)
    session.flush()
    record_event(
        session,
        refund_id=refund_id,
        from_status=None,
        to_status=RefundStatus.PENDING,
        actor=initiated_by,
        detail={"amount": amount, "reason": request.reason, "full": request.amount_cents is None},
    )
    body = initiated_body(refund)
    if idempotency_key is not None:
        idempotency.store(
            session,
            subject=initiated_by,
            key=idempotency_key,
            response=idempotency.StoredResponse(status=201, body=body),
        )
    session.commit()
    return Initiated(status=201, body=body, replayed=False)


def _lock_payment(session: Session, charge_id: str) -> tuple[Payment, Charge | None]:
    """Find the payment a request names and lock its row for the rest of the transaction.

    ``charge_id`` is tried as a Stripe charge id, then as a PaymentIntent id or one of our
    payment ids (SPEC 3.1)."""
    # The charge's payment is found and locked in one statement (one round trip fewer on
    # the hot path); the charge itself is read once the payment is locked.
    charge_payment = select(Charge.payment_id).where(Charge.id == charge_id).scalar_subquery()
    payment = session.scalar(select(Payment).where(Payment.id == charge_payment).with_for_update())
    if payment is not None:
        charge = session.scalar(
            select(Charge)
            .where(Charge.id == charge_id)
            .execution_options(populate_existing=True)
        )
        assert charge is not None  # charges are never deleted
        return payment, charge
    payment = session.scalar(
        select(Payment)
        .where(or_(Payment.stripe_payment_intent_id == charge_id, Payment.id == charge_id))
        .with_for_update()
    )
    if payment is None:
        raise NotFound(f"No charge or payment has the id '{charge_id[:80]}'.")
    charge = session.scalar(
        select(Charge)
        .where(Charge.payment_id == payment.id)
        .order_by((Charge.status == "succeeded").desc(), Charge.created_at.desc())
        .limit(1)
    )
    return payment, charge


INITIATED_FIELDS = (
    "refund_id", "payment_id", "charge_id", "amount_cents", "status", "stripe_refund_id"
)


def initiated_body(refund: Refund) -> dict[str, Any]:
    """The 201 body: exactly the seed's fields, in ``INITIATED_FIELDS`` order."""
    return {
        "refund_id": refund.id,
        "payment_id": refund.payment_id,
        "charge_id": refund.charge_id,
        "amount_cents": refund.amount,
        "status": refund.status,
        "stripe_refund_id": refund.stripe_refund_id or "",
    }


def refund_body(refund: Refund, events: list[RefundEvent] | None = None) -> dict[str, Any]:
    body = initiated_body(refund) | {
        "currency": refund.currency,
        "reason": refund.reason,
        "failure_reason": refund.failure_reason,
        "initiated_by": refund.initiated_by,
        "created_at": _iso(refund.created_at),
        "updated_at": _iso(refund.updated_at),
        "attempts": refund.attempts,
    }
    if events is not None:
        body["events"] = [
            {
                "from_status": e.from_status,
                "to_status": e.to_status,
                "actor": e.actor,
                "detail": e.detail,
                "created_at": _iso(e.created_at),
            }
            for e in events
        ]
    return body


def _iso(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


def could_be_refund_id(value: str) -> bool:
    """False for strings no refund id can be; Postgres rejects NUL in text outright, so
    such ids must not reach a query (they would turn a 404 into a 500)."""
    return 0 < len(value) <= REFUND_ID_MAX and value.isascii() and value.isprintable()


def get_refund(*, session: Session, refund_id: str) -> dict[str, Any]:
    if not could_be_refund_id(refund_id):
        raise NotFound("No refund has that id.")
    refund = session.get(Refund, refund_id)
    if refund is None:
        raise NotFound(f"No refund has the id '{refund_id}'.")
    events = list(
        session.scalars(
            select(RefundEvent)
            .where(RefundEvent.refund_id == refund_id)
            .order_by(RefundEvent.created_at, RefundEvent.id)
        )
    )
    return refund_body(refund, events)


class InvalidCursor(ValueError):
    pass


def encode_cursor(refund: Refund) -> str:
    raw = json.dumps([refund.created_at.isoformat(), refund.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The position a cursor names. A cursor is opaque to callers but not trusted: one
    that was not made by ``encode_cursor`` is refused here, before it reaches a query."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, refund_id = json.loads(raw)
        position = datetime.fromisoformat(created)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise InvalidCursor("cursor is not one this service returned") from exc
    if (
        position.tzinfo is None
        or not isinstance(refund_id, str)
        or not could_be_refund_id(refund_id)
    ):
        raise InvalidCursor("cursor is not one this service returned")
    return position, refund_id


def page_of_refunds(
    *,
    session: Session,
    limit: int,
    cursor: str | None = None,
    charge_id: str | None = None,
    payment_id: str | None = None,
    status: str | None = None,
    initiated_by: str | None = None,
) -> tuple[list[Refund], str | None]:
    """One page of refunds, newest first, and the cursor of the next page (None at the end).

    Paged by an opaque cursor over (created_at, id), served by ``ix_refunds_created_at_id``.
    Raises ``InvalidCursor`` for a cursor this service did not make."""
    query = select(Refund)
    filters = {
        Refund.charge_id: charge_id,
        Refund.payment_id: payment_id,
        Refund.status: status,
        Refund.initiated_by: initiated_by,
    }
    for column, value in filters.items():
        if value is not None:
            query = query.where(column == value)
    if cursor is not None:
        created, last_id = decode_cursor(cursor)
        query = query.where(tuple_(Refund.created_at, Refund.id) < tuple_(created, last_id))
    rows = list(
        session.scalars(query.order_by(Refund.created_at.desc(), Refund.id.desc()).limit(limit + 1))
    )
    page = rows[:limit]
    return page, (encode_cursor(page[-1]) if len(rows) > limit else None)


def list_refunds(*, session: Session, **page_args: Any) -> dict[str, Any]:
    """The API's list: a page of refunds (see ``page_of_refunds`` for the arguments)."""
    page, next_cursor = page_of_refunds(session=session, **page_args)
    return {
        "data": [refund_body(r) for r in page],
        "has_more": next_cursor is not None,
        "next_cursor": next_cursor,
    }
