"""Retention of refund events out: past WEBHOOK_EVENT_RETENTION_SECONDS, an event goes with
its deliveries and their attempts, unless some endpoint still has it pending (or it was
never fanned out); the audit trail stays, and a refund's next event numbers on from it.

Failed before: nothing of the outbox, deliveries or attempts was ever deleted."""

from __future__ import annotations

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from shared.adapters.db import unit_of_work
from shared.domain.models import (
    RefundEvent,
    RefundStatus,
    WebhookDelivery,
    WebhookDeliveryAttempt,
    WebhookOutboxEvent,
)
from shared.services import webhook_delivery
from shared.services.reconcile import reconcile_once
from shared.services.retention import delete_expired
from tests.events.conftest import Receiver, make_endpoint, make_refund, move

DAY = 24 * 3600


def _age(db: Session, event_ids: list[str], days: float) -> None:
    db.execute(text("UPDATE webhook_outbox SET created_at = now() - make_interval(secs => :s)"
                    " WHERE id = ANY(:ids)"), {"s": days * DAY, "ids": event_ids})
    db.commit()


def _events(db: Session, refund_id: str) -> list[WebhookOutboxEvent]:
    db.expire_all()
    return list(db.scalars(select(WebhookOutboxEvent).where(
        WebhookOutboxEvent.refund_id == refund_id).order_by(WebhookOutboxEvent.sequence)))


def _deliver_all() -> None:
    result = webhook_delivery.dispatch_once(enqueue=lambda delivery_id: True)
    assert result["skipped"] is False
    with unit_of_work() as session:
        ids = session.scalars(select(WebhookDelivery.id).where(
            WebhookDelivery.status == "pending")).all()
    for delivery_id in ids:
        webhook_delivery.deliver(delivery_id, enqueue=lambda _: True)


def test_old_delivered_events_go_with_their_log_and_pending_or_young_ones_stay(
    edb: Session, receiver: Receiver
) -> None:
    make_endpoint(edb, receiver.url)
    done = make_refund(edb)
    move(edb, done, RefundStatus.SUCCEEDED)
    _deliver_all()
    still_pending = make_refund(edb)
    young = make_refund(edb)
    _deliver_all()
    # Failed once, its retry an hour away: still to be delivered.
    edb.execute(text("UPDATE webhook_deliveries SET status = 'pending', "
                     "next_attempt_at = now() + interval '1 hour' WHERE event_id = :id"),
                {"id": _events(edb, still_pending)[0].id})
    edb.commit()
    old_ids = [e.id for e in _events(edb, done) + _events(edb, still_pending)]
    _age(edb, old_ids, 31)
    _age(edb, [e.id for e in _events(edb, young)], 29)
    done_deliveries = edb.scalars(select(WebhookDelivery.id).where(
        WebhookDelivery.event_id.in_([e.id for e in _events(edb, done)]))).all()
    assert len(done_deliveries) == 2

    deleted = delete_expired(batch_size=1)

    assert deleted["webhook_events_deleted"] >= 2
    assert _events(edb, done) == []
    assert edb.scalar(select(func.count()).select_from(WebhookDelivery).where(
        WebhookDelivery.id.in_(done_deliveries))) == 0
    assert edb.scalar(select(func.count()).select_from(WebhookDeliveryAttempt).where(
        WebhookDeliveryAttempt.delivery_id.in_(done_deliveries))) == 0
    assert len(_events(edb, still_pending)) == 1  # an endpoint still waits for it
    assert len(_events(edb, young)) == 1
    # The audit trail is never deleted, and the refund's next event numbers on from it.
    assert edb.scalar(select(func.count()).select_from(RefundEvent)
                      .where(RefundEvent.refund_id == done)) == 2
    move(edb, done, RefundStatus.FAILED, failure_reason="late failure")
    (late,) = _events(edb, done)
    assert (late.type, late.sequence, late.previous_status) == ("refund.failed", 3, "succeeded")


def test_the_reconcile_pass_beat_runs_deletes_old_events(
    edb: Session, receiver: Receiver
) -> None:
    make_endpoint(edb, receiver.url)
    refund_id = make_refund(edb)
    _deliver_all()
    _age(edb, [e.id for e in _events(edb, refund_id)], 31)
    summary = reconcile_once(enqueue=lambda refund_id: True)
    assert summary["webhook_events_deleted"] >= 1
    assert _events(edb, refund_id) == []
