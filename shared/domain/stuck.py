"""What "stuck" means (SPEC 7), in one place: the gauge, the console, the reconciler's
alert and the README's alert all read it from here.

A refund is stuck when it is open (``pending``, ``processing``, ``requires_action``)
and has made no progress at Stripe for longer than ``STUCK_ALERT_SECONDS``. Its
progress is its last status change, from its audit trail: creation for a refund still
``pending`` (or the approval that made it pending), the move to ``processing`` or
``requires_action`` for one Stripe holds. It is never ``updated_at``: every attempt,
poll and re-enqueue touches that, so a refund nobody can finish would look fresh
whenever beat runs.

Cheap on any number of refunds: only open refunds created before the threshold can
be stuck, and each of those finds its last change through ``refund_events``' index on
``refund_id``.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, func, select
from sqlalchemy.orm import Session

from shared.domain.models import OPEN_STATUSES, Refund, RefundEvent


def last_progress_at(refund_id: Any = None, status: Any = None, created_at: Any = None) -> Any:
    """SQL: when a refund last changed status; by default of ``refunds`` in the enclosing
    query, else of the given columns (a CTE's)."""
    refund_id = Refund.id if refund_id is None else refund_id
    status = Refund.status if status is None else status
    created_at = Refund.created_at if created_at is None else created_at
    last_change = (
        select(func.max(RefundEvent.created_at))
        .where(
            RefundEvent.refund_id == refund_id,
            RefundEvent.to_status == status,
            # A change from another status: not its creation (that is created_at), nor
            # the notes kept on a pending refund (attempts, "reconcile now").
            RefundEvent.from_status.is_not(None),
            RefundEvent.from_status != RefundEvent.to_status,
        )
        .scalar_subquery()
    )
    return func.coalesce(last_change, created_at)


def stuck_condition(
    *, threshold_seconds: float, now: Any = None, refund_id: Any = None, status: Any = None,
    created_at: Any = None,
) -> Any:
    """SQL: the refund is stuck (open, no progress for longer than the threshold)."""
    status = Refund.status if status is None else status
    created = Refund.created_at if created_at is None else created_at
    cutoff = (now if now is not None else func.now()) - timedelta(seconds=threshold_seconds)
    return (
        status.in_(OPEN_STATUSES)
        # Implied by the next line (progress never precedes creation), and cheap.
        & (created < cutoff)
        & (last_progress_at(refund_id, status, created_at) < cutoff)
    )


def stuck_counts(session: Session | Connection, *, threshold_seconds: float) -> dict[str, int]:
    """Stuck refunds by status (only statuses that have some)."""
    rows = session.execute(
        select(Refund.status, func.count())
        .where(stuck_condition(threshold_seconds=threshold_seconds))
        .group_by(Refund.status)
    ).all()
    return {status: int(count) for status, count in rows}


def stuck_refund_ids(session: Session, *, threshold_seconds: float, limit: int) -> list[str]:
    """The longest-stuck refunds first."""
    return list(
        session.scalars(
            select(Refund.id)
            .where(stuck_condition(threshold_seconds=threshold_seconds))
            .order_by(last_progress_at(), Refund.id)
            .limit(limit)
        )
    )


def refund_last_progress_at(session: Session, refund_id: str) -> datetime | None:
    return session.scalar(select(last_progress_at()).where(Refund.id == refund_id))


def is_stuck(
    status: str, last_progress: datetime, now: datetime, *, threshold_seconds: float
) -> bool:
    """The same test for one refund already loaded."""
    return status in OPEN_STATUSES and now - last_progress > timedelta(seconds=threshold_seconds)
