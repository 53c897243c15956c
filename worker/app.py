"""The Celery app the worker and beat processes load, with the tasks registered."""

import gc
import os
from typing import Any

from celery.signals import worker_init

from shared.adapters.celery_app import get_celery
from worker import broker
from worker.observability import process_type

# Names this process's Postgres connections (pg_stat_activity.application_name), so an
# operator (and make bench) can count what the workers hold.
os.environ.setdefault("PGAPPNAME", f"refunds-{process_type()}")

app = get_celery()


broker.install()  # kombu fixes, before any channel exists (see worker.broker)
# Task events published together, every EVENT_FLUSH_SECONDS (see worker.broker).
app.conf.worker_consumer = "worker.broker:RefundsConsumer"

import worker.tasks  # noqa: E402,F401 - registers the tasks on ``app``
from worker import webhook_tasks  # noqa: E402,F401 - refund events out: task and dispatcher
from worker.observability import install as install_observability  # noqa: E402

install_observability(app)  # JSON logs and metrics through Celery signals


@worker_init.connect
def _build_shared_clients(**_: Any) -> None:
    # Build the process-wide engine, pool and Stripe client once, before the thread pool
    # starts, so no two threads race to create them.
    from shared.adapters.config import get_settings
    from shared.adapters.db import bound_engine_pool, get_engine, get_pool
    from shared.adapters.stripe_gateway import get_gateway

    bound_engine_pool(get_settings().worker_db_connections)
    get_engine()
    get_pool()
    get_gateway()
    # What is loaded by now lives as long as the process: out of the garbage collector's
    # full passes, which walked all of it (about 100 ms each) while the threads waited.
    gc.freeze()
