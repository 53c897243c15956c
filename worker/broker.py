"""What the worker changes in how Celery and kombu talk to the broker, and why.

Each is measured on the zero-latency drain (``make bench``, ``BENCH_PROFILE=1``): a
refund's Celery task is one message in, one acknowledgement and three task events out,
and below a few milliseconds of CPU per refund that machinery is the larger part.
"""

from __future__ import annotations

from typing import Any

import redis
from celery.worker.consumer import Consumer
from kombu.transport import redis as kombu_redis

#: How long task events wait to be published together. Celery buffers task events
#: (received, started, succeeded, ...) and publishes the buffer as one message; flushed
#: at the next turn of the event loop, as Celery does, a busy worker published nearly
#: every event on its own (13 % of its CPU). Flower shows them this much later.
EVENT_FLUSH_SECONDS = 0.1


class RefundsConsumer(Consumer):
    """Celery's consumer, publishing buffered task events at most every
    ``EVENT_FLUSH_SECONDS`` (Celery still flushes at once when the buffer is full, and
    on shutdown)."""

    _flush_pending = False

    def on_send_event_buffered(self) -> None:
        # Called from any pool thread; the flag may race, which costs at most one
        # extra flush.
        if self.hub and not self._flush_pending:
            self._flush_pending = True
            self.hub.call_soon(self._schedule_flush)

    def _schedule_flush(self) -> None:
        # On the event loop's thread: its timer is not thread-safe.
        self.hub.call_later(EVENT_FLUSH_SECONDS, self._flush_buffered_events)

    def _flush_buffered_events(self) -> None:
        self._flush_pending = False
        self._flush_events()


def install() -> None:
    """Apply the kombu changes below (idempotent)."""
    if getattr(kombu_redis.Channel, "_refunds_installed", False):
        return
    _closed_broker_channels_raise_connection_errors()
    _one_redis_client_per_channel()
    kombu_redis.Channel._refunds_installed = True  # type: ignore[attr-defined]


def _closed_broker_channels_raise_connection_errors() -> None:
    """After the broker connection is lost, kombu's Redis channel may still be used (to
    hand back the messages the worker holds, or to acknowledge a task that finished a
    moment later) with its transport already gone. kombu then fails with an
    AttributeError, which is no broker error, so Celery calls it unrecoverable and the
    worker exits (the chaos run, after a Redis restart: about one run in three). Raised
    as the connection error it is, Celery handles it as any lost connection: it logs,
    reconnects and goes on. Nothing is lost: the broker redelivers unacknowledged
    messages after its visibility timeout, and the reconciler re-enqueues every pending
    refund."""
    connparams = kombu_redis.Channel._connparams

    def _connparams(self: kombu_redis.Channel, asynchronous: bool = False) -> Any:
        if self.connection is None or self.connection.client is None:
            raise redis.exceptions.ConnectionError("the broker channel is closed")
        return connparams(self, asynchronous=asynchronous)

    kombu_redis.Channel._connparams = _connparams  # type: ignore[method-assign]


def _one_redis_client_per_channel() -> None:
    """kombu builds a new redis-py client for every command it sends outside the
    consumer's own connection (each acknowledgement, each event publish, each message
    taken in), and building one costs about 0.1 ms of CPU (redis-py copies its table of
    response callbacks). A client holds no state of its own beyond its connection pool,
    which is the channel's either way, and is safe across threads: one per channel and
    pool serves them all. A new pool (after a lost connection) gets a new client."""
    create_client = kombu_redis.Channel._create_client

    def _create_client(self: kombu_redis.Channel, asynchronous: bool = False) -> Any:
        if asynchronous:
            return create_client(self, asynchronous=True)
        pool = self.pool
        client = self.__dict__.get("_sync_client")
        if client is None or client.connection_pool is not pool:
            client = create_client(self, asynchronous=False)
            self.__dict__["_sync_client"] = client
        return client

    kombu_redis.Channel._create_client = _create_client  # type: ignore[method-assign]
