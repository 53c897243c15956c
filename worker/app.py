"""The Celery app the worker and beat processes load, with the tasks registered."""

from typing import Any

from celery.signals import worker_init

from shared.celery_app import get_celery

app = get_celery()

import worker.tasks  # noqa: E402,F401 - registers the tasks on ``app``
from worker import webhook_tasks  # noqa: E402,F401 - refund events out: task and dispatcher
from worker.observability import install as install_observability  # noqa: E402

install_observability(app)  # JSON logs and metrics through Celery signals


@worker_init.connect
def _build_shared_clients(**_: Any) -> None:
    # Build the process-wide engine and Stripe client once, before the thread pool
    # starts, so no two threads race to create them.
    from shared.db import get_engine
    from shared.stripe_gateway import get_gateway

    get_engine()
    get_gateway()
