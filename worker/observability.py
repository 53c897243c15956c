"""Logs and metrics for the worker and beat, wired through Celery signals.

``install()`` (called once by ``worker.app``) connects:
- ``setup_logging``: JSON lines (``shared.adapters.logging``) instead of Celery's text format,
  for both worker and beat;
- ``task_prerun``/``task_postrun``: task_id and refund_id bound to every log line
  the task writes, and task duration and result counted;
- ``task_retry``/``task_failure``/``task_rejected``/``task_revoked``: results;
- ``worker_ready``: the worker's metrics server on ``WORKER_METRICS_PORT``.

A task's return value is read for metrics, so task code needs no metrics calls:
``refunds.process`` may return the refund's resulting status (a string, or a
mapping / object with ``status`` and/or ``outcome``), counted in
``refunds_processed_total``; ``refunds.reconcile`` may return a mapping of counts,
added to ``refunds_reconcile_actions_total``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import Any

from celery import Celery, signals

from shared.adapters import logging as service_logging
from shared.adapters import metrics
from shared.adapters.celery_app import PROCESS_REFUND_TASK, RECONCILE_TASK
from shared.adapters.config import get_settings

_started: dict[str, float] = {}
_tokens: dict[str, Any] = {}
_installed = False


def process_type() -> str:
    return "beat" if "beat" in sys.argv[1:] else "worker"


def install(app: Celery) -> None:
    """Connect the handlers (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    signals.setup_logging.connect(_setup_logging, weak=False)
    signals.worker_ready.connect(_worker_ready, weak=False)
    signals.task_prerun.connect(_task_prerun, weak=False)
    signals.task_postrun.connect(_task_postrun, weak=False)
    signals.task_retry.connect(_task_retry, weak=False)
    signals.task_failure.connect(_task_failure, weak=False)
    signals.task_rejected.connect(_task_rejected, weak=False)
    signals.task_revoked.connect(_task_revoked, weak=False)
    # Celery's own publishes (a task's retries); ``enqueue_refund`` counts its own.
    signals.after_task_publish.connect(_after_publish, weak=False)


def _setup_logging(**_: Any) -> None:
    service_logging.configure(process_type(), get_settings().log_level)


def _worker_ready(**_: Any) -> None:
    # Not worker_init: that fires before logging is set up, and a port in use must be seen.
    settings = get_settings()
    metrics.start_worker_metrics_server(
        settings.worker_metrics_port, token=settings.metrics_token
    )


def _refund_id(task_name: str, args: Any, kwargs: Any) -> str | None:
    if task_name != PROCESS_REFUND_TASK:
        return None
    if kwargs and isinstance(kwargs.get("refund_id"), str):
        return str(kwargs["refund_id"])
    if args and isinstance(args[0], str):
        return str(args[0])
    return None


def _task_prerun(task_id: str, task: Any, args: Any = None, kwargs: Any = None, **_: Any) -> None:
    _started[task_id] = time.perf_counter()
    _tokens[task_id] = service_logging.bind(
        task_id=task_id, refund_id=_refund_id(task.name, args, kwargs)
    )


def _task_postrun(
    task_id: str, task: Any, retval: Any = None, state: str | None = None, **_: Any
) -> None:
    started = _started.pop(task_id, None)
    tokens = _tokens.pop(task_id, None)
    seconds = time.perf_counter() - started if started is not None else None
    if state == "SUCCESS":
        metrics.observe_task(task=task.name, result="succeeded", seconds=seconds)
        if task.name == PROCESS_REFUND_TASK:
            outcome = refund_outcome(retval)
            if outcome:
                metrics.observe_refund_outcome(outcome)
        elif task.name == RECONCILE_TASK and isinstance(retval, Mapping):
            metrics.observe_reconcile(dict(retval))
    elif seconds is not None:
        metrics.WORKER_TASK_LATENCY.labels(task.name).observe(seconds)
    if tokens:
        service_logging.unbind(tokens)


def refund_outcome(retval: Any) -> str | None:
    """The label for what ``refunds.process`` returned: the refund's status when it has one,
    else the attempt's outcome (e.g. ``skipped``, ``retry``)."""
    if isinstance(retval, str):
        return retval
    fields = retval if isinstance(retval, Mapping) else getattr(retval, "__dict__", {})
    for key in ("status", "outcome"):
        value = fields.get(key) if isinstance(fields, Mapping) else None
        if isinstance(value, str) and value:
            return str(value)
    return None


def _task_retry(sender: Any = None, **_: Any) -> None:
    name = getattr(sender, "name", None) or "unknown"
    metrics.observe_task(task=name, result="retried")
    if name == PROCESS_REFUND_TASK:
        metrics.observe_refund_outcome("retry")


def _task_failure(sender: Any = None, **_: Any) -> None:
    metrics.observe_task(task=getattr(sender, "name", None) or "unknown", result="failed")


def _task_rejected(message: Any = None, **_: Any) -> None:
    headers = getattr(message, "headers", None) or {}
    metrics.observe_task(task=str(headers.get("task", "unknown")), result="rejected")


def _task_revoked(request: Any = None, **_: Any) -> None:
    metrics.observe_task(task=getattr(request, "task", None) or "unknown", result="revoked")


def _after_publish(sender: Any = None, **_: Any) -> None:
    metrics.observe_task_published(str(sender))
