"""Celery tasks: thin wrappers that parse ids and call ``shared``."""

from __future__ import annotations

import logging

from shared.celery_app import PROCESS_REFUND_TASK, get_celery

log = logging.getLogger(__name__)
app = get_celery()


@app.task(name=PROCESS_REFUND_TASK)
def process_refund(refund_id: str) -> None:
    log.info("received refund %s", refund_id)
