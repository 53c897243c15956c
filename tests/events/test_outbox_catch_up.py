"""A worker's dispatcher catches up with an outbox backlog larger than one fan-out batch
on one NOTIFY, instead of a batch per wake-up: after a drain of a hundred thousand
refunds, a new subscriber's first events would otherwise wait behind the backlog for
minutes (make bench: 195,000 events behind)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shared.domain.models import WebhookOutboxEvent
from shared.services.webhook_delivery import DISPATCH_BATCH
from tests.events.conftest import backlog, start_worker, wait_for


def test_a_backlog_of_several_batches_is_fanned_out_on_one_notify(
    events_env: dict[str, str], edb: Session, log_dir: Path
) -> None:
    # The longest interval there is, so that only the backlog's one NOTIFY (Postgres folds
    # a transaction's identical notifications into one) wakes the dispatcher.
    worker = start_worker({**events_env, "WEBHOOK_DISPATCH_INTERVAL_SECONDS": "60"}, log_dir,
                          name="catch-up-worker")
    try:
        wait_for(lambda: " ready." in worker.log(), timeout=30, what="the worker")
        tag = backlog(edb, 3 * DISPATCH_BATCH + 1)

        def waiting() -> int:
            edb.expire_all()
            return int(edb.scalar(
                select(func.count()).select_from(WebhookOutboxEvent).where(
                    WebhookOutboxEvent.refund_id.like(f"rf_bl%\\_{tag}"),
                    WebhookOutboxEvent.fanned_out_at.is_(None))) or 0)

        wait_for(lambda: waiting() == 0, timeout=30, what="the whole backlog fanned out")
    finally:
        worker.stop()
