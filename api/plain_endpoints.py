"""The two calls made most, answered in plain WSGI in front of the Flask app:
``POST /v1/admin/refunds`` (the platform's) and ``POST /v1/webhooks/stripe`` (Stripe's,
several events per refund and in bursts).

Flask's request and response objects, hooks and error dispatch cost about as much CPU as
the rest of such a request (the statement, the enqueue, the log line; README,
Performance). So these two are answered here, with each rule kept where it is:
``api.auth.authorize``, ``api.refunds.initiate``, ``api.webhooks.receive``,
``api.errors.describe``, ``api.metrics.record_request``, ``api.request_id``. Every other
request goes to Flask, and so does a body that cannot be taken whole up front (no
Content-Length, a chunked one, or one over the limit: 413); the Flask views call the same
functions. tests/api/test_plain_endpoints.py holds the two ways to the same answers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from werkzeug.http import HTTP_STATUS_CODES

from api import webhooks
from api.auth import Caller, authorize
from api.errors import describe
from api.metrics import initiation_outcome, record_request
from api.refunds import answer_headers, initiate
from api.refunds import bp as refunds_bp
from api.request_id import request_id_from
from shared.adapters import logging as service_logging
from shared.services.refunds import Initiated

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
REFUNDS_PATH = refunds_bp.url_prefix or ""
STRIPE_WEBHOOK_PATH = webhooks.STRIPE_PATH


@dataclass
class _Call:
    """What a request made known before it was answered: for its metrics and log line."""

    caller: Caller | None = None
    initiated: Initiated | None = None
    log_fields: dict[str, object] | None = None


def _initiate(environ: dict[str, Any], body: bytes, call: _Call) -> tuple[int, str, dict[str, str]]:
    call.caller = authorize(environ.get("HTTP_AUTHORIZATION"), "write")
    call.initiated = result = initiate(call.caller, body, environ.get("HTTP_IDEMPOTENCY_KEY"))
    return result.status, json.dumps(result.body), answer_headers(result)


def _receive_stripe_event(
    environ: dict[str, Any], body: bytes, call: _Call
) -> tuple[int, str, dict[str, str]]:
    received = webhooks.receive(body, environ.get("HTTP_STRIPE_SIGNATURE"))
    call.log_fields = received.log_fields()
    return 200, _as_flask_writes(received.answer()), {}


ROUTES = {REFUNDS_PATH: _initiate, STRIPE_WEBHOOK_PATH: _receive_stripe_event}


def _as_flask_writes(value: dict[str, Any]) -> str:
    """JSON as ``flask.jsonify`` writes it (compact, then a newline)."""
    return json.dumps(value, separators=(",", ":")) + "\n"


class PlainEndpoints:
    def __init__(self, app: WSGIApp, max_request_bytes: int) -> None:
        self.app = app
        self.max_request_bytes = max_request_bytes

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        path = environ.get("PATH_INFO", "")
        route = ROUTES.get(path) if environ["REQUEST_METHOD"] == "POST" else None
        length = environ.get("CONTENT_LENGTH") or ""
        size = int(length) if length.isdigit() else None
        if (
            route is None
            or size is None
            or size > self.max_request_bytes
            or "HTTP_TRANSFER_ENCODING" in environ
        ):
            return self.app(environ, start_response)
        started = time.perf_counter()
        request_id = request_id_from(environ.get("HTTP_X_REQUEST_ID", ""))
        tokens = service_logging.bind(request_id=request_id, refund_id=None)
        call = _Call()
        error_code = None
        try:
            try:
                status, body, headers = route(environ, environ["wsgi.input"].read(size), call)
            except Exception as exc:  # every error is answered, as Flask answers them
                status, error_code, message, headers = describe(exc, request_id)
                body = _as_flask_writes({"error": error_code, "message": message})
            initiated = call.initiated
            record_request(
                method="POST",
                route=path,
                path=path,
                status=status,
                seconds=time.perf_counter() - started,
                caller=call.caller.subject if call.caller else None,
                initiation=(
                    initiation_outcome(
                        status, error_code, replayed=initiated is not None and initiated.replayed
                    ),
                    initiated.refund_id if initiated is not None else None,
                ) if route is _initiate else None,
                log_fields=call.log_fields,
            )
        finally:
            service_logging.unbind(tokens)
        encoded = body.encode()
        start_response(
            f"{status} {HTTP_STATUS_CODES[status].upper()}",
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(encoded))),
                *headers.items(),
                ("X-Request-Id", request_id),
            ],
        )
        return [encoded]
