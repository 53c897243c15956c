"""The Celery app the worker and beat processes load, with the tasks registered."""

from shared.celery_app import get_celery

app = get_celery()

import worker.tasks  # noqa: E402,F401 - registers the tasks on ``app``
