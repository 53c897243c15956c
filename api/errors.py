"""The HTTP edge of the exception tree: every error is ``{"error", "message"}`` JSON."""

from __future__ import annotations

import logging

import psycopg
from flask import Flask, Response, g, jsonify
from sqlalchemy.exc import OperationalError
from werkzeug.exceptions import HTTPException

from shared.domain import errors as domain

log = logging.getLogger(__name__)

DOMAIN_STATUS: dict[type[domain.RefundServiceError], int] = {
    domain.NotFound: 404,
    domain.PaymentNotSucceeded: 412,
    domain.ChargeDisputed: 409,
    domain.AlreadyRefunded: 409,
    domain.AmountExceedsRefundable: 422,
    domain.IdempotencyKeyReused: 422,
    domain.SelfApproval: 403,
    domain.NotAwaitingApproval: 409,
    domain.CannotCancel: 409,
}

HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    500: "internal_error",
    503: "unavailable",
}


class ApiError(Exception):
    """An HTTP error raised at the edge (auth, validation)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code or HTTP_CODES.get(status, "error")
        self.message = message
        self.headers = headers or {}


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> Response:
    response = jsonify(error=code, message=message)
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def describe(exc: BaseException, request_id: str | None) -> tuple[int, str, str, dict[str, str]]:
    """Status, error code, message and headers that answer ``exc``: the one place every
    error becomes an answer, for Flask's views and for ``api.plain_endpoints``.
    Failures of our own are logged here, with the request id the answer quotes."""
    if isinstance(exc, ApiError):
        return exc.status, exc.code, exc.message, exc.headers
    if isinstance(exc, domain.OutcomeUnknown):
        # SPEC 3.4: the transaction may have committed. Saying "nothing was recorded"
        # would have a caller without an Idempotency-Key create a second refund.
        log.error(
            "commit outcome unknown", exc_info=exc.__cause__, extra={"request_id": request_id}
        )
        return (
            503,
            "outcome_unknown",
            "The database connection broke while this request was being committed, so it "
            "may or may not have been recorded. Retry with the same Idempotency-Key: it "
            "answers with the refund if it was recorded and creates it once if not. Without "
            "a key, look the refund up first (GET /v1/admin/refunds?charge_id=...).",
            {"Retry-After": "2"},
        )
    if isinstance(exc, domain.RefundServiceError):
        return DOMAIN_STATUS.get(type(exc), 422), exc.code, exc.message, {}
    if isinstance(exc, HTTPException):
        status = exc.code or 500
        message = {
            404: "No such endpoint. See /openapi.json for the API.",
            405: "This endpoint does not accept that method.",
            413: "The request body is too large.",
        }.get(status, exc.description or "Request failed.")
        headers = {"Allow": exc.get_response().headers["Allow"]} if status == 405 else {}
        return status, HTTP_CODES.get(status, "error"), message, headers
    if isinstance(exc, OperationalError | psycopg.OperationalError):
        # A statement failed before COMMIT (the database is down, a lock wait timed
        # out): nothing was committed, and the same request can safely be sent again.
        # A failure of the COMMIT itself is OutcomeUnknown (shared.adapters.db), above.
        log.error("database unavailable", exc_info=exc, extra={"request_id": request_id})
        return (
            503,
            "unavailable",
            "The service cannot reach its database right now; nothing was recorded. "
            "Retry shortly (with the same Idempotency-Key).",
            {"Retry-After": "2"},
        )
    log.error("unhandled error", exc_info=exc, extra={"request_id": request_id})
    return (
        500,
        "internal_error",
        f"Something went wrong on our side. Quote request id {request_id} when reporting it.",
        {},
    )


def register_error_handlers(app: Flask) -> None:
    # Flask hands every exception a view raises here, HTTP ones (404, 405, 413) included.
    @app.errorhandler(Exception)
    def _error(exc: Exception) -> Response:
        return error_response(*describe(exc, g.get("request_id")))
