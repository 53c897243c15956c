"""``POST /v1/admin/refunds`` answered in plain WSGI, in front of the Flask app.

It is the call the platform makes most, and Flask's request and response objects, hooks
and error dispatch cost about as much CPU as the rest of the request (the statement,
the enqueue, the log line; README, Performance). So this endpoint answers it itself,
with the rules kept where they are: ``api.auth.authorize``, ``api.refunds.initiate``,
``api.errors.describe``, ``api.metrics.record_request``, ``api.request_id``. It leaves
to Flask every other request and a body it cannot take whole up front (no
Content-Length, a chunked one, or one over the limit: 413); the Flask view runs the same
``initiate``. tests/api/test_initiation_endpoint.py holds the two to the same answers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from typing import Any

from werkzeug.http import HTTP_STATUS_CODES

from api.auth import Caller, authorize
from api.errors import describe
from api.metrics import initiation_outcome, record_request
from api.refunds import answer_headers, bp, initiate
from api.request_id import request_id_from
from shared.adapters import logging as service_logging
from shared.services.refunds import Initiated

PATH = bp.url_prefix or ""
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class InitiationEndpoint:
    def __init__(self, app: WSGIApp, max_request_bytes: int) -> None:
        self.app = app
        self.max_request_bytes = max_request_bytes

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        length = environ.get("CONTENT_LENGTH") or ""
        size = int(length) if length.isdigit() else None
        if (
            environ["REQUEST_METHOD"] != "POST"
            or environ.get("PATH_INFO") != PATH
            or size is None
            or size > self.max_request_bytes
            or "HTTP_TRANSFER_ENCODING" in environ
        ):
            return self.app(environ, start_response)
        started = time.perf_counter()
        request_id = request_id_from(environ.get("HTTP_X_REQUEST_ID", ""))
        tokens = service_logging.bind(request_id=request_id, refund_id=None)
        caller: Caller | None = None
        result: Initiated | None = None
        error_code = None
        try:
            try:
                caller = authorize(environ.get("HTTP_AUTHORIZATION"), "write")
                raw_body = environ["wsgi.input"].read(size)
                result = initiate(caller, raw_body, environ.get("HTTP_IDEMPOTENCY_KEY"))
            except Exception as exc:  # every error is answered, as Flask answers them
                status, error_code, message, headers = describe(exc, request_id)
                # What flask.jsonify writes.
                body = (
                    json.dumps({"error": error_code, "message": message}, separators=(",", ":"))
                    + "\n"
                )
            else:
                status, body, headers = (
                    result.status,
                    json.dumps(result.body),
                    answer_headers(result),
                )
            record_request(
                method="POST",
                route=PATH,
                path=PATH,
                status=status,
                seconds=time.perf_counter() - started,
                caller=caller.subject if caller else None,
                initiation=(
                    initiation_outcome(
                        status, error_code, replayed=result is not None and result.replayed
                    ),
                    result.refund_id if result is not None else None,
                ),
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
