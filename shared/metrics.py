"""Prometheus metrics: the definitions, one-line ``observe_*`` calls, and exposition.

Where the numbers come from:
- HTTP requests and refund initiations: Flask hooks in ``api/metrics.py``.
- Worker task results, refund outcomes, reconcile actions: Celery signals in
  ``worker/observability.py`` (task return values are read there, see below).
- Stripe call latency: ``StripeHttpClient``, the HTTP client the Stripe adapter uses,
  times every request; code calling Stripe some other way wraps it in
  ``with stripe_call_timer(method, endpoint): ...``.
- Refunds by status, the age of the oldest non-terminal refund and the stuck count:
  ``RefundStateCollector`` queries Postgres at scrape time (indexed, 2 s cap).

Processes: gunicorn runs several worker processes, so the web uses prometheus_client's
multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, set up by ``gunicorn.conf.py``) and
``/metrics`` sums every process. A Celery worker (threads pool: one process) serves
its own registry on ``WORKER_METRICS_PORT`` (``start_worker_metrics_server``).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import stripe
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPEN_STATUSES = ("pending", "processing", "requires_action")
ALL_STATUSES = (*OPEN_STATUSES, "succeeded", "failed", "canceled")
RECENT_WINDOW_SECONDS = 24 * 3600
SCRAPE_QUERY_TIMEOUT_MS = 2000

HTTP_REQUESTS = Counter(
    "refunds_http_requests_total",
    "HTTP requests answered, by route template and status.",
    ["method", "route", "status"],
)
HTTP_LATENCY = Histogram(
    "refunds_http_request_duration_seconds",
    "Time to answer an HTTP request, by route template.",
    ["method", "route"],
)
REFUND_INITIATIONS = Counter(
    "refunds_initiations_total",
    "POST /v1/admin/refunds answers by outcome: created, replayed, or the error code.",
    ["outcome"],
)
TASKS_PUBLISHED = Counter(
    "refunds_tasks_published_total",
    "Celery tasks sent to the broker, by task name.",
    ["task"],
)
WORKER_TASKS = Counter(
    "refunds_worker_tasks_total",
    "Celery task runs by task and result: succeeded, failed, retried, rejected, revoked.",
    ["task", "result"],
)
WORKER_TASK_LATENCY = Histogram(
    "refunds_worker_task_duration_seconds",
    "Time a task ran in the worker, by task.",
    ["task"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
REFUND_OUTCOMES = Counter(
    "refunds_processed_total",
    "Refund processing attempts by the refund's status afterwards (or 'noop' when another "
    "attempt had already moved it on).",
    ["outcome"],
)
RECONCILE_ACTIONS = Counter(
    "refunds_reconcile_actions_total",
    "What reconciliation passes did, by action.",
    ["action"],
)
STRIPE_LATENCY = Histogram(
    "refunds_stripe_request_duration_seconds",
    "Stripe API calls by method, endpoint template and HTTP status ('error' when no answer).",
    ["method", "endpoint", "status"],
    buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
)


# --------------------------------------------------------------------------- observe_*


def observe_http_request(*, method: str, route: str, status: int, seconds: float) -> None:
    HTTP_REQUESTS.labels(method, route, str(status)).inc()
    HTTP_LATENCY.labels(method, route).observe(seconds)


def observe_refund_initiation(outcome: str) -> None:
    REFUND_INITIATIONS.labels(outcome).inc()


def observe_task_published(task: str) -> None:
    TASKS_PUBLISHED.labels(task).inc()


def observe_task(*, task: str, result: str, seconds: float | None = None) -> None:
    WORKER_TASKS.labels(task, result).inc()
    if seconds is not None:
        WORKER_TASK_LATENCY.labels(task).observe(seconds)


def observe_refund_outcome(outcome: str) -> None:
    """One processing attempt ended with the refund in ``outcome`` (its status, or 'noop')."""
    REFUND_OUTCOMES.labels(outcome).inc()


def observe_reconcile(counts: dict[str, Any]) -> None:
    """Add a reconcile pass's counts, e.g. ``{"reenqueued": 2, "polled": 5}``."""
    for action, value in counts.items():
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            RECONCILE_ACTIONS.labels(action).inc(value)


_ID_SEGMENT = re.compile(r"^[a-z]{1,8}_[A-Za-z0-9_]+$")


def stripe_endpoint(url: str) -> str:
    """``https://api.stripe.com/v1/refunds/re_123?x=1`` -> ``/v1/refunds/{id}`` (bounded labels)."""
    path = re.sub(r"^[a-z]+://[^/]+", "", url).split("?", 1)[0]
    return "/".join("{id}" if _ID_SEGMENT.match(seg) else seg for seg in path.split("/")) or "/"


def observe_stripe_call(*, method: str, endpoint: str, status: int | str, seconds: float) -> None:
    STRIPE_LATENCY.labels(method.upper(), endpoint, str(status)).observe(seconds)


@contextmanager
def stripe_call_timer(method: str, endpoint: str) -> Iterator[None]:
    """Time a Stripe call made outside the Stripe adapter; its HTTP status is not known here."""
    start = time.perf_counter()
    status = "error"
    try:
        yield
        status = "ok"
    finally:
        observe_stripe_call(
            method=method, endpoint=endpoint, status=status, seconds=time.perf_counter() - start
        )


class StripeHttpClient(stripe.RequestsClient):
    """The Stripe SDK's requests client, timing every request (latency by endpoint and status)."""

    def request(  # type: ignore[override]
        self, method: str, url: str, headers: Any, post_data: Any = None
    ) -> tuple[bytes, int, Any]:
        start = time.perf_counter()
        status: int | str = "error"
        try:
            content, status, response_headers = super().request(method, url, headers, post_data)
            return content, status, response_headers
        finally:
            observe_stripe_call(
                method=method,
                endpoint=stripe_endpoint(url),
                status=status,
                seconds=time.perf_counter() - start,
            )


# --------------------------------------------------------------------------- refunds in the DB

_STATE_QUERY = """
SELECT status,
       count(*) AS n,
       coalesce(extract(epoch FROM now() - min(created_at)), 0) AS oldest_age,
       count(*) FILTER (WHERE updated_at < now() - make_interval(secs => :stuck_after)) AS stuck
FROM refunds
WHERE status IN ('pending', 'processing', 'requires_action')
GROUP BY status
"""
_RECENT_QUERY = """
SELECT status, count(*) FROM refunds
WHERE status IN ('pending', 'processing', 'requires_action', 'succeeded', 'failed', 'canceled')
  AND updated_at >= now() - make_interval(secs => :window)
GROUP BY status
"""


class RefundStateCollector(Collector):
    """Refund gauges read from Postgres at scrape time.

    Both queries use the (status, updated_at) index: the first reads only the
    non-terminal rows (few, unless something is stuck), the second a 24 h range.
    """

    def __init__(self, stuck_alert_seconds: float) -> None:
        self.stuck_alert_seconds = stuck_alert_seconds

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from sqlalchemy import text

        from shared.db import get_engine

        up = GaugeMetricFamily(
            "refunds_db_metrics_up", "1 if the refund gauges below could be read from Postgres."
        )
        open_ = GaugeMetricFamily(
            "refunds_open", "Refunds not yet in a terminal status, by status.", labels=["status"]
        )
        oldest = GaugeMetricFamily(
            "refunds_oldest_open_age_seconds",
            "Age (since creation) of the oldest refund in each non-terminal status; 0 when none.",
            labels=["status"],
        )
        stuck = GaugeMetricFamily(
            "refunds_stuck",
            "Non-terminal refunds not updated for STUCK_ALERT_SECONDS, by status.",
            labels=["status"],
        )
        recent = GaugeMetricFamily(
            "refunds_updated_last_24h",
            "Refunds whose status changed in the last 24 hours, by status.",
            labels=["status"],
        )
        start = time.perf_counter()
        try:
            with get_engine().connect() as conn:
                conn.execute(text(f"SET LOCAL statement_timeout = {SCRAPE_QUERY_TIMEOUT_MS}"))
                rows = {
                    r.status: r
                    for r in conn.execute(
                        text(_STATE_QUERY), {"stuck_after": self.stuck_alert_seconds}
                    )
                }
                recent_rows = dict(
                    conn.execute(text(_RECENT_QUERY), {"window": RECENT_WINDOW_SECONDS}).all()
                )
                conn.rollback()
        except Exception as exc:
            log.warning("refund metrics unavailable: %s", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        for status in OPEN_STATUSES:
            row = rows.get(status)
            open_.add_metric([status], row.n if row else 0)
            oldest.add_metric([status], float(row.oldest_age) if row else 0.0)
            stuck.add_metric([status], row.stuck if row else 0)
        for status in ALL_STATUSES:
            recent.add_metric([status], recent_rows.get(status, 0))
        up.add_metric([], 1)
        scrape = GaugeMetricFamily(
            "refunds_db_metrics_seconds", "Time the refund gauges' queries took."
        )
        scrape.add_metric([], time.perf_counter() - start)
        yield from (up, open_, oldest, stuck, recent, scrape)


# --------------------------------------------------------------------------- exposition


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def process_registry() -> CollectorRegistry:
    """This process's metrics, or every process's when running in multiprocess mode."""
    if multiprocess_dir():
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return registry
    return REGISTRY


def exposition(*, stuck_alert_seconds: float, include_db: bool = True) -> bytes:
    """The Prometheus text for ``/metrics``."""
    out = generate_latest(process_registry())
    if include_db:
        db_registry = CollectorRegistry(auto_describe=False)
        db_registry.register(RefundStateCollector(stuck_alert_seconds))
        db_registry.register(WebhookBacklogCollector())
        out += generate_latest(db_registry)
    return out


def start_worker_metrics_server(port: int, addr: str = "0.0.0.0") -> bool:  # noqa: S104 - internal network
    """Serve this process's metrics on ``addr:port``; a port in use is logged, not fatal:
    refunds keep flowing without metrics."""
    if port == 0:
        return False
    try:
        start_http_server(port, addr=addr, registry=process_registry())
    except OSError as exc:
        log.error(
            "worker metrics not served: port %s unavailable (%s); set WORKER_METRICS_PORT",
            port,
            exc.strerror,
        )
        return False
    log.info("worker metrics on http://%s:%s/metrics", addr, port)
    return True


# ------------------------------------------------------------- refund events out (SPEC 13)

WEBHOOK_DELIVERIES = Counter(
    "refunds_webhook_deliveries_total",
    "Webhook delivery attempts by outcome: delivered, retry (will be tried again), failed "
    "(the retry schedule is used up).",
    ["outcome"],
)
WEBHOOK_ATTEMPT_LATENCY = Histogram(
    "refunds_webhook_attempt_duration_seconds",
    "Time one webhook delivery attempt took, from connect to the answer or the timeout.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


def observe_webhook_attempt(result: Any) -> None:
    """One attempt of ``shared.webhook_delivery.deliver`` (its ``Outcome``)."""
    if result.outcome == "skipped":
        return
    WEBHOOK_DELIVERIES.labels(result.outcome).inc()
    WEBHOOK_ATTEMPT_LATENCY.observe(result.seconds)


_WEBHOOK_BACKLOG_QUERY = """
SELECT e.id AS endpoint_id, e.enabled, count(d.id) AS pending,
       coalesce(extract(epoch FROM now() - min(o.occurred_at)), 0) AS oldest_age
FROM webhook_endpoints e
LEFT JOIN webhook_deliveries d ON d.endpoint_id = e.id AND d.status = 'pending'
LEFT JOIN webhook_outbox o ON o.id = d.event_id
GROUP BY e.id, e.enabled
"""
_WEBHOOK_NOT_FANNED_QUERY = """
SELECT count(*) AS n, coalesce(extract(epoch FROM now() - min(created_at)), 0) AS oldest_age
FROM webhook_outbox WHERE fanned_out_at IS NULL
"""


class WebhookBacklogCollector(Collector):
    """Per endpoint, at scrape time: undelivered events and the age of the oldest (the
    alert: a subscriber that has not heard of a refund's change for that long)."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from sqlalchemy import text

        from shared.db import get_engine

        pending = GaugeMetricFamily(
            "refunds_webhook_pending_deliveries",
            "Events not yet delivered to each endpoint (being retried).",
            labels=["endpoint_id"],
        )
        oldest = GaugeMetricFamily(
            "refunds_webhook_oldest_undelivered_age_seconds",
            "Age of the oldest event not yet delivered to each endpoint; 0 when none.",
            labels=["endpoint_id"],
        )
        enabled = GaugeMetricFamily(
            "refunds_webhook_endpoint_enabled",
            "1 for an enabled endpoint, 0 for one disabled (by an operator or after failing).",
            labels=["endpoint_id"],
        )
        not_fanned = GaugeMetricFamily(
            "refunds_webhook_outbox_oldest_not_fanned_out_age_seconds",
            "Age of the oldest event not yet turned into deliveries; 0 when none.",
        )
        try:
            with get_engine().connect() as conn:
                conn.execute(text(f"SET LOCAL statement_timeout = {SCRAPE_QUERY_TIMEOUT_MS}"))
                rows = conn.execute(text(_WEBHOOK_BACKLOG_QUERY)).all()
                outbox = conn.execute(text(_WEBHOOK_NOT_FANNED_QUERY)).one()
                conn.rollback()
        except Exception as exc:
            log.warning("webhook metrics unavailable: %s", type(exc).__name__)
            return
        for row in rows:
            pending.add_metric([row.endpoint_id], row.pending)
            oldest.add_metric([row.endpoint_id], float(row.oldest_age))
            enabled.add_metric([row.endpoint_id], 1 if row.enabled else 0)
        not_fanned.add_metric([], float(outbox.oldest_age))
        yield from (pending, oldest, enabled, not_fanned)
