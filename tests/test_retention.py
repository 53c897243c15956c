"""Retention (SPEC 7): beat deletes idempotency records past 24 h and processed Stripe
event ids past 30 days, in batches, and keeps everything younger.

Failed before: nothing was ever deleted (``shared.services.retention`` did not exist and a
reconcile pass deleted nothing).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import delete, func, select, text
from sqlalchemy.orm import Session

from shared.domain.models import IdempotencyRecord, StripeEvent
from shared.services.reconcile import reconcile_once
from shared.services.retention import delete_expired

HOUR = 3600
DAY = 24 * HOUR


@pytest.fixture
def rows(db: Session) -> Iterator[str]:
    """Rows of this test's own (by prefix), at ages around each retention."""
    tag = f"ret-{uuid.uuid4().hex[:8]}"
    ages = {"old": [25 * HOUR] * 7 + [40 * DAY], "young": [23 * HOUR, 60, 0]}
    for kind, seconds in ages.items():
        for i in range(len(seconds)):
            db.add(IdempotencyRecord(subject=tag, key=f"{kind}-{i}", request_hash="h"))
            db.add(StripeEvent(id=f"evt_{tag}_{kind}_{i}", type="charge.succeeded",
                               applied_at=func.now()))
    # Stored but never applied (Stripe was down for a year?): kept whatever its age.
    db.add(StripeEvent(id=f"evt_{tag}_unapplied", type="refund.updated"))
    db.flush()
    event_ages = {"old": [31 * DAY] * 7 + [400 * DAY], "young": [29 * DAY, 25 * HOUR, 0]}
    for kind, seconds in ages.items():
        for i, age in enumerate(seconds):
            db.execute(
                text("UPDATE idempotency_records SET created_at = now() - make_interval(secs => :a)"
                     " WHERE subject = :s AND key = :k"),
                {"a": age, "s": tag, "k": f"{kind}-{i}"},
            )
    for kind, seconds in event_ages.items():
        for i, age in enumerate(seconds):
            db.execute(
                text("UPDATE stripe_events SET received_at = now() - make_interval(secs => :a)"
                     " WHERE id = :id"),
                {"a": age, "id": f"evt_{tag}_{kind}_{i}"},
            )
    db.execute(text("UPDATE stripe_events SET received_at = now() - interval '400 days'"
                    " WHERE id = :id"), {"id": f"evt_{tag}_unapplied"})
    db.commit()
    yield tag
    db.execute(delete(IdempotencyRecord).where(IdempotencyRecord.subject == tag))
    db.execute(delete(StripeEvent).where(StripeEvent.id.like(f"evt_{tag}_%")))
    db.commit()


def _left(db: Session, tag: str) -> tuple[set[str], set[str]]:
    db.expire_all()
    keys = set(db.scalars(select(IdempotencyRecord.key).where(IdempotencyRecord.subject == tag)))
    events = {
        i.removeprefix(f"evt_{tag}_")
        for i in db.scalars(select(StripeEvent.id).where(StripeEvent.id.like(f"evt_{tag}_%")))
    }
    return keys, events


def test_expired_rows_are_deleted_in_batches_and_younger_ones_kept(
    db: Session, rows: str
) -> None:
    # Batches of 3: the 8 old rows of each table take three statements.
    deleted = delete_expired(batch_size=3)
    assert deleted["idempotency_records_deleted"] >= 8
    assert deleted["stripe_events_deleted"] >= 8
    keys, events = _left(db, rows)
    assert keys == {"young-0", "young-1", "young-2"}
    assert events == {"young_0", "young_1", "young_2", "unapplied"}


def test_a_pass_deletes_at_most_its_batches_and_the_next_pass_goes_on(
    db: Session, rows: str
) -> None:
    expired = text(
        "SELECT count(*) FROM idempotency_records WHERE created_at < now() - interval '24 hours'"
    )
    before = db.scalar(expired)
    assert before >= 8
    first = delete_expired(batch_size=2, max_batches=2)
    assert first["idempotency_records_deleted"] == 4  # 2 batches of 2: the rest waits
    db.commit()
    assert db.scalar(expired) == before - 4
    delete_expired(batch_size=2, max_batches=10)
    assert _left(db, rows)[0] == {"young-0", "young-1", "young-2"}


def test_the_reconcile_pass_beat_runs_deletes_them(db: Session, rows: str) -> None:
    summary = reconcile_once(enqueue=lambda refund_id: True)
    assert summary["idempotency_records_deleted"] >= 8
    assert summary["stripe_events_deleted"] >= 8
    assert _left(db, rows) == (
        {"young-0", "young-1", "young-2"}, {"young_0", "young_1", "young_2", "unapplied"}
    )


def test_both_deletes_are_served_by_an_index_on_the_rows_age(db: Session) -> None:
    for table, column in (("idempotency_records", "created_at"), ("stripe_events", "received_at")):
        indexed = db.scalar(
            select(func.count()).select_from(text("pg_indexes")).where(
                text("tablename = :t AND indexdef LIKE :d")
            ),
            {"t": table, "d": f"%({column})%"},
        )
        assert indexed >= 1, table
