"""Refund events out (SPEC 13) in the worker: the delivery task and the dispatcher thread.

Each worker process runs one dispatcher thread. It LISTENs on Postgres' ``webhook_outbox``
channel, which the outbox trigger notifies when a status change commits, so an event is
on its way within milliseconds; and it wakes every WEBHOOK_DISPATCH_INTERVAL_SECONDS to
enqueue retries that came due and anything a lost NOTIFY or message left behind.

In a worker that also makes refunds, at most half of the pool's threads deliver webhooks
at once: a task that finds no room hands its delivery back for a second later, so
refunds always have threads, however many endpoints are slow or dead.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import psycopg
from celery import Task
from celery.signals import worker_init, worker_ready, worker_shutdown

from shared.adapters import metrics
from shared.adapters.celery_app import DELIVER_WEBHOOK_TASK, REFUNDS_QUEUE, get_celery
from shared.adapters.config import get_settings
from shared.services import webhook_delivery

log = logging.getLogger(__name__)
app = get_celery()

CHANNEL = "webhook_outbox"
#: How long a dispatcher waits after a NOTIFY for more to arrive before it dispatches.
COALESCE_SECONDS = 0.05
_slots = threading.BoundedSemaphore(1)
_stop = threading.Event()


@app.task(name=DELIVER_WEBHOOK_TASK, bind=True)
def deliver_webhook(self: Task, delivery_id: str) -> str:
    if not _slots.acquire(blocking=False):
        webhook_delivery.postpone(str(delivery_id))
        return "busy"
    try:
        outcomes = webhook_delivery.deliver(
            str(delivery_id), observe=metrics.observe_webhook_attempt
        )
    finally:
        _slots.release()
    return outcomes[-1].outcome


@worker_init.connect
def _size_slots(sender: Any = None, **_: Any) -> None:
    """Half the pool for a worker that also makes refunds; all of it for one started with
    ``-Q refunds.webhooks`` (and the refund workers with ``-X refunds.webhooks``)."""
    global _slots
    concurrency = int(getattr(sender, "concurrency", 0) or get_settings().worker_concurrency)
    consumed = set(getattr(getattr(sender, "app", app).amqp.queues, "consume_from", None)
                   or ())
    shares_refunds = not consumed or REFUNDS_QUEUE in consumed
    _slots = threading.BoundedSemaphore(max(1, concurrency // 2 if shares_refunds
                                            else concurrency))


@worker_ready.connect
def _start_dispatcher(**_: Any) -> None:
    _stop.clear()
    threading.Thread(target=dispatch_forever, name="webhook-dispatcher", daemon=True).start()


@worker_shutdown.connect
def _stop_dispatcher(**_: Any) -> None:
    _stop.set()


def dispatch_forever() -> None:
    settings = get_settings()
    conninfo = settings.libpq_url
    interval = settings.webhook_dispatch_interval_seconds
    while not _stop.is_set():
        try:
            with psycopg.connect(conninfo, autocommit=True, connect_timeout=5) as conn:
                conn.execute(f"LISTEN {CHANNEL}")
                while not _stop.is_set():
                    _dispatch()
                    # Wait for a commit's NOTIFY or the interval, then a moment more
                    # (COALESCE_SECONDS) and take every notification there by then: one
                    # dispatch serves them all. Refunds draining at a few hundred a second
                    # notify that often; a dispatch each time cost the worker about a
                    # sixth of its CPU (make bench, BENCH_PROFILE=1).
                    for _ in conn.notifies(timeout=interval, stop_after=1):
                        _stop.wait(COALESCE_SECONDS)
                    for _ in conn.notifies(timeout=0.0):
                        pass
        except Exception:
            log.exception("webhook dispatcher: connection lost; reconnecting")
            _stop.wait(interval)


def _dispatch() -> None:
    try:
        webhook_delivery.dispatch_once()
    except Exception:
        log.exception("webhook dispatch failed; retried at the next interval")
