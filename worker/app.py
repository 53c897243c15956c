"""The Celery app the worker and beat processes load, with the tasks registered."""

import os
from typing import Any

from celery.signals import worker_init

from shared.adapters.celery_app import get_celery
from worker.observability import process_type

# Names this process's Postgres connections (pg_stat_activity.application_name), so an
# operator (and make bench) can count what the workers hold.
os.environ.setdefault("PGAPPNAME", f"refunds-{process_type()}")

app = get_celery()


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
    import redis
    from kombu.transport import redis as kombu_redis

    connparams = kombu_redis.Channel._connparams

    def _connparams(self: kombu_redis.Channel, asynchronous: bool = False) -> Any:
        if self.connection is None or self.connection.client is None:
            raise redis.exceptions.ConnectionError("the broker channel is closed")
        return connparams(self, asynchronous=asynchronous)

    kombu_redis.Channel._connparams = _connparams  # type: ignore[method-assign]


_closed_broker_channels_raise_connection_errors()

import worker.tasks  # noqa: E402,F401 - registers the tasks on ``app``
from worker import webhook_tasks  # noqa: E402,F401 - refund events out: task and dispatcher
from worker.observability import install as install_observability  # noqa: E402

install_observability(app)  # JSON logs and metrics through Celery signals


@worker_init.connect
def _build_shared_clients(**_: Any) -> None:
    # Build the process-wide engine, pool and Stripe client once, before the thread pool
    # starts, so no two threads race to create them.
    from shared.adapters.db import get_engine, get_pool
    from shared.adapters.stripe_gateway import get_gateway

    get_engine()
    get_pool()
    get_gateway()
