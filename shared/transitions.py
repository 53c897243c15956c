"""The refund state machine (SPEC 5): every change is a guarded UPDATE plus an audit event,
so a late or duplicate message can never move a refund backwards."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from shared.models import Refund, RefundEvent, RefundStatus

S = RefundStatus

#: target status -> statuses it may be reached from
ALLOWED_SOURCES: dict[RefundStatus, frozenset[RefundStatus]] = {
    S.PENDING: frozenset({S.AWAITING_APPROVAL}),  # approved (shared.approvals)
    S.PROCESSING: frozenset({S.PENDING}),
    S.REQUIRES_ACTION: frozenset({S.PENDING}),
    S.SUCCEEDED: frozenset({S.PENDING, S.PROCESSING, S.REQUIRES_ACTION}),
    S.FAILED: frozenset({S.PENDING, S.PROCESSING, S.REQUIRES_ACTION, S.SUCCEEDED}),
    S.CANCELED: frozenset({S.AWAITING_APPROVAL, S.PENDING, S.PROCESSING, S.REQUIRES_ACTION}),
}


def can_move(from_status: str, to_status: str) -> bool:
    return RefundStatus(from_status) in ALLOWED_SOURCES.get(RefundStatus(to_status), frozenset())


def record_event(
    session: Session,
    *,
    refund_id: str,
    from_status: str | None,
    to_status: str,
    actor: str,
    detail: dict[str, Any] | None = None,
) -> None:
    session.add(
        RefundEvent(
            refund_id=refund_id,
            from_status=from_status,
            to_status=to_status,
            actor=actor,
            detail=detail,
        )
    )


def transition(
    session: Session,
    refund_id: str,
    to_status: RefundStatus,
    *,
    actor: str,
    detail: dict[str, Any] | None = None,
    **fields: Any,
) -> str | None:
    """Move a refund to ``to_status`` if the machine allows it from where it is now.

    Returns the status it came from, or None when the move was not allowed (already
    there, or past it). ``fields`` are other columns to set in the same UPDATE.
    """
    current = session.scalar(select(Refund.status).where(Refund.id == refund_id).with_for_update())
    if current is None or not can_move(current, to_status):
        return None
    moved = session.execute(
        update(Refund)
        .where(Refund.id == refund_id, Refund.status.in_(ALLOWED_SOURCES[to_status]))
        .values(status=to_status, updated_at=func.now(), **fields)
        .returning(Refund.id)
    ).first()
    if moved is None:
        return None
    record_event(
        session,
        refund_id=refund_id,
        from_status=current,
        to_status=to_status,
        actor=actor,
        detail=detail,
    )
    return current

