"""Refund use cases: initiate one (SPEC 3.1), read one, list them (SPEC 3.2)."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import namedtuple_row
from psycopg.types.json import Jsonb
from sqlalchemy import select, tuple_
from sqlalchemy.orm import Session

from shared.adapters.config import get_settings
from shared.adapters.db import commit
from shared.domain.errors import ChargeDisputed, NotFound, PaymentNotSucceeded
from shared.domain.models import Refund, RefundEvent, RefundStatus, new_id
from shared.domain.rules import amount_to_refund, refundable_left
from shared.services import idempotency

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
    connection: psycopg.Connection[Any],
    *,
    request: RefundRequest,
    initiated_by: str,
    idempotency_key: str | None,
    fingerprint: str,
) -> Initiated:
    """Record a pending refund in one transaction on ``connection`` and commit it.

    A refund at or above the approval threshold of its currency is recorded
    ``awaiting_approval`` instead (SPEC 12): it holds its amount but is not sent until a
    second person approves it. The caller enqueues a ``pending`` refund for the worker
    after this returns (never before the commit), and never one awaiting approval.
    Raises a ``RefundServiceError`` for every rejected request; nothing is
    written then.

    Two round trips in pipeline mode (``shared.adapters.db.in_transaction``): the lock
    with the read of the payment's refunds, then the insert with the commit (one more
    for an Idempotency-Key).
    """
    if idempotency_key is not None:
        stored = idempotency.claim(
            connection, subject=initiated_by, key=idempotency_key, fingerprint=fingerprint
        )
        if stored is not None:
            # JSONB does not keep key order: put the fields back in the published order so
            # that a replay is byte for byte the first answer.
            body = {name: stored.body[name] for name in INITIATED_FIELDS if name in stored.body}
            return Initiated(status=stored.status, body=body, replayed=True)

    payment, existing = _lock_payment(connection, request.charge_id)
    charge_unsettled = payment.charge_id is not None and payment.charge_status != "succeeded"
    if payment.status != "succeeded" or charge_unsettled:
        state = payment.charge_status if charge_unsettled else payment.status
        raise PaymentNotSucceeded(
            f"The payment is '{state}', not 'succeeded': only a succeeded payment can be refunded."
        )
    if payment.disputed:
        raise ChargeDisputed(
            "The charge is disputed; money is returned through the dispute, not a refund."
        )
    # The rules in ``shared.domain.rules`` decide what is left, in one place, from every
    # refund of the payment (pending ones included) read under the payment's lock.
    amount = amount_to_refund(
        left=refundable_left(payment.amount, existing),
        amount_cents=request.amount_cents,
        currency=payment.currency,
    )

    threshold = get_settings().approval_threshold(payment.currency)
    held_for_approval = threshold is not None and amount >= threshold
    status = RefundStatus.AWAITING_APPROVAL if held_for_approval else RefundStatus.PENDING
    detail: dict[str, Any] = {
        "amount": amount, "reason": request.reason, "full": request.amount_cents is None
    }
    if held_for_approval:
        detail["approval_threshold"] = threshold

    refund_id = new_id("rf")
    connection.execute(
        _INSERT_REFUND,
        {
            "id": refund_id,
            "payment_id": payment.id,
            "charge_id": payment.charge_id,
            "amount": amount,
            "currency": payment.currency,
            "reason": request.reason,
            "stripe_idempotency_key": stripe_idempotency_key(refund_id),
            "actor": initiated_by,
            "status": status,
            "approval_threshold": threshold if held_for_approval else None,
            "detail": Jsonb(detail),
        },
    )
    body = initiated_body(
        refund_id=refund_id,
        payment_id=payment.id,
        charge_id=payment.charge_id,
        amount=amount,
        status=status,
        stripe_refund_id=None,
    )
    if idempotency_key is not None:
        idempotency.store(
            connection,
            subject=initiated_by,
            key=idempotency_key,
            response=idempotency.StoredResponse(status=201, body=body),
        )
    commit(connection)  # the insert (and the key's answer) go with the COMMIT
    return Initiated(status=201, body=body, replayed=False)


# The hot path is plain SQL on a psycopg connection of its own: every POST runs it, and
# the ORM, then SQLAlchemy's per-statement machinery, cost more CPU than the database
# work itself (make bench). Column names are checked against the models by every test
# that creates a refund.

# The payment a request names, locked for the rest of the transaction, with the charge
# the refund will be made against. ``:ref`` is tried as a Stripe charge id first (one
# statement on the common path), then as a PaymentIntent id or one of our payment ids
# (SPEC 3.1), where the payment's succeeded charge, else its latest, is the one.
_LOCK_BY_CHARGE = """
    SELECT p.id, p.amount, p.currency, p.status,
           c.id AS charge_id, c.status AS charge_status, c.disputed
    FROM charges c JOIN payments p ON p.id = c.payment_id
    WHERE c.id = %(ref)s
    FOR UPDATE OF p
"""
_LOCK_BY_PAYMENT = """
    SELECT p.id, p.amount, p.currency, p.status,
           c.id AS charge_id, c.status AS charge_status, coalesce(c.disputed, false) AS disputed
    FROM payments p
    LEFT JOIN LATERAL (
        SELECT id, status, disputed FROM charges WHERE payment_id = p.id
        ORDER BY status = 'succeeded' DESC, created_at DESC LIMIT 1
    ) c ON true
    WHERE p.stripe_payment_intent_id = %(ref)s OR p.id = %(ref)s
    FOR UPDATE OF p
"""
# Every refund of the payment, as a statement of its own after the lock: in READ
# COMMITTED it takes its snapshot once the lock is granted, so it sees the refunds of
# the transactions this one waited for. Sent with the lock, in the same round trip.
_REFUNDS_OF_CHARGE = """
    SELECT amount, status FROM refunds
    WHERE payment_id = (SELECT payment_id FROM charges WHERE id = %(ref)s)
"""
_REFUNDS_OF_PAYMENT = """
    SELECT amount, status FROM refunds
    WHERE payment_id IN (SELECT id FROM payments
                         WHERE stripe_payment_intent_id = %(ref)s OR id = %(ref)s)
"""
# The refund (pending, or awaiting approval) and its first audit event in one statement
# (one round trip).
_INSERT_REFUND = """
    WITH refund AS (
        INSERT INTO refunds (id, payment_id, charge_id, amount, currency, status, reason,
                             stripe_idempotency_key, initiated_by, approval_threshold)
        VALUES (%(id)s, %(payment_id)s, %(charge_id)s, %(amount)s, %(currency)s, %(status)s,
                %(reason)s, %(stripe_idempotency_key)s, %(actor)s, %(approval_threshold)s)
        RETURNING id, status
    )
    INSERT INTO refund_events (refund_id, from_status, to_status, actor, detail)
    SELECT id, NULL, status, %(actor)s, %(detail)s FROM refund
"""


def _lock_payment(
    connection: psycopg.Connection[Any], ref: str
) -> tuple[Any, list[tuple[int, str]]]:
    """Find the payment a request names, lock its row for the rest of the transaction,
    and read its refunds under that lock."""
    for lock, refunds_of in ((_LOCK_BY_CHARGE, _REFUNDS_OF_CHARGE),
                             (_LOCK_BY_PAYMENT, _REFUNDS_OF_PAYMENT)):
        locked = connection.cursor(row_factory=namedtuple_row).execute(lock, {"ref": ref})
        held = connection.cursor().execute(refunds_of, {"ref": ref})
        payment = locked.fetchone()
        existing = held.fetchall()
        if payment is not None:
            return payment, existing
    raise NotFound(f"No charge or payment has the id '{ref[:80]}'.")


INITIATED_FIELDS = (
    "refund_id", "payment_id", "charge_id", "amount_cents", "status", "stripe_refund_id"
)


def initiated_body(
    *,
    refund_id: str,
    payment_id: str,
    charge_id: str | None,
    amount: int,
    status: str,
    stripe_refund_id: str | None,
) -> dict[str, Any]:
    """The 201 body: exactly the seed's fields, in ``INITIATED_FIELDS`` order."""
    return {
        "refund_id": refund_id,
        "payment_id": payment_id,
        "charge_id": charge_id,
        "amount_cents": amount,
        "status": str(status),
        "stripe_refund_id": stripe_refund_id or "",
    }


def refund_body(refund: Refund, events: list[RefundEvent] | None = None) -> dict[str, Any]:
    body = initiated_body(
        refund_id=refund.id,
        payment_id=refund.payment_id,
        charge_id=refund.charge_id,
        amount=refund.amount,
        status=refund.status,
        stripe_refund_id=refund.stripe_refund_id,
    ) | {
        "currency": refund.currency,
        "reason": refund.reason,
        "failure_reason": refund.failure_reason,
        "initiated_by": refund.initiated_by,
        "created_at": _iso(refund.created_at),
        "updated_at": _iso(refund.updated_at),
        "attempts": refund.attempts,
        # Four eyes (SPEC 12): who asked is initiated_by; these say who decided and when.
        "approval_threshold_cents": refund.approval_threshold,
        "decision": refund.decision,
        "decided_by": refund.decided_by,
        "decided_at": _iso(refund.decided_at) if refund.decided_at is not None else None,
        "decision_note": refund.decision_note,
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
