"""A worker process keeps its Postgres connections bounded whatever its concurrency: its
threads applying a burst of Stripe's refund events, their answers from Stripe coming back
together, wait for one of ``WORKER_DB_CONNECTIONS`` instead of each opening its own."""

from __future__ import annotations

import time

import psycopg
from celery import Celery
from sqlalchemy.orm import Session

from shared.adapters.celery_app import (
    APPLY_STRIPE_EVENT_TASK,
    STRIPE_EVENTS_QUEUE,
    enqueue_refund,
)
from shared.adapters.config import get_settings
from shared.services import stripe_events
from tests.support import worker_process
from tests.worker.conftest import (
    Stack,
    initiate,
    seed_payments,
    wait_for_statuses,
)

EVENTS, THREADS, BOUND = 48, 32, 2
APPLICATION_NAME = "refunds-worker-bounded"


def test_threads_applying_stripe_events_share_a_bounded_set_of_connections(
    stack: Stack, db: Session
) -> None:
    # Refunds Stripe has, for events to name.
    ids = [initiate(db, charge_id) for charge_id in seed_payments(stack, db, 6)]
    for refund_id in ids:
        assert enqueue_refund(refund_id)
    rows = wait_for_statuses(db, ids, "succeeded", timeout=15)
    made = [row.stripe_refund_id for row in rows.values()]

    # A worker of its own (its own Redis, its own name in pg_stat_activity), Stripe slow
    # enough that all its threads wait on it at once and hear back together.
    broker = stack.own_redis()
    env = {**stack.env, "REDIS_URL": broker, "WORKER_DB_CONNECTIONS": str(BOUND),
           "PGAPPNAME": APPLICATION_NAME}
    argv = worker_process(env, stack.log_dir, name="worker-bounded", concurrency=THREADS).argv
    stack.process("worker-bounded", argv, env).start()
    stack.admin.faults(latency_ms=500)

    events = [
        {"id": f"evt_bounded_{i:03d}_{time.time_ns()}", "object": "event",
         "type": "refund.updated", "created": int(time.time()),
         "data": {"object": {"id": made[i % len(made)], "object": "refund"}}}
        for i in range(EVENTS)
    ]
    with psycopg.connect(get_settings().libpq_url, autocommit=True) as connection:
        for event in events:
            assert stripe_events.store_event(connection, event) == "deferred"
    sender = Celery("tests", broker=broker)
    try:
        for event in events:
            sender.send_task(APPLY_STRIPE_EVENT_TASK, args=[event["id"]],
                             queue=STRIPE_EVENTS_QUEUE)
    finally:
        sender.close()

    peak = 0
    with psycopg.connect(get_settings().libpq_url, autocommit=True) as watcher:
        deadline = time.monotonic() + 60
        while True:
            held, unapplied = watcher.execute(
                "SELECT (SELECT count(*) FROM pg_stat_activity WHERE application_name = %s),"
                " (SELECT count(*) FROM stripe_events WHERE id = ANY(%s)"
                "  AND applied_at IS NULL)",
                (APPLICATION_NAME, [e["id"] for e in events]),
            ).fetchone()
            peak = max(peak, held)
            if unapplied == 0:
                break
            assert time.monotonic() < deadline, f"{unapplied} events still unapplied"
            time.sleep(0.01)

    # SQLAlchemy's pool and the claim-and-record pool, each bounded, and the events-out
    # dispatcher's two.
    assert 0 < peak <= 2 * BOUND + 2, peak
