"""Four eyes for large refunds (SPEC 12): approve, reject, withdraw, expire.

A refund at or above the approval threshold is created ``awaiting_approval``
(``shared.services.refunds.initiate_refund``): it holds its amount against what is left, and
nothing sends it. From there exactly one decision is taken:

- approved by someone other than its initiator -> ``pending`` (then enqueued);
- rejected by someone other than its initiator -> ``canceled``;
- withdrawn by anyone with the write scope -> ``canceled`` (a ``pending`` refund can be
  withdrawn too, as long as nothing has sent it to Stripe yet);
- expired by the reconciler after APPROVAL_EXPIRES_SECONDS -> ``canceled``.

Every decision locks the refund's row, checks where it is, and moves it with a guarded
UPDATE plus an audit event in one transaction. The worker's claim is itself a guarded
UPDATE of the same row (``status = 'pending'``, counting the attempt, committed before
Stripe is called), so the row lock orders a withdrawal and a claim: either the claim
comes first, ``attempts`` is above 0 and the withdrawal is refused, or the withdrawal
comes first and the claim finds nothing pending to send.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from shared.adapters.config import get_settings
from shared.adapters.db import unit_of_work
from shared.domain.errors import (
    CannotCancel,
    ChargeDisputed,
    NotAwaitingApproval,
    NotFound,
    SelfApproval,
)
from shared.domain.models import (
    RELEASED_STATUSES,
    Charge,
    Decision,
    Payment,
    Refund,
    RefundStatus,
)
from shared.services.refunds import could_be_refund_id
from shared.services.transitions import record_event

log = logging.getLogger(__name__)

S = RefundStatus
EXPIRY_ACTOR = "reconciler"
#: Expired approvals canceled per reconcile pass, oldest first; the rest next pass.
EXPIRY_BATCH = 500

#: A refund nothing has sent to Stripe: awaiting approval, or pending with no attempt
#: counted and no Stripe refund known. The worker counts an attempt in its claim, before
#: it calls Stripe, so ``attempts = 0`` means no call can have gone out.
WITHDRAWABLE = or_(
    Refund.status == S.AWAITING_APPROVAL,
    and_(Refund.status == S.PENDING, Refund.attempts == 0, Refund.stripe_refund_id.is_(None)),
)


def approve(*, session: Session, refund_id: str, approver: str, note: str | None) -> None:
    """``awaiting_approval`` -> ``pending``; commits. The caller enqueues it afterwards."""
    row = _lock(session, refund_id)
    _check_decision(row, person=approver, verb="approve")
    disputed = row.charge_id is not None and session.scalar(
        select(Charge.disputed).where(Charge.id == row.charge_id)
    )
    if disputed:
        raise ChargeDisputed(
            "The charge has been disputed since this refund was requested; money is returned "
            "through the dispute. Reject the refund instead."
        )
    _decide(session, row, to_status=S.PENDING, decision=Decision.APPROVED, person=approver,
            note=note, guard=Refund.status == S.AWAITING_APPROVAL)
    session.commit()


def reject(*, session: Session, refund_id: str, approver: str, note: str | None) -> None:
    """``awaiting_approval`` -> ``canceled``: what it held is free again; commits."""
    row = _lock(session, refund_id)
    _check_decision(row, person=approver, verb="reject")
    _decide(session, row, to_status=S.CANCELED, decision=Decision.REJECTED, person=approver,
            note=note, guard=Refund.status == S.AWAITING_APPROVAL)
    session.commit()


def cancel(*, session: Session, refund_id: str, person: str, note: str | None) -> None:
    """Withdraw a refund nothing has sent to Stripe -> ``canceled``; commits."""
    row = _lock(session, refund_id)
    reason = why_not_withdrawable(row)
    if reason is not None:
        raise CannotCancel(reason)
    _decide(session, row, to_status=S.CANCELED, decision=Decision.WITHDRAWN, person=person,
            note=note, guard=WITHDRAWABLE)
    session.commit()


def why_not_withdrawable(refund: Any) -> str | None:
    """None when ``refund`` can be withdrawn, else a sentence saying why not."""
    status = refund.status
    if status == S.AWAITING_APPROVAL:
        return None
    if status == S.PENDING:
        if refund.attempts == 0 and refund.stripe_refund_id is None:
            return None
        return (
            f"The refund has already been sent to Stripe ({refund.attempts} attempt(s)); it "
            "can no longer be withdrawn. Follow it with GET: it ends succeeded or failed."
        )
    if status in (S.PROCESSING, S.REQUIRES_ACTION):
        return (
            f"Stripe already holds this refund (status '{status}'); it can no longer be "
            "withdrawn here."
        )
    if status == S.CANCELED:
        return "The refund is already canceled" + _by_whom(refund) + "."
    return f"The refund is finished ('{status}'); there is nothing to withdraw."


def expire_approvals(*, expires_after_seconds: float | None = None) -> int:
    """Cancel refunds awaiting approval for longer than APPROVAL_EXPIRES_SECONDS (from
    their creation), oldest first, as the reconciler; returns how many. Rows another
    transaction holds (a decision being taken right now) are left to the next pass."""
    seconds = expires_after_seconds or get_settings().approval_expires_seconds
    older = func.now() - timedelta(seconds=seconds)
    with unit_of_work() as session:
        ids = list(
            session.scalars(
                select(Refund.id)
                .where(Refund.status == S.AWAITING_APPROVAL, Refund.created_at < older)
                .order_by(Refund.created_at)
                .limit(EXPIRY_BATCH)
                .with_for_update(skip_locked=True)
            )
        )
        if not ids:
            return 0
        expired = list(
            session.scalars(
                update(Refund)
                .where(Refund.id.in_(ids), Refund.status == S.AWAITING_APPROVAL)
                .values(status=S.CANCELED, decision=Decision.EXPIRED, decided_by=EXPIRY_ACTOR,
                        decided_at=func.now(), updated_at=func.now())
                .returning(Refund.id)
            )
        )
        for refund_id in expired:
            record_event(session, refund_id=refund_id, from_status=S.AWAITING_APPROVAL,
                         to_status=S.CANCELED, actor=EXPIRY_ACTOR,
                         detail={"decision": Decision.EXPIRED.value,
                                 "expired_after_seconds": int(seconds)})
        session.commit()
    log.info("canceled expired approvals", extra={"count": len(expired), "refund_ids": expired})
    return len(expired)


# -- what the console shows ----------------------------------------------------------


@dataclass(frozen=True)
class WaitingRefund:
    refund: Refund
    payment: Payment
    left: int  # what is left on the payment, this refund's hold already taken off


@dataclass(frozen=True)
class ApprovalQueue:
    now: datetime
    refunds: list[WaitingRefund]  # oldest first
    total: int
    expires_after: timedelta


def approval_queue(*, session: Session, limit: int) -> ApprovalQueue:
    """Refunds awaiting approval, oldest first, with what is left on each payment.

    Served by the (status, updated_at) index for the refunds and by the payment index for
    what each payment holds: the cost grows with the queue, not with all refunds."""
    now = session.execute(select(func.now())).scalar_one()
    waiting = list(
        session.scalars(
            select(Refund)
            .where(Refund.status == S.AWAITING_APPROVAL)
            .order_by(Refund.created_at, Refund.id)
            .limit(limit)
        )
    )
    total = session.scalar(
        select(func.count()).where(Refund.status == S.AWAITING_APPROVAL)
    ) or 0
    expires_after = timedelta(seconds=get_settings().approval_expires_seconds)
    if not waiting:
        return ApprovalQueue(now=now, refunds=[], total=int(total), expires_after=expires_after)
    payment_ids = {r.payment_id for r in waiting}
    payments = {
        p.id: p for p in session.scalars(select(Payment).where(Payment.id.in_(payment_ids)))
    }
    held = dict(
        session.execute(
            select(Refund.payment_id, func.sum(Refund.amount))
            .where(Refund.payment_id.in_(payment_ids), Refund.status.not_in(RELEASED_STATUSES))
            .group_by(Refund.payment_id)
        ).all()
    )
    return ApprovalQueue(
        now=now,
        refunds=[
            WaitingRefund(
                refund=r,
                payment=payments[r.payment_id],
                left=max(payments[r.payment_id].amount - int(held.get(r.payment_id) or 0), 0),
            )
            for r in waiting
        ],
        total=int(total),
        expires_after=expires_after,
    )


# -- steps ---------------------------------------------------------------------------


def _lock(session: Session, refund_id: str) -> Any:
    """The refund's row, locked until the transaction ends; NotFound if there is none."""
    if not could_be_refund_id(refund_id):
        raise NotFound("No refund has that id.")
    row = session.execute(
        select(Refund.id, Refund.status, Refund.initiated_by, Refund.attempts,
               Refund.stripe_refund_id, Refund.charge_id, Refund.decision, Refund.decided_by)
        .where(Refund.id == refund_id)
        .with_for_update()
    ).first()
    if row is None:
        raise NotFound(f"No refund has the id '{refund_id}'.")
    return row


def _check_decision(row: Any, *, person: str, verb: str) -> None:
    if row.initiated_by == person:
        raise SelfApproval(
            f"You initiated this refund, so you cannot {verb} it: a second person must. "
            "To take it back, cancel it instead."
        )
    if row.status != S.AWAITING_APPROVAL:
        if row.decision is not None:
            raise NotAwaitingApproval(
                f"The refund is not awaiting approval: it was {row.decision}"
                f"{_by_whom(row)} and is now '{row.status}'."
            )
        raise NotAwaitingApproval(
            f"The refund is not awaiting approval (status '{row.status}'); only refunds at or "
            "above the approval threshold wait for a decision."
        )


def _by_whom(row: Any) -> str:
    return f" by {row.decided_by}" if getattr(row, "decided_by", None) else ""


def _decide(
    session: Session,
    row: Any,
    *,
    to_status: RefundStatus,
    decision: Decision,
    person: str,
    note: str | None,
    guard: Any,
) -> None:
    moved = session.execute(
        update(Refund)
        .where(Refund.id == row.id, guard)
        .values(status=to_status, decision=decision, decided_by=person, decided_at=func.now(),
                decision_note=note, updated_at=func.now())
        .returning(Refund.id)
    ).first()
    if moved is None:  # cannot happen under the row lock; never write an event without a move
        raise NotAwaitingApproval("The refund changed while this decision was taken; try again.")
    detail: dict[str, Any] = {"decision": decision.value, "note": note}
    record_event(session, refund_id=row.id, from_status=row.status, to_status=to_status,
                 actor=person, detail=detail)
    log.info("refund %s", decision.value,
             extra={"refund_id": row.id, "actor": person, "status": str(to_status)})

