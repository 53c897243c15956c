"""What the operators' console shows and the one action it takes (issue 7).

Every query here is bounded by an index of ``refunds`` (``(status, updated_at)``,
``(created_at, id)``, ``payment_id``, ``charge_id``, ``initiated_by``) or of
``refund_events`` (``refund_id``), so the pages cost the same on a hundred refunds
as on millions: counts of finished refunds are taken over a recent window, not all
of history. ``tests/console/test_console_scale.py`` checks the plans on 100,000 rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, literal_column, select
from sqlalchemy.orm import Session

from shared.adapters.celery_app import (
    PROCESS_REFUND_TASK,
    RECONCILE_TASK,
    enqueue_reconcile,
    enqueue_refund,
)
from shared.domain.errors import NotFound, RefundServiceError
from shared.domain.models import (
    OPEN_STATUSES,
    RELEASED_STATUSES,
    TERMINAL_STATUSES,
    Charge,
    Payment,
    Refund,
    RefundEvent,
    RefundStatus,
)
from shared.domain.stuck import is_stuck, last_progress_at, refund_last_progress_at, stuck_condition
from shared.services import attention
from shared.services.refunds import could_be_refund_id, page_of_refunds
from shared.services.transitions import record_event

S = RefundStatus
ALL_STATUSES = tuple(RefundStatus)

CHART_MINUTES = 60
FINISHED_WINDOW = timedelta(hours=24)
ERROR_WINDOW = timedelta(hours=1)
STUCK_LIST_LIMIT = 50
RECONCILE_ACTION = "reconcile_now"


class RefundIsTerminal(RefundServiceError):
    code = "refund_terminal"


@dataclass(frozen=True)
class MinuteBucket:
    minute: datetime
    initiated: int
    succeeded: int
    failed: int  # failed or canceled


@dataclass(frozen=True)
class StripeErrors:
    """Refunds touched in the last hour, and how many of them met an error from Stripe."""

    touched: int
    failed: int  # a definite answer: Stripe declined or later failed the refund
    retrying: int  # still open, with the last attempt's error (timeout, 5xx, 429...)
    recovered: int  # finished without failing, after an attempt that errored

    @property
    def with_error(self) -> int:
        return self.failed + self.retrying + self.recovered

    @property
    def rate(self) -> float | None:
        return self.with_error / self.touched if self.touched else None


@dataclass(frozen=True)
class Overview:
    now: datetime
    open_counts: dict[str, int]
    finished_counts: dict[str, int]  # over FINISHED_WINDOW
    oldest_open: Refund | None
    minutes: list[MinuteBucket]
    stripe_errors: StripeErrors
    stuck: list[Refund]
    stuck_total: int
    stuck_alert: timedelta  # no progress for longer than this is stuck (shared.domain.stuck)
    needs_attention: list[Refund]  # held for a person (services.attention), oldest first
    needs_attention_total: int


@dataclass(frozen=True)
class RefundPage:
    now: datetime
    refunds: list[Refund]
    next_cursor: str | None


@dataclass(frozen=True)
class PaymentSummary:
    payment: Payment
    charge: Charge | None
    refund_count: int
    held: int  # amount of the payment's refunds that are not failed or canceled
    refunded: int  # of which succeeded

    @property
    def left(self) -> int:
        return max(self.payment.amount - self.held, 0)


@dataclass(frozen=True)
class RefundDetail:
    now: datetime
    refund: Refund
    events: list[RefundEvent]
    payment: PaymentSummary
    last_progress_at: datetime  # its last status change (shared.domain.stuck)
    stuck: bool


def _no_such_refund(refund_id: str) -> NotFound:
    return NotFound(f"No refund has the id '{refund_id[:80]}'.")


def db_now(session: Session) -> datetime:
    """The database's clock: ages and windows are measured against the rows' own clock."""
    return session.execute(select(func.now())).scalar_one()


def _open_refunds() -> Any:
    """The open refunds' ids, statuses and creation times, taken through the status index.

    Materialized so that ordering by ``created_at`` cannot turn the plan into a walk of
    the ``created_at`` index from the oldest refund of all, past every finished one.
    """
    return (
        select(Refund.id, Refund.status, Refund.created_at)
        .where(Refund.status.in_(OPEN_STATUSES))
        .cte("open_refunds")
        .prefix_with("MATERIALIZED")
    )


def overview(
    *, session: Session, stuck_alert_seconds: float
) -> Overview:
    now = db_now(session)
    stuck_alert = timedelta(seconds=stuck_alert_seconds)
    chart_start = now.replace(second=0, microsecond=0) - timedelta(minutes=CHART_MINUTES - 1)

    open_counts = dict.fromkeys(OPEN_STATUSES, 0) | dict(
        session.execute(
            select(Refund.status, func.count())
            .where(Refund.status.in_(OPEN_STATUSES))
            .group_by(Refund.status)
        ).all()
    )
    finished_counts = dict.fromkeys(TERMINAL_STATUSES, 0) | dict(
        session.execute(
            select(Refund.status, func.count())
            .where(Refund.status.in_(TERMINAL_STATUSES), Refund.updated_at >= now - FINISHED_WINDOW)
            .group_by(Refund.status)
        ).all()
    )

    open_rows = _open_refunds()
    oldest_id = session.scalar(
        select(open_rows.c.id).order_by(open_rows.c.created_at, open_rows.c.id).limit(1)
    )
    oldest_open = session.get(Refund, oldest_id) if oldest_id is not None else None

    minute = literal_column("'minute'")
    initiated = dict(
        session.execute(
            select(func.date_trunc(minute, Refund.created_at), func.count())
            .where(Refund.created_at >= chart_start)
            .group_by(func.date_trunc(minute, Refund.created_at))
        ).all()
    )
    finished: dict[tuple[str, datetime], int] = {
        (status, at): count
        for status, at, count in session.execute(
            select(Refund.status, func.date_trunc(minute, Refund.updated_at), func.count())
            .where(Refund.status.in_(TERMINAL_STATUSES), Refund.updated_at >= chart_start)
            .group_by(Refund.status, func.date_trunc(minute, Refund.updated_at))
        )
    }
    minutes = []
    for i in range(CHART_MINUTES):
        at = chart_start + timedelta(minutes=i)
        minutes.append(
            MinuteBucket(
                minute=at,
                initiated=initiated.get(at, 0),
                succeeded=finished.get((S.SUCCEEDED, at), 0),
                failed=finished.get((S.FAILED, at), 0) + finished.get((S.CANCELED, at), 0),
            )
        )

    has_error = Refund.last_error.is_not(None)
    touched, failed, retrying, recovered = session.execute(
        select(
            func.count(),
            func.count().filter(Refund.status == S.FAILED),
            func.count().filter(Refund.status.in_(OPEN_STATUSES), has_error),
            func.count().filter(Refund.status.in_((S.SUCCEEDED, S.CANCELED)), has_error),
        ).where(
            # Naming every status lets the (status, updated_at) index serve the time range.
            Refund.status.in_(ALL_STATUSES),
            Refund.updated_at >= now - ERROR_WINDOW,
        )
    ).one()

    open_rows = _open_refunds()
    progress = last_progress_at(open_rows.c.id, open_rows.c.status, open_rows.c.created_at)
    stuck_rows = session.execute(
        select(open_rows.c.id, func.count().over())
        .where(
            stuck_condition(
                threshold_seconds=stuck_alert_seconds, now=now, refund_id=open_rows.c.id,
                status=open_rows.c.status, created_at=open_rows.c.created_at,
            )
        )
        .order_by(progress, open_rows.c.id)
        .limit(STUCK_LIST_LIMIT)
    ).all()
    stuck_total = stuck_rows[0][1] if stuck_rows else 0
    by_id = {
        r.id: r
        for r in session.scalars(select(Refund).where(Refund.id.in_([i for i, _ in stuck_rows])))
    }
    stuck = [by_id[i] for i, _ in stuck_rows]

    marked = Refund.needs_attention_since.is_not(None) & Refund.status.in_(OPEN_STATUSES)
    needs_attention_total = session.scalar(select(func.count()).where(marked)) or 0
    needs_attention = list(
        session.scalars(
            select(Refund)
            .where(marked)
            .order_by(Refund.needs_attention_since, Refund.id)
            .limit(STUCK_LIST_LIMIT)
        )
    )

    return Overview(
        now=now,
        open_counts={str(k): v for k, v in open_counts.items()},
        finished_counts={str(k): v for k, v in finished_counts.items()},
        oldest_open=oldest_open,
        minutes=minutes,
        stripe_errors=StripeErrors(
            touched=touched, failed=failed, retrying=retrying, recovered=recovered
        ),
        stuck=stuck,
        stuck_total=stuck_total,
        stuck_alert=stuck_alert,
        needs_attention=needs_attention,
        needs_attention_total=needs_attention_total,
    )


def list_refunds(
    *,
    session: Session,
    limit: int,
    cursor: str | None = None,
    status: str | None = None,
    charge_id: str | None = None,
    payment_id: str | None = None,
    initiated_by: str | None = None,
) -> RefundPage:
    """Newest first, as the API pages them; raises ``shared.services.refunds.InvalidCursor``."""
    page, next_cursor = page_of_refunds(
        session=session, limit=limit, cursor=cursor, status=status, charge_id=charge_id,
        payment_id=payment_id, initiated_by=initiated_by,
    )
    return RefundPage(now=db_now(session), refunds=page, next_cursor=next_cursor)


def refund_detail(
    *, session: Session, refund_id: str, stuck_alert_seconds: float
) -> RefundDetail:
    refund = session.get(Refund, refund_id) if could_be_refund_id(refund_id) else None
    if refund is None:
        raise _no_such_refund(refund_id)
    now = db_now(session)
    events = list(
        session.scalars(
            select(RefundEvent)
            .where(RefundEvent.refund_id == refund_id)
            .order_by(RefundEvent.created_at, RefundEvent.id)
        )
    )
    last_progress = refund_last_progress_at(session, refund_id) or refund.created_at
    payment = session.get(Payment, refund.payment_id)
    assert payment is not None  # a foreign key guarantees it
    charge = session.get(Charge, refund.charge_id) if refund.charge_id is not None else None
    amount = func.sum(Refund.amount)
    count, held, refunded = session.execute(
        select(
            func.count(),
            func.coalesce(amount.filter(Refund.status.not_in(RELEASED_STATUSES)), 0),
            func.coalesce(amount.filter(Refund.status == S.SUCCEEDED), 0),
        ).where(Refund.payment_id == payment.id)
    ).one()
    return RefundDetail(
        now=now,
        refund=refund,
        events=events,
        payment=PaymentSummary(
            payment=payment,
            charge=charge,
            refund_count=count,
            held=int(held),
            refunded=int(refunded),
        ),
        last_progress_at=last_progress,
        stuck=is_stuck(
            refund.status, last_progress, now, threshold_seconds=stuck_alert_seconds
        ),
    )


@dataclass(frozen=True)
class Reconciled:
    status: str
    task: str  # what was asked of the workers
    enqueued: bool  # False: the broker refused it; beat's reconciler comes round anyway


def reconcile_now(*, session: Session, refund_id: str, actor: str) -> Reconciled:
    """Ask the workers to take an open refund again now, and record who asked.

    A ``pending`` refund is enqueued for ``refunds.process`` again: the task claims the
    row and sends it with the refund's own Stripe idempotency key after looking it up
    at Stripe, so this never creates, enlarges or duplicates a refund. A refund held for
    a person (``shared.services.attention``) is released by this: its mark is cleared, so the
    worker tries it once more (and marks it again if Stripe still refuses). A refund Stripe
    already holds (``processing``, ``requires_action``) is past what that task does; a
    reconcile pass polls Stripe for it instead. Only the audit trail is written here,
    with the status unchanged; the task is sent after the commit.
    """
    if not could_be_refund_id(refund_id):
        raise _no_such_refund(refund_id)
    status = session.scalar(select(Refund.status).where(Refund.id == refund_id).with_for_update())
    if status is None:
        raise _no_such_refund(refund_id)
    if status in TERMINAL_STATUSES:
        raise RefundIsTerminal(f"The refund is '{status}': there is nothing left to reconcile.")
    task = PROCESS_REFUND_TASK if status == S.PENDING else RECONCILE_TASK
    detail: dict[str, Any] = {"action": RECONCILE_ACTION, "task": task}
    if attention.clear(session, refund_id):
        detail["cleared"] = "needs attention"
    record_event(
        session,
        refund_id=refund_id,
        from_status=status,
        to_status=status,
        actor=actor,
        detail=detail,
    )
    session.commit()
    enqueued = enqueue_refund(refund_id) if task == PROCESS_REFUND_TASK else enqueue_reconcile()
    return Reconciled(status=status, task=task, enqueued=enqueued)
