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
    elapsed = time.perf_counter() - started
    route = request.url_rule.rule if request.url_rule is not None else "unmatched"
    metrics.observe_http_request(
        method=request.method, route=route, status=response.status_code, seconds=elapsed
    )

    extra: dict[str, object] = {}
    if request.endpoint == CREATE_REFUND_ENDPOINT:
        outcome = _initiation_outcome(response)
        metrics.observe_refund_initiation(outcome)
        extra["outcome"] = outcome
        if response.status_code == 201:
            extra["refund_id"] = g.get("refund_id")
    if request.path in QUIET_PATHS and response.status_code < 500:
        return response
    caller = g.get("caller")
    access_log.info(
        "%s %s %s",
        request.method,
        route,
        response.status_code,
        extra={
            "method": request.method,
            "route": route,
            "path": request.path,
            "status": response.status_code,
            "duration_ms": round(elapsed * 1000, 2),
            "caller": getattr(caller, "subject", None),
            **extra,
        },
    )
    return response


@bp.teardown_app_request
def _unbind(exc: BaseException | None) -> None:
    tokens = g.pop("log_tokens", None)
    if tokens:
        service_logging.unbind(tokens)


def _initiation_outcome(response: Response) -> str:
    if response.headers.get("Idempotent-Replayed") == "true":
        return "replayed"
    if response.status_code == 201:
        return "created"
    body = response.get_json(silent=True)
    code = body.get("error") if isinstance(body, dict) else None
    return code if isinstance(code, str) and code.isidentifier() else str(response.status_code)
