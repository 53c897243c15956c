"""``GET /metrics`` and the app-wide hooks that feed it and the request log.

Registering this blueprint is all the instrumentation the views need: every
request is counted and timed by route template, ``POST /v1/admin/refunds`` answers
are counted by outcome (``shared.adapters.celery_app`` counts the tasks it hands to the
broker), and one JSON log line is written per request (probes and scrapes only when
they fail), carrying request_id and refund_id.
"""

from __future__ import annotations

import logging
import time

from flask import Blueprint, Response, g, jsonify, request

from shared.adapters import logging as service_logging
from shared.adapters import metrics
from shared.adapters.config import get_settings
from shared.services import refund_gauges

bp = Blueprint("metrics", __name__)
access_log = logging.getLogger("api.access")

CREATE_REFUND_ENDPOINT = "refunds.create_refund"
QUIET_PATHS = frozenset({"/metrics", "/healthz", "/readyz"})


@bp.get("/metrics")
def scrape() -> Response:
    settings = get_settings()
    # Checked before anything is read: an unauthenticated scrape costs no query.
    if not metrics.scrape_allowed(request.headers.get("Authorization"), settings.metrics_token):
        response = jsonify(metrics.METRICS_UNAUTHORIZED)
        response.status_code = 401
        response.headers["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    body = metrics.exposition() + refund_gauges.exposition(
        stuck_alert_seconds=settings.stuck_alert_seconds
    )
    return Response(body, mimetype=None, content_type=metrics.CONTENT_TYPE)


@bp.before_app_request
def _start() -> None:
    g.metrics_started = time.perf_counter()
    refund_id = (request.view_args or {}).get("refund_id")
    g.log_tokens = service_logging.bind(request_id=g.get("request_id"), refund_id=refund_id)


@bp.after_app_request
def _observe(response: Response) -> Response:
    started = g.get("metrics_started")
    if started is None:  # an earlier before_request hook answered first
        return response
    route = request.url_rule.rule if request.url_rule is not None else "unmatched"
    initiation = None
    if request.endpoint == CREATE_REFUND_ENDPOINT:
        initiation = _initiation_outcome(response), g.get("refund_id")
    caller = g.get("caller")
    record_request(
        method=request.method,
        route=route,
        path=request.path,
        status=response.status_code,
        seconds=time.perf_counter() - started,
        caller=getattr(caller, "subject", None),
        initiation=initiation,
        log_fields=g.get("access_log_fields"),
    )
    return response


def record_request(
    *,
    method: str,
    route: str,
    path: str,
    status: int,
    seconds: float,
    caller: str | None,
    initiation: tuple[str, str | None] | None = None,
    log_fields: dict[str, object] | None = None,
) -> None:
    """Count and time one answered request and write its log line (for a refund
    initiation, ``(outcome, refund_id)`` too; ``log_fields``: what else the view made
    known). Flask's requests come through ``_observe``; ``api.plain_endpoints`` calls it
    for the requests it serves itself."""
    metrics.observe_http_request(method=method, route=route, status=status, seconds=seconds)
    extra: dict[str, object] = dict(log_fields) if log_fields else {}
    if initiation is not None:
        outcome, refund_id = initiation
        metrics.observe_refund_initiation(outcome)
        extra["outcome"] = outcome
        if status == 201:
            extra["refund_id"] = refund_id
    if path in QUIET_PATHS and status < 500:
        return
    access_log.info(
        "%s %s %s",
        method,
        route,
        status,
        extra={
            "method": method,
            "route": route,
            "path": path,
            "status": status,
            "duration_ms": round(seconds * 1000, 2),
            "caller": caller,
            **extra,
        },
    )


@bp.teardown_app_request
def _unbind(exc: BaseException | None) -> None:
    tokens = g.pop("log_tokens", None)
    if tokens:
        service_logging.unbind(tokens)


def _initiation_outcome(response: Response) -> str:
    body = response.get_json(silent=True)
    code = body.get("error") if isinstance(body, dict) else None
    return initiation_outcome(
        response.status_code, code, replayed=response.headers.get("Idempotent-Replayed") == "true"
    )


def initiation_outcome(status: int, error_code: str | None, *, replayed: bool) -> str:
    """The ``outcome`` of a refund initiation: created, replayed, or the error's code."""
    if replayed:
        return "replayed"
    if status == 201:
        return "created"
    if isinstance(error_code, str) and error_code.isidentifier():
        return error_code
    return str(status)
