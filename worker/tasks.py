"""Celery tasks: thin wrappers that parse ids and call ``shared``."""

from __future__ import annotations

from typing import Any

from celery import Task

from shared import processing
from shared.celery_app import PROCESS_REFUND_TASK, RECONCILE_TASK, get_celery
from shared.reconcile import reconcile_once

app = get_celery()


# Retries are bounded by processing (MAX_ATTEMPTS), which also records the hand-over
# to the reconciler; Celery's own limit would end the task without recording it.
@app.task(name=PROCESS_REFUND_TASK, bind=True, max_retries=None)
def process_refund(self: Task, refund_id: str) -> str:
    result = processing.process_refund(str(refund_id), retries=self.request.retries or 0)
    if result.outcome is processing.Outcome.RETRY:
        raise self.retry(countdown=result.retry_in)
    return str(result.outcome)


@app.task(name=RECONCILE_TASK)
def reconcile() -> dict[str, Any]:
    return reconcile_once()
