"""Celery tasks: thin wrappers that parse ids and call ``shared``."""

from __future__ import annotations

from typing import Any

import psycopg
from celery import Task
from psycopg_pool import PoolTimeout
from sqlalchemy.exc import TimeoutError as EnginePoolTimeout

from shared.adapters.celery_app import (
    APPLY_STRIPE_EVENT_TASK,
    PROCESS_REFUND_TASK,
    RECONCILE_TASK,
    begin_coalesced,
    get_celery,
)
from shared.adapters.stripe_gateway import GATEWAY_ERRORS, get_gateway
from shared.services import processing, stripe_events
from shared.services.reconcile import reconcile_once

app = get_celery()

#: Postgres unreachable, its connection lost, or every connection of a pool busy past the
#: pool's timeout: the refund stays as it was committed, and the task comes back after a
#: pause (the reconciler would find it too).
DATABASE_ERRORS = (psycopg.OperationalError, PoolTimeout, EnginePoolTimeout)


# Retries are bounded by processing (MAX_ATTEMPTS), which also records the hand-over
# to the reconciler; Celery's own limit would end the task without recording it.
@app.task(name=PROCESS_REFUND_TASK, bind=True, max_retries=None)
def process_refund(self: Task, refund_id: str) -> str:
    retries = self.request.retries or 0
    try:
        result = processing.process_refund(str(refund_id), retries=retries)
    except DATABASE_ERRORS as exc:
        raise self.retry(countdown=processing.retry_countdown(retries), exc=exc) from exc
    if result.outcome is processing.Outcome.RETRY:
        raise self.retry(countdown=result.retry_in)
    # The refund's status afterwards when it has one (refunds_processed_total), else what
    # the attempt came to (skipped, held, left_for_reconciler).
    return str(result.status or result.outcome)


@app.task(name=APPLY_STRIPE_EVENT_TASK, bind=True, max_retries=8)
def apply_stripe_event(self: Task, event_id: str, coalesced: str | None = None) -> str:
    retries = self.request.retries or 0
    begin_coalesced(coalesced)  # before Stripe is asked: see enqueue_stripe_event
    try:
        return stripe_events.apply_stored_event(
            str(event_id), gateway=get_gateway(), coalesced=coalesced is not None)
    except (*GATEWAY_ERRORS, *DATABASE_ERRORS) as exc:
        # Stripe or Postgres unreachable: the event stays stored, unapplied; after the
        # last retry the reconciler sends it again.
        raise self.retry(countdown=processing.retry_countdown(retries), exc=exc) from exc


@app.task(name=RECONCILE_TASK)
def reconcile() -> dict[str, Any]:
    return reconcile_once()
