"""Retention (SPEC 7): what beat deletes so nothing is kept forever.

- Idempotency records past ``IDEMPOTENCY_RETENTION_SECONDS`` (24 h): a key is only
  honoured for 24 h (``shared.services.idempotency``), after which its record is dead weight.
- Processed Stripe event ids past ``STRIPE_EVENT_RETENTION_SECONDS`` (30 days): Stripe
  redelivers an event for three days at most, so an id older than that cannot repeat.
- Refund events out past ``WEBHOOK_EVENT_RETENTION_SECONDS`` (30 days), with their
  deliveries and attempts (the foreign keys cascade): the delivery log keeps a month.
  An event still being delivered to some endpoint, or not yet fanned out, stays. The
  audit trail itself (``refund_events``) is never deleted, and an event's ``sequence``
  is counted from it (migration 0018), so a refund's later events keep counting on.

Deleted in batches of ``BATCH_SIZE`` rows, each in a short transaction of its own and
through an index on the row's time, so a big backlog (the first pass after a deploy)
never holds a long lock or a long transaction; rows another transaction holds are
skipped (``SKIP LOCKED``) and go next pass. A pass deletes at most ``MAX_BATCHES``
batches per table; the rest waits for the next pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import text

from shared.adapters.config import get_settings
from shared.adapters.db import get_engine

log = logging.getLogger(__name__)

BATCH_SIZE = 1000
MAX_BATCHES = 50


@dataclass(frozen=True)
class _Table:
    name: str
    time_column: str
    #: Rows never deleted, whatever their age (SQL).
    keep: str = "false"


IDEMPOTENCY_RECORDS = _Table("idempotency_records", "created_at")
# An event stored but not yet applied still has work to do (SPEC 3.3): never lost.
STRIPE_EVENTS = _Table("stripe_events", "received_at", keep="applied_at IS NULL")
WEBHOOK_EVENTS = _Table(
    "webhook_outbox", "created_at",
    keep="fanned_out_at IS NULL OR EXISTS (SELECT 1 FROM webhook_deliveries d "
         "WHERE d.event_id = webhook_outbox.id AND d.status = 'pending')",
)


def delete_expired(
    *, batch_size: int = BATCH_SIZE, max_batches: int = MAX_BATCHES
) -> dict[str, int]:
    """Delete what is past its retention; the number of rows deleted per table."""
    settings = get_settings()
    return {
        "idempotency_records_deleted": _delete_older_than(
            IDEMPOTENCY_RECORDS, settings.idempotency_retention_seconds,
            batch_size=batch_size, max_batches=max_batches,
        ),
        "stripe_events_deleted": _delete_older_than(
            STRIPE_EVENTS, settings.stripe_event_retention_seconds,
            batch_size=batch_size, max_batches=max_batches,
        ),
        "webhook_events_deleted": _delete_older_than(
            WEBHOOK_EVENTS, settings.webhook_event_retention_seconds,
            batch_size=batch_size, max_batches=max_batches,
        ),
    }


def _delete_older_than(
    table: _Table, seconds: float, *, batch_size: int, max_batches: int
) -> int:
    # Names come from the constants above, never from input.
    statement = text(
        f"DELETE FROM {table.name} WHERE ctid = ANY(ARRAY("  # noqa: S608
        f"SELECT ctid FROM {table.name} "
        f"WHERE {table.time_column} < now() - make_interval(secs => :seconds) "
        f"AND NOT ({table.keep}) "
        "LIMIT :batch FOR UPDATE SKIP LOCKED))"
    )
    deleted = 0
    for _ in range(max_batches):
        with get_engine().begin() as connection:
            count = connection.execute(statement, {"seconds": seconds, "batch": batch_size})
            deleted += count.rowcount
        if count.rowcount < batch_size:
            break
    if deleted:
        log.info("deleted expired rows", extra={"table": table.name, "count": deleted})
    return deleted
