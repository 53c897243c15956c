"""Reconciliation (SPEC 7): what beat runs every RECONCILE_INTERVAL_SECONDS.

One pass:
1. re-enqueues ``pending`` refunds nobody touched for STUCK_AFTER_SECONDS (a lost
   message, a crashed worker, a flushed broker: the pending row is the outbox);
2. asks Stripe about refunds it still holds as ``pending``/``requires_action`` (our
   ``processing``/``requires_action``) and moves ours on;
3. sends Stripe events stored but never applied to the workers again (SPEC 3.3);
4. deletes idempotency records and Stripe event ids past their retention
   (``shared.services.retention``);
5. reports stuck refunds (``shared.domain.stuck``: no progress at Stripe for longer than
   STUCK_ALERT_SECONDS), at error level.

A Postgres advisory lock makes passes exclusive across processes and machines, and
rows are taken with ``SKIP LOCKED``, so a pass never waits behind other work.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from shared.adapters.celery_app import enqueue_refund, enqueue_stripe_event
from shared.adapters.config import get_settings
from shared.adapters.db import get_engine, unit_of_work
from shared.adapters.rate_limit import RateLimited
from shared.adapters.stripe_gateway import (
    GATEWAY_ERRORS,
    StripeGateway,
    classify_error,
    get_gateway,
)
from shared.domain import stuck
from shared.domain.models import Payment, Refund, RefundStatus
from shared.services import attention
from shared.services.approvals import expire_approvals
from shared.services.refund_updates import apply_stripe_refund
from shared.services.retention import delete_expired
from shared.services.stripe_events import unapplied_event_ids
from shared.services.webhook_delivery import dispatch_in_reconcile

log = logging.getLogger(__name__)

ACTOR = "reconciler"
#: Advisory lock key of "a reconcile pass is running".
RECONCILE_LOCK = (7_310_002, 0)
#: Rows handled per step and pass; the oldest first, the rest next pass.
BATCH_SIZE = 500
IN_FLIGHT = (RefundStatus.PROCESSING, RefundStatus.REQUIRES_ACTION)
STUCK_IDS_REPORTED = 20


def reconcile_once(
    *,
    gateway: StripeGateway | None = None,
    enqueue: Callable[[str], bool] = enqueue_refund,
) -> dict[str, Any]:
    """Run one pass and return what it did (counts; ``skipped`` if another pass runs)."""
    gateway = gateway or get_gateway()
    with _pass_lock() as held:
        if not held:
            log.info("another reconcile pass is running; skipped")
            return {"skipped": True}
        expired_approvals = expire_approvals()
        requeued = _requeue_stuck_pending(enqueue)
        polled, moved, errors = _poll_in_flight(gateway)
        events = _resend_unapplied_events()
        deleted = delete_expired()
        webhooks_enqueued = dispatch_in_reconcile()  # refund events out (SPEC 13)
        with unit_of_work() as session:
            stuck = stuck_counts(session)
            stuck_ids = stuck_refund_ids(session, limit=STUCK_IDS_REPORTED)
    total_stuck = sum(stuck.values())
    if total_stuck:
        log.error(
            "%d refunds unfinished, without progress at Stripe for more than %ss",
            total_stuck, int(get_settings().stuck_alert_seconds),
            extra={"stuck": stuck, "refund_ids": stuck_ids},
        )
    summary = {
        "skipped": False,
        "approvals_expired": expired_approvals,
        "reenqueued": requeued,
        "polled": polled,
        "moved": moved,
        "poll_errors": errors,
        "stripe_events_resent": events,
        **deleted,
        "webhooks_enqueued": webhooks_enqueued,
        "stuck": total_stuck,
        "stuck_by_status": stuck,
        "stuck_refund_ids": stuck_ids,
    }
    log.info("reconcile pass done", extra={"summary": summary})
    return summary


def stuck_counts(session: Session) -> dict[str, int]:
    """Stuck refunds by status (``shared.domain.stuck``), for the alert."""
    return stuck.stuck_counts(session, threshold_seconds=get_settings().stuck_alert_seconds)


def stuck_refund_ids(session: Session, *, limit: int) -> list[str]:
    return stuck.stuck_refund_ids(
        session, threshold_seconds=get_settings().stuck_alert_seconds, limit=limit
    )


@contextmanager
def _pass_lock() -> Iterator[bool]:
    with get_engine().connect() as connection:
        held = bool(connection.scalar(select(func.pg_try_advisory_lock(*RECONCILE_LOCK))))
        connection.commit()
        try:
            yield held
        finally:
            released = not held
            if held:
                try:
                    released = bool(
                        connection.scalar(select(func.pg_advisory_unlock(*RECONCILE_LOCK)))
                    )
                    connection.commit()
                except Exception:
                    log.exception("could not release the reconcile lock")
            if not released:
                connection.invalidate()  # closing the connection releases the lock


def _requeue_stuck_pending(enqueue: Callable[[str], bool]) -> int:
    older = func.now() - timedelta(seconds=get_settings().stuck_after_seconds)
    with unit_of_work() as session:
        ids = list(
            session.scalars(
                select(Refund.id)
                .where(
                    Refund.status == RefundStatus.PENDING,
                    Refund.updated_at < older,
                    # A live lease: a worker is sending it right now.
                    or_(Refund.lease_expires_at.is_(None), Refund.lease_expires_at <= func.now()),
                )
                .where(attention.left_to_the_workers())  # held for a person: not retried
                .order_by(Refund.updated_at)
                .limit(BATCH_SIZE)
                .with_for_update(skip_locked=True)
            )
        )
        if not ids:
            return 0
        # Touch them so the next pass leaves them to the worker for another
        # STUCK_AFTER_SECONDS instead of enqueueing them again and again.
        session.execute(update(Refund).where(Refund.id.in_(ids)).values(updated_at=func.now()))
        session.commit()
    requeued = sum(1 for refund_id in ids if enqueue(refund_id))
    log.info("re-enqueued stuck pending refunds", extra={"count": requeued, "taken": len(ids)})
    return requeued


def _resend_unapplied_events() -> int:
    """Stripe events stored by the webhook but not applied (their task was lost or gave
    up): sent to the workers again."""
    with unit_of_work() as session:
        ids = unapplied_event_ids(
            session, older_than_seconds=get_settings().stuck_after_seconds, limit=BATCH_SIZE
        )
    sent = sum(1 for event_id in ids if enqueue_stripe_event(event_id))
    if ids:
        log.info("sent unapplied Stripe events again", extra={"count": sent, "taken": len(ids)})
    return sent


def _poll_in_flight(gateway: StripeGateway) -> tuple[int, int, int]:
    with unit_of_work() as session:
        rows = session.execute(
            select(Refund.id, Refund.status, Refund.stripe_refund_id, Refund.charge_id,
                   Payment.stripe_payment_intent_id)
            .join(Payment, Payment.id == Refund.payment_id)
            .where(Refund.status.in_(IN_FLIGHT))
            .order_by(Refund.updated_at)
            .limit(BATCH_SIZE)
            .with_for_update(of=Refund, skip_locked=True)
        ).all()
        if rows:
            # Oldest-polled first next time, so a big backlog is covered in turns.
            polled_ids = [r.id for r in rows]
            session.execute(
                update(Refund).where(Refund.id.in_(polled_ids)).values(updated_at=func.now())
            )
            session.commit()
    polled = moved = errors = 0
    for row in rows:
        try:
            if row.stripe_refund_id is not None:
                stripe_refund = gateway.retrieve_refund(row.stripe_refund_id)
            else:
                stripe_refund = gateway.find_refund(
                    refund_id=row.id, charge_id=row.charge_id,
                    payment_intent_id=row.stripe_payment_intent_id,
                )
        except GATEWAY_ERRORS as exc:
            errors += 1
            log.warning("could not poll Stripe", extra={"refund_id": row.id,
                                                        "error": classify_error(exc).describe()})
            if isinstance(exc, RateLimited):
                break  # the shared budget is spent: the rest waits for the next pass
            continue
        polled += 1
        if stripe_refund is None:
            log.error("in-flight refund unknown to Stripe", extra={"refund_id": row.id})
            continue
        with unit_of_work() as session:
            apply_stripe_refund(session, stripe_refund, actor=ACTOR)
            status = session.scalar(select(Refund.status).where(Refund.id == row.id))
            session.commit()
        moved += status != row.status
    return polled, moved, errors
