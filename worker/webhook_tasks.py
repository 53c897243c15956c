"""Refund events out (SPEC 13) in the worker: the delivery task and the dispatcher thread.

Each worker process runs one dispatcher thread. It LISTENs on Postgres' ``webhook_outbox``
channel, which the outbox trigger notifies when a status change commits, so an event is
on its way within milliseconds; and it wakes every WEBHOOK_DISPATCH_INTERVAL_SECONDS to
enqueue retries that came due and anything a lost NOTIFY or message left behind.

In a worker that also makes refunds, at most half of the pool's threads deliver webhooks
at once: a task that finds no room hands its delivery back for a second later, so
refunds always have threads, however many endpoints are slow or dead. And refunds come
first for the CPU: while refunds keep the process busy, deliveries take about
``REFUNDS_FIRST_SHARE`` of it (``_RefundsFirst``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import psycopg
from celery import Task
from celery.signals import worker_init, worker_ready, worker_shutdown
from celery.worker import state as worker_state

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

#: The share of the process' CPU deliveries keep while refunds need it.
REFUNDS_FIRST_SHARE = 0.05
#: "Refunds need it": the process' other work (refunds, with Celery's own) used this much
#: of a core, its interpreter lock's worth, over the last CPU_WINDOW_SECONDS. Low, because
#: deliveries left unpaced take CPU from refunds and so keep this reading down: at half a
#: core, a loaded machine kept deliveries unpaced (a fifth of the worker; drain ratio 0.54).
REFUNDS_BUSY_CORES = 0.25
CPU_WINDOW_SECONDS = 0.2
#: ... and only while the CPU is what refunds wait for: the process uses this much of its
#: one core (a busy worker's threads, handing its interpreter lock to each other, reach
#: about 0.8 of it), or the machine's load is at its core count. Refunds held back by
#: Stripe's rate limit (the usual state at Stripe's limit: half a core at 100/s) leave the
#: CPU free, and pacing then would only let events pile up (two a refund, faster than a
#: paced worker sends them).
CPU_BOUND_CORES = 0.7


class _RefundsFirst:
    """Paces delivery threads while refunds keep the process busy: after each step a
    delivery thread pauses for the CPU the step cost it, times (1 - share) / share, times
    the threads delivering, so deliveries together take about ``REFUNDS_FIRST_SHARE`` of
    the process and refunds the rest. A backlog of events then waits for the refunds
    rather than slowing them (make bench: the refund drain beside events out); with
    refunds idle or few, deliveries go at full speed.

    "Busy" is the process' CPU time less the deliveries' own: how much of the one core
    a Python process can use the refunds took. (Yielding the interpreter lock and timing
    its return says nothing: the yielding thread usually takes it straight back.)"""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._delivering = 0
        self._delivery_cpu = 0.0
        self._window = (time.monotonic(), time.process_time(), 0.0)
        self._busy = False

    def __enter__(self) -> _RefundsFirst:
        with self._lock:
            self._delivering += 1
        return self

    def __exit__(self, *_: object) -> None:
        with self._lock:
            self._delivering -= 1

    def pace(self, cpu_seconds: float) -> None:
        with self._lock:
            self._delivery_cpu += max(0.0, cpu_seconds)
            busy, delivering = self._refunds_busy(), self._delivering
        if busy and cpu_seconds > 0 and _refunds_running():
            factor = (1 - REFUNDS_FIRST_SHARE) / REFUNDS_FIRST_SHARE
            time.sleep(cpu_seconds * factor * max(1, delivering))

    def _refunds_busy(self) -> bool:
        now, cpu = time.monotonic(), time.process_time()
        started, cpu_then, deliveries_then = self._window
        if now - started >= CPU_WINDOW_SECONDS:
            elapsed = now - started
            others = (cpu - cpu_then) - (self._delivery_cpu - deliveries_then)
            self._busy = others / elapsed >= REFUNDS_BUSY_CORES and _cpu_bound(
                (cpu - cpu_then) / elapsed)
            self._window = (now, cpu, self._delivery_cpu)
        return self._busy


def _cpu_bound(process_cores: float) -> bool:
    """The process has no CPU to spare: its interpreter lock's core is nearly used up, or
    the machine's run queue is as long as it has cores."""
    return process_cores >= CPU_BOUND_CORES or os.getloadavg()[0] >= (os.cpu_count() or 1)


def _refunds_running() -> bool:
    """A task other than a delivery is running in this worker."""
    try:
        running = list(worker_state.active_requests)
    except RuntimeError:  # changed by another thread as it was read: look next time
        return True
    return any(request.name != DELIVER_WEBHOOK_TASK for request in running)


_refunds_first = _RefundsFirst()


@app.task(name=DELIVER_WEBHOOK_TASK, bind=True)
def deliver_webhook(self: Task, delivery_id: str) -> str:
    if not _slots.acquire(blocking=False):
        webhook_delivery.postpone(str(delivery_id))
        return "busy"
    try:
        with _refunds_first:
            outcomes = webhook_delivery.deliver(
                str(delivery_id), observe=metrics.observe_webhook_attempt,
                pace=_refunds_first.pace,
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
                    # A full batch fanned out means more are waiting (a drain commits
                    # hundreds of status changes a second, two events each, and a
                    # dispatcher sharing the interpreter with 64 refund threads gets its
                    # turn seldom): go on at once until the outbox is caught up, or
                    # every later event, a new subscriber's first among them, waits
                    # behind the backlog (make bench: 195,000 behind after a drain).
                    while _dispatch() >= webhook_delivery.DISPATCH_BATCH and not _stop.is_set():
                        pass
                    # Wait for a commit's NOTIFY or the interval, then a moment more
                    # (COALESCE_SECONDS) and take every notification there by then: one
                    # dispatch serves them all. Refunds draining at a few hundred a second
                    # notify that often; a dispatch each time cost the worker about a
                    # sixth of its CPU (make bench, BENCH_PROFILE=1).
                    if _notified(conn, interval):
                        _stop.wait(COALESCE_SECONDS)
                    for _ in conn.notifies(timeout=0.0):
                        pass
        except Exception:
            log.exception("webhook dispatcher: connection lost; reconnecting")
            _stop.wait(interval)


def _notified(conn: psycopg.Connection[Any], timeout: float) -> bool:
    """Whether a notification arrives within ``timeout``. Takes one and closes the
    generator: ``notifies(stop_after=1)`` still hands out every notification of a batch it
    read (a busy drain queues hundreds), and a pause after each of them kept a dispatcher
    from dispatching for many minutes (make bench)."""
    notifications = conn.notifies(timeout=timeout, stop_after=1)
    try:
        return next(notifications, None) is not None
    finally:
        notifications.close()


def _dispatch() -> int:
    """One dispatch; how many events it fanned out (0 when it failed)."""
    try:
        return int(webhook_delivery.dispatch_once().get("events", 0))
    except Exception:
        log.exception("webhook dispatch failed; retried at the next interval")
        return 0
