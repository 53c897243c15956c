"""/metrics reads refunds by status, the oldest non-terminal refund's age and the stuck
count from Postgres at scrape time, with queries an index can serve."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, create_engine, text

from shared.services.refund_gauges import _RECENT_QUERY, _STATE_QUERY
from tests.support import wait_for_http, web_process

HOUR = 3600
ROWS = [
    # status, created, updated, last status change (seconds ago; None: only its creation)
    ("pending", 2 * HOUR, 2 * HOUR, None),  # stuck: no progress for over STUCK_ALERT_SECONDS
    ("pending", 600, 600, None),
    # Stuck too, though beat re-enqueued it 10 s ago (touching updated_at): the gauge
    # counted from updated_at and read 0 for it whenever beat ran.
    ("pending", 3 * HOUR, 10, None),
    ("processing", 24 * HOUR + 60, 60, 60),  # Stripe took it a minute ago: not stuck
    ("processing", 3 * HOUR, 10, 2 * HOUR),  # polled 10 s ago, at Stripe for 2 h: stuck
    ("succeeded", HOUR, HOUR, HOUR),
    ("failed", 3 * 24 * HOUR, 2 * 24 * HOUR, 2 * 24 * HOUR),  # outside the 24 h window
]
INSERT_PAYMENT = """
INSERT INTO payments (id, amount, currency, status)
VALUES ('pay_gauges', 100000, 'usd', 'succeeded')
"""
INSERT_REFUND = """
INSERT INTO refunds (id, payment_id, amount, currency, status, stripe_idempotency_key, initiated_by,
                     created_at, updated_at)
VALUES (:id, 'pay_gauges', 100, 'usd', :status, :key, 'test',
        now() - make_interval(secs => :created), now() - make_interval(secs => :updated))
"""
INSERT_EVENT = """
INSERT INTO refund_events (refund_id, from_status, to_status, actor, created_at)
VALUES (:id, :from_status, :to_status, 'test', now() - make_interval(secs => :at))
"""


@pytest.fixture
def engine(ops_env: dict[str, str]) -> Iterator[Engine]:
    engine = create_engine(ops_env["DATABASE_URL"])
    yield engine
    engine.dispose()


@pytest.fixture
def add_aged_refunds(engine: Engine) -> Iterator[Callable[[], None]]:
    def add() -> None:
        with engine.begin() as conn:
            conn.execute(text(INSERT_PAYMENT))
            for i, (status, created, updated, changed) in enumerate(ROWS):
                row = {"id": f"rf_gauges_{i}", "status": status, "key": f"gauges-{i}"}
                conn.execute(text(INSERT_REFUND), {**row, "created": created, "updated": updated})
                event = {"id": row["id"], "from_status": None, "to_status": "pending"}
                conn.execute(text(INSERT_EVENT), {**event, "at": created})
                if changed is not None:
                    event = {**event, "from_status": "pending", "to_status": status}
                    conn.execute(text(INSERT_EVENT), {**event, "at": changed})

    yield add
    with engine.begin() as conn:
        # The audit trail refuses deletes (its triggers); a test's own rows may go.
        conn.execute(text("SET LOCAL session_replication_role = replica"))
        conn.execute(text("DELETE FROM refund_events WHERE refund_id LIKE 'rf_gauges_%'"))
        conn.execute(text("DELETE FROM refunds WHERE payment_id = 'pay_gauges'"))
        conn.execute(text("DELETE FROM payments WHERE id = 'pay_gauges'"))


def _value(metrics: str, name: str, status: str) -> float:
    match = re.search(rf'^{name}{{status="{status}"}} (\S+)$', metrics, re.MULTILINE)
    assert match, f"{name}{{status={status}}} missing"
    return float(match.group(1))


def test_refund_gauges_come_from_the_database_at_scrape_time(
    ops_env: dict[str, str], add_aged_refunds: Callable[[], None], log_dir: Path
) -> None:
    """Other tests' refunds share this database: counts are compared before and after
    adding ours; ours are by far the oldest, so the ages are ours."""
    env = {**ops_env, "STUCK_ALERT_SECONDS": str(HOUR)}
    web, url = web_process(env, log_dir, workers=1)
    with web:
        wait_for_http(f"{url}/healthz", proc=web.proc)
        before = httpx.get(f"{url}/metrics", timeout=15).text
        add_aged_refunds()
        after = httpx.get(f"{url}/metrics", timeout=15).text

    def added(name: str, status: str) -> float:
        return _value(after, name, status) - _value(before, name, status)

    assert added("refunds_open", "pending") == 3
    assert added("refunds_open", "processing") == 2
    assert added("refunds_open", "requires_action") == 0
    assert added("refunds_stuck", "pending") == 2
    assert added("refunds_stuck", "processing") == 1
    assert added("refunds_updated_last_24h", "succeeded") == 1
    assert added("refunds_updated_last_24h", "failed") == 0
    assert added("refunds_updated_last_24h", "pending") == 3
    assert 3 * HOUR <= _value(after, "refunds_oldest_open_age_seconds", "pending") < 3 * HOUR + 120
    assert (
        24 * HOUR
        <= _value(after, "refunds_oldest_open_age_seconds", "processing")
        < 24 * HOUR + 180
    )


@pytest.mark.parametrize("query", [_STATE_QUERY, _RECENT_QUERY], ids=["open", "recent"])
def test_the_scrape_queries_can_be_served_by_an_index(engine: Engine, query: str) -> None:
    with engine.begin() as conn:
        conn.execute(text("SET LOCAL enable_seqscan = off"))
        plan = "\n".join(
            row[0]
            for row in conn.execute(
                text(f"EXPLAIN {query}"), {"stuck_after": HOUR, "window": 86400}
            )
        )
    assert "ix_refunds_status_updated_at" in plan, plan
