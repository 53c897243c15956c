"""Prometheus metrics: the definitions, one-line ``observe_*`` calls, and exposition.

Where the numbers come from:
- HTTP requests and refund initiations: Flask hooks in ``api/metrics.py``.
- Worker task results, refund outcomes, reconcile actions: Celery signals in
  ``worker/observability.py`` (task return values are read there, see below).
- Stripe call latency: ``stripe_gateway.StripeHttpClient``, the HTTP client of the one
  Stripe adapter, times every request; the wait for the shared Stripe budget before it,
  and refusals: ``rate_limit.StripeRateLimiter``.
- Refunds by status, the age of the oldest non-terminal refund and the stuck count
  (``shared.domain.stuck``): ``shared.services.refund_gauges`` queries Postgres at scrape time
  (indexed, 2 s cap).

Processes: gunicorn runs several worker processes, so the web uses prometheus_client's
multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, set up by ``gunicorn.conf.py``) and
``/metrics`` sums every process. A Celery worker (threads pool: one process) serves
its own registry on ``WORKER_METRICS_PORT`` (``start_worker_metrics_server``).
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import threading
from typing import Any

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import (
    ThreadingWSGIServer,
    _SilentHandler,
    make_server,
    make_wsgi_app,
)
from prometheus_client.multiprocess import MultiProcessCollector

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

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
STRIPE_BUDGET_WAIT = Histogram(
    "refunds_stripe_budget_wait_seconds",
    "How long a Stripe request waited for the shared budget (STRIPE_MAX_RPS) before it "
    "was sent.",
    buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5),
)
STRIPE_BUDGET_REFUSALS = Counter(
    "refunds_stripe_budget_refusals_total",
    "Stripe requests not sent because the shared budget was spent for longer than a "
    "caller waits; the refund is retried later, and this is not an attempt.",
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


#: Numbers in a reconcile pass's summary that are levels, not things the pass did: the
#: gauges read them from Postgres; adding them to a counter every pass would count each
#: stuck refund again every minute.
RECONCILE_LEVELS = frozenset({"stuck"})


def observe_reconcile(counts: dict[str, Any]) -> None:
    """Add a reconcile pass's counts, e.g. ``{"reenqueued": 2, "polled": 5}``."""
    for action, value in counts.items():
        if action in RECONCILE_LEVELS:
            continue
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            RECONCILE_ACTIONS.labels(action).inc(value)


_ID_SEGMENT = re.compile(r"^[a-z]{1,8}_[A-Za-z0-9_]+$")


def stripe_endpoint(url: str) -> str:
    """``https://api.stripe.com/v1/refunds/re_123?x=1`` -> ``/v1/refunds/{id}`` (bounded labels)."""
    path = re.sub(r"^[a-z]+://[^/]+", "", url).split("?", 1)[0]
    return "/".join("{id}" if _ID_SEGMENT.match(seg) else seg for seg in path.split("/")) or "/"


def observe_stripe_call(*, method: str, endpoint: str, status: int | str, seconds: float) -> None:
    STRIPE_LATENCY.labels(method.upper(), endpoint, str(status)).observe(seconds)


def observe_stripe_budget(*, waited: float | None) -> None:
    """A Stripe request took a turn of the shared budget after ``waited`` seconds, or was
    refused one (``None``). Kept apart from ``refunds_stripe_request_duration_seconds``,
    which times Stripe alone: together they tell a slow Stripe from a spent budget."""
    if waited is None:
        STRIPE_BUDGET_REFUSALS.inc()
    else:
        STRIPE_BUDGET_WAIT.observe(waited)


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


def exposition() -> bytes:
    """The Prometheus text of this process's (or every web process's) own metrics; the
    gauges read from Postgres are ``shared.services.refund_gauges``'s."""
    return generate_latest(process_registry())


METRICS_UNAUTHORIZED = {
    "error": "unauthorized",
    "message": "Send the metrics token: Authorization: Bearer <METRICS_TOKEN>.",
}


def scrape_allowed(authorization: str | None, token: str | None) -> bool:
    """Whether a scrape with this ``Authorization`` header may read the metrics: always
    when no METRICS_TOKEN is set, else only with ``Bearer <token>`` (compared in constant
    time)."""
    if not token:
        return True
    scheme, _, given = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode(), token.encode()
    )


def _token_guard(app: Any, token: str | None) -> Any:
    """The WSGI app behind the METRICS_TOKEN check, answering 401 JSON like the web's."""

    def guarded(environ: dict[str, Any], start_response: Any) -> Any:
        if scrape_allowed(environ.get("HTTP_AUTHORIZATION"), token):
            return app(environ, start_response)
        body = json.dumps(METRICS_UNAUTHORIZED).encode()
        start_response(
            "401 Unauthorized",
            [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
             ("WWW-Authenticate", 'Bearer realm="metrics"')],
        )
        return [body]

    return guarded


def start_worker_metrics_server(
    port: int, addr: str = "0.0.0.0", *, token: str | None = None  # noqa: S104 - internal network
) -> bool:
    """Serve this process's metrics on ``addr:port``, behind ``token`` when one is set
    (the same METRICS_TOKEN as the web's, so one Prometheus credential scrapes both).
    A port in use is logged, not fatal: refunds keep flowing without metrics."""
    if port == 0:
        return False
    try:
        app = _token_guard(make_wsgi_app(process_registry()), token)
        httpd = make_server(addr, port, app, ThreadingWSGIServer, handler_class=_SilentHandler)
        threading.Thread(target=httpd.serve_forever, name="metrics", daemon=True).start()
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
    """One attempt of ``shared.services.webhook_delivery.deliver`` (its ``Outcome``)."""
    if result.outcome == "skipped":
        return
    WEBHOOK_DELIVERIES.labels(result.outcome).inc()
    WEBHOOK_ATTEMPT_LATENCY.observe(result.seconds)
