"""Refunds held for a person (SPEC 7): Stripe refused our credentials or permissions.

Such a refund stays ``pending`` (SPEC 6), and each attempt costs a Stripe call and an
audit event; retrying it every STUCK_AFTER_SECONDS for ever fixes nothing. After
``MAX_ATTEMPTS`` attempts it is marked as needing attention
(``refunds.needs_attention_since`` and ``needs_attention_reason``): the reconciler stops
re-enqueueing it, ``refunds_needs_attention`` counts it and the console lists it. It is
tried again only when a person asks (the console's "Reconcile now", or
``refunds reconcile --refund <id>``): asking clears the mark, records who asked and
enqueues it once; if Stripe still refuses, the next held answer marks it again.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import Connection, func, select, update
from sqlalchemy.orm import Session

from shared.adapters.config import get_settings
from shared.domain.models import OPEN_STATUSES, Refund, RefundStatus
from shared.services.transitions import record_event

log = logging.getLogger(__name__)

ACTOR = "worker"


def mark_held(session: Session, refund_id: str, attempts: int, error: str) -> bool:
    """Called by the worker when Stripe held a refund for a person (a HELD outcome), in
    the transaction that records it. Marks the refund as needing attention once it has
    had ``MAX_ATTEMPTS`` attempts; True if this call marked it."""
    if attempts < get_settings().max_attempts:
        return False
    marked = session.execute(
        update(Refund)
        .where(
            Refund.id == refund_id,
            Refund.status == RefundStatus.PENDING,
            Refund.needs_attention_since.is_(None),
        )
        .values(needs_attention_since=func.now(), needs_attention_reason=error)
        .returning(Refund.id)
    ).first()
    if marked is None:
        return False
    record_event(
        session,
        refund_id=refund_id,
        from_status=RefundStatus.PENDING,
        to_status=RefundStatus.PENDING,
        actor=ACTOR,
        detail={"note": "needs attention: no more retries until a person asks",
                "attempts": attempts, "error": error},
    )
    log.error(
        "refund needs attention: Stripe keeps refusing our credentials; retried only on request "
        "(console 'Reconcile now' or refunds reconcile --refund)",
        extra={"refund_id": refund_id, "attempts": attempts, "error": error},
    )
    return True


def clear(session: Session, refund_id: str) -> bool:
    """A person asked to retry: forget the mark (in the caller's transaction, which also
    records who asked). True if the refund was marked."""
    cleared = session.execute(
        update(Refund)
        .where(Refund.id == refund_id, Refund.needs_attention_since.is_not(None))
        .values(needs_attention_since=None, needs_attention_reason=None)
        .returning(Refund.id)
    ).first()
    return cleared is not None


def left_to_the_workers() -> Any:
    """SQL: the refund is not waiting for a person (the reconciler may re-enqueue it)."""
    return Refund.needs_attention_since.is_(None)


def needs_attention_counts(connection: Session | Connection) -> dict[str, int]:
    """Open refunds marked as needing attention, by status (a partial index serves it)."""
    rows = connection.execute(
        select(Refund.status, func.count())
        .where(Refund.needs_attention_since.is_not(None), Refund.status.in_(OPEN_STATUSES))
        .group_by(Refund.status)
    ).all()
    return {status: int(count) for status, count in rows}
