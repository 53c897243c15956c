"""Refund use cases: initiate one (SPEC 3.1), read one, list them (SPEC 3.2)."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from sqlalchemy import select, tuple_
from sqlalchemy.orm import Session

from shared.adapters.config import get_settings
from shared.adapters.db import run_and_commit
from shared.domain.errors import (
    ChargeDisputed,
    IdempotencyKeyReused,
    NotFound,
    PaymentNotSucceeded,
)
from shared.domain.models import Refund, RefundEvent, new_id
from shared.domain.rules import amount_to_refund
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
    """Record a pending refund and commit it: one statement on an autocommit
    ``connection``, the database's ``initiate_refund`` function (migration 0015), which
    claims the Idempotency-Key, locks the payment row, applies the rules of
    ``shared.domain.rules`` to the refunds read under that lock
    (tests/test_initiate_function.py checks that it does), and inserts the refund with
    its audit event.

    A refund at or above the approval threshold of its currency is recorded
    ``awaiting_approval`` instead (SPEC 12): it holds its amount but is not sent until a
    second person approves it. The caller enqueues a ``pending`` refund for the worker
    after this returns (never before the commit), and never one awaiting approval.
    Raises a ``RefundServiceError`` for every rejected request; nothing is written then.
    Raises ``OutcomeUnknown`` when the connection broke before the answer came back.
    """
    refund_id = new_id("rf")
    outcome, detail = run_and_commit(connection, _INITIATE, {
        "ref": request.charge_id,
        "requested": request.amount_cents,
        "reason": request.reason,
        "actor": initiated_by,
        "refund_id": refund_id,
        "stripe_key": stripe_idempotency_key(refund_id),
        "thresholds": _thresholds(),
        "key": idempotency_key,
        "fingerprint": fingerprint,
        "ttl": idempotency.KEY_TTL_HOURS,
    })
    if outcome == "created":
        return Initiated(status=201, body=_published(detail), replayed=False)
    if outcome == "replayed":
        return Initiated(status=detail["status"], body=_published(detail["body"]),
                         replayed=True)
    raise _refusal(outcome, detail or {}, request)


# Plain SQL on a psycopg connection of its own: every POST runs it, and SQLAlchemy's
# session and per-statement machinery cost more CPU than the database work (make bench).
_INITIATE = """
    SELECT outcome, detail FROM initiate_refund(
        %(ref)s, %(requested)s, %(reason)s, %(actor)s, %(refund_id)s, %(stripe_key)s,
        %(thresholds)s, %(key)s, %(fingerprint)s, %(ttl)s)
"""


def _thresholds() -> Jsonb | None:
    table = get_settings().approval_threshold_table()
    return Jsonb(table) if table is not None else None


def _published(body: dict[str, Any]) -> dict[str, Any]:
    """A 201 body in the published field order (JSONB does not keep key order), so that
    a replay is byte for byte the first answer."""
    return {name: body[name] for name in INITIATED_FIELDS if name in body}


def _refusal(outcome: str, detail: dict[str, Any], request: RefundRequest) -> Exception:
    """The domain error for a refusal the database function answered with."""
    if outcome == "idempotency_key_reused":
        return IdempotencyKeyReused(
            "This Idempotency-Key was already used with a different request body. "
            "Use a new key for a new refund."
        )
    if outcome == "not_found":
        return NotFound(f"No charge or payment has the id '{request.charge_id[:80]}'.")
    if outcome == "payment_not_succeeded":
        return PaymentNotSucceeded(
            f"The payment is '{detail['state']}', not 'succeeded': only a succeeded payment "
            "can be refunded."
        )
    if outcome == "charge_disputed":
        return ChargeDisputed(
            "The charge is disputed; money is returned through the dispute, not a refund."
        )
    # What is left refuses it: the rule's own error, with its message.
    amount_to_refund(left=detail["left"], amount_cents=request.amount_cents,
                     currency=detail["currency"])
    raise AssertionError(f"initiate_refund answered {outcome!r}")


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
