"""GET /openapi.json: the OpenAPI 3.1 description of every endpoint (SPEC 3.6).

Written out rather than generated: the published contract is the seed's page plus the
rules of SPEC 3, and reads best as one document. Its limits come from the same
constants the request models use, and tests check that the models, the live answers
and this document agree. Scope names come from the settings, so the document says
what this deployment actually requires.
"""

from __future__ import annotations

from typing import Any, get_args

from flask import Blueprint, Response, jsonify

from api.refunds import IDEMPOTENCY_KEY_MAX
from api.request_id import REQUEST_ID_MAX
from api.schemas import (
    CHARGE_ID_MAX,
    CURSOR_MAX,
    LIST_LIMIT_DEFAULT,
    LIST_LIMIT_MAX,
    MAX_SAFE_INTEGER,
    NO_NUL_PATTERN,
    NOTE_MAX,
    PRINTABLE_PATTERN,
    REASON_MAX,
    RefundStatusName,
)
from api.webhook_endpoints import DELIVERY_STATUSES, EVENTS_MAX, OVERLAP_MAX
from shared.adapters.config import Settings, get_settings
from shared.domain.outbound_events import ALL_EVENTS, DESCRIPTION_MAX, URL_MAX, event_types

bp = Blueprint("openapi", __name__)

JSON = "application/json"
STATUSES = list(get_args(RefundStatusName))


@bp.get("/openapi.json")
def openapi_json() -> Response:
    return jsonify(build_document(get_settings()))


def _ref(kind: str, name: str) -> dict[str, str]:
    return {"$ref": f"#/components/{kind}/{name}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {JSON: {"schema": schema}}


def _error(description: str, **extra_headers: dict[str, Any]) -> dict[str, Any]:
    return {
        "description": description,
        "headers": {"X-Request-Id": _ref("headers", "X-Request-Id"), **extra_headers},
        "content": _json(_ref("schemas", "Error")),
    }


def _ok(description: str, content: dict[str, Any], **headers: dict[str, Any]) -> dict[str, Any]:
    return {
        "description": description,
        "headers": {"X-Request-Id": _ref("headers", "X-Request-Id"), **headers},
        "content": content,
    }


def _auth_errors(scope: str) -> dict[str, Any]:
    return {
        "401": _ref("responses", "Unauthorized"),
        "403": _error(f"The token lacks the `{scope}` scope. `error`: `forbidden`."),
        "500": _ref("responses", "InternalError"),
        "503": _error(
            "`error`: `unavailable`: the database or the token keys (JWKS) cannot be reached "
            "right now; nothing was recorded, retry later. `error`: `outcome_unknown`: the "
            "database connection broke during the commit, so the request may or may not have "
            "been recorded: retry with the same Idempotency-Key, or look the refund up before "
            "retrying without one."
        ),
    }


def _schemas() -> dict[str, Any]:
    printable_id = {"type": "string", "minLength": 1, "maxLength": CHARGE_ID_MAX,
                    "pattern": PRINTABLE_PATTERN}
    timestamp = {"type": "string", "format": "date-time"}
    initiated_props: dict[str, Any] = {
        "refund_id": {"type": "string", "description": "This service's refund id (`rf_…`)."},
        "payment_id": {"type": "string", "description": "This service's payment id."},
        "charge_id": {"type": ["string", "null"],
                      "description": "Stripe charge id; null when the payment has no charge."},
        "amount_cents": {"type": "integer", "description":
                         "The amount actually being refunded (the remainder for `full`)."},
        "status": {"type": "string", "enum": STATUSES},
        "stripe_refund_id": {"type": "string", "description": '`""` until Stripe has answered.'},
    }
    charge_id = {
        **printable_id,
        "description": "A Stripe charge id (`ch_…`/`py_…`), a PaymentIntent id (`pi_…`) or "
                       "this service's payment id.",
    }
    reason = {
        "type": ["string", "null"], "maxLength": REASON_MAX, "pattern": NO_NUL_PATTERN,
        "description": "`duplicate`, `fraudulent` or `requested_by_customer` are passed to "
                       "Stripe as its reason; any text is kept and sent in the Stripe "
                       "refund's metadata.",
    }
    refund_props = {
        **initiated_props,
        "currency": {"type": "string", "description": "ISO currency code, lower case."},
        "reason": {"type": ["string", "null"]},
        "failure_reason": {"type": ["string", "null"]},
        "initiated_by": {"type": "string", "description": "The `sub` of the initiating token."},
        "created_at": timestamp,
        "updated_at": timestamp,
        "attempts": {"type": "integer", "minimum": 0},
        **_approval_props(timestamp),
    }
    return {
        # Two named variants, each listing every property it takes, so that generated
        # clients get a typed request (a model per variant) rather than ``Any``. Exactly
        # one matches any valid body; api/schemas.py's RefundCreate enforces the same.
        "RefundCreate": {
            "description": 'A refund of `amount_cents`, or `"full": true` for whatever is '
                           "left: exactly one of the two.",
            "oneOf": [_ref("schemas", "RefundByAmount"), _ref("schemas", "FullRefund")],
        },
        "RefundByAmount": {
            "type": "object",
            "description": "Refund this amount.",
            "additionalProperties": False,
            "properties": {
                "charge_id": charge_id,
                "amount_cents": {"type": "integer", "exclusiveMinimum": 0,
                                 "maximum": MAX_SAFE_INTEGER,
                                 "description": "In the currency's smallest unit, written "
                                                "as an integer: `500`, not `500.0`."},
                "full": {"type": "boolean", "const": False,
                         "description": "May be given as `false`; `true` is a FullRefund."},
                "reason": reason,
            },
            "required": ["charge_id", "amount_cents"],
        },
        "FullRefund": {
            "type": "object",
            "description": "Refund everything still left on the payment.",
            "additionalProperties": False,
            "properties": {
                "charge_id": charge_id,
                "full": {"type": "boolean", "const": True,
                         "description": "`true` refunds everything still left on the payment."},
                "reason": reason,
            },
            "required": ["charge_id", "full"],
        },
        "RefundInitiated": {
            "type": "object",
            "additionalProperties": False,
            "properties": initiated_props,
            "required": list(initiated_props),
        },
        "RefundEvent": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "from_status": {"type": ["string", "null"], "enum": [*STATUSES, None]},
                "to_status": {"type": "string", "enum": STATUSES},
                "actor": {"type": "string", "description": "A user's `sub`, `worker`, "
                          "`reconciler`, `webhook` or `stripe`."},
                "detail": {"type": ["object", "null"]},
                "created_at": timestamp,
            },
            "required": ["from_status", "to_status", "actor", "detail", "created_at"],
        },
        "RefundSummary": {
            "type": "object",
            "additionalProperties": False,
            "properties": refund_props,
            "required": list(refund_props),
        },
        "Refund": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                **refund_props,
                "events": {"type": "array", "items": _ref("schemas", "RefundEvent"),
                           "description": "The audit trail, oldest first."},
            },
            "required": [*refund_props, "events"],
        },
        "RefundList": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "data": {"type": "array", "items": _ref("schemas", "RefundSummary"),
                         "description": "Newest first."},
                "has_more": {"type": "boolean"},
                "next_cursor": {"type": ["string", "null"],
                                "description": "Pass as `cursor` for the next page."},
            },
            "required": ["data", "has_more", "next_cursor"],
        },
        **_approval_schemas(),
        "Error": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "error": {"type": "string", "description": "A machine code."},
                "message": {"type": "string", "description": "A sentence a person can act on."},
            },
            "required": ["error", "message"],
        },
        "NotReady": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "error": {"type": "string", "const": "unavailable"},
                "message": {"type": "string"},
                "down": {"type": "array", "items": {"type": "string",
                                                    "enum": ["database", "broker"]}},
            },
            "required": ["error", "message", "down"],
        },
        "WebhookReceived": {
            "type": "object",
            "properties": {
                "received": {"type": "boolean", "const": True},
                "outcome": {"type": "string", "enum": ["processed", "ignored", "duplicate"]},
            },
            "required": ["received"],
        },
        "Status": {
            "type": "object",
            "properties": {"status": {"type": "string"}},
            "required": ["status"],
        },
    }


def _list_parameters() -> list[dict[str, Any]]:
    printable_id = {"type": "string", "minLength": 1, "maxLength": CHARGE_ID_MAX,
                    "pattern": PRINTABLE_PATTERN}
    return [
        {"name": "limit", "in": "query", "schema": {
            "type": "integer", "minimum": 1, "maximum": LIST_LIMIT_MAX,
            "default": LIST_LIMIT_DEFAULT}},
        {"name": "cursor", "in": "query", "description": "A `next_cursor` from an earlier page.",
         "schema": {"type": "string", "minLength": 1, "maxLength": CURSOR_MAX}},
        {"name": "charge_id", "in": "query", "schema": printable_id},
        {"name": "payment_id", "in": "query", "schema": printable_id},
        {"name": "status", "in": "query", "schema": {"type": "string", "enum": STATUSES}},
        {"name": "initiated_by", "in": "query", "schema": printable_id},
    ]


def _paths(settings: Settings) -> dict[str, Any]:
    write, read = settings.refunds_write_scope, settings.refunds_read_scope
    request_id = _ref("parameters", "X-Request-Id")
    return {
        "/v1/admin/refunds": {
            "post": {
                "operationId": "createRefund",
                "summary": "Initiate a refund (completes asynchronously)",
                "description": "Checks, in this order: token (401), scope (403), body (422 "
                               "`validation_error`), Idempotency-Key reuse (422 "
                               "`idempotency_key_reused`), charge or payment (404), its status "
                               "(412), dispute (409 `charge_disputed`), anything left (409 "
                               "`already_refunded`), amount (422 `amount_exceeds_refundable`).",
                "security": [{"bearerAuth": [write]}],
                "parameters": [_ref("parameters", "Idempotency-Key"), request_id],
                "requestBody": {"required": True,
                                "content": _json(_ref("schemas", "RefundCreate"))},
                "responses": {
                    "201": _ok(
                        "Refund initiated (status `pending`; `awaiting_approval` when its "
                        "amount reaches the approval threshold: then nothing is sent until "
                        "another person approves it), or the first answer replayed for a "
                        "repeated Idempotency-Key.",
                        _json(_ref("schemas", "RefundInitiated")),
                        Location={"required": True, "schema": {"type": "string"},
                                  "description": "`/v1/admin/refunds/<refund_id>`"},
                        **{"Idempotent-Replayed": {
                            "schema": {"type": "string", "enum": ["true"]},
                            "description": "Present on a replayed answer."}},
                    ),
                    **_auth_errors(write),
                    "404": _error("Charge or payment not found. `error`: `not_found`."),
                    "409": _error("Already refunded (`already_refunded`) or the charge is "
                                  "disputed (`charge_disputed`)."),
                    "412": _error("Payment not succeeded. `error`: `payment_not_succeeded`."),
                    "413": _ref("responses", "TooLarge"),
                    "422": _error("Validation error: `validation_error`, "
                                  "`idempotency_key_reused` or `amount_exceeds_refundable` "
                                  "(the message says how much is left)."),
                },
            },
            "get": {
                "operationId": "listRefunds",
                "summary": "List refunds, newest first",
                "description": "Unknown or repeated query parameters are rejected with 422.",
                "security": [{"bearerAuth": [read]}],
                "parameters": [*_list_parameters(), request_id],
                "responses": {
                    "200": _ok("A page of refunds.", _json(_ref("schemas", "RefundList"))),
                    **_auth_errors(read),
                    "422": _error("Bad filter, limit or cursor. `error`: `validation_error`."),
                },
            },
        },
        "/v1/admin/refunds/{refund_id}": {
            "get": {
                "operationId": "getRefund",
                "summary": "One refund with its audit trail",
                "security": [{"bearerAuth": [read]}],
                "parameters": [
                    {"name": "refund_id", "in": "path", "required": True,
                     "schema": {"type": "string"}},
                    request_id,
                ],
                "responses": {
                    "200": _ok("The refund.", _json(_ref("schemas", "Refund"))),
                    **_auth_errors(read),
                    "404": _error("No refund has that id. `error`: `not_found`."),
                },
            },
        },
        **_approval_paths(settings),
        "/v1/webhooks/stripe": {
            "post": {
                "operationId": "receiveStripeWebhook",
                "summary": "Stripe events (authenticated by signature, not by token)",
                "security": [],
                "parameters": [
                    {"name": "Stripe-Signature", "in": "header", "required": True,
                     "description": "Checked against STRIPE_WEBHOOK_SECRET, 300 s tolerance.",
                     "schema": {"type": "string"}},
                    request_id,
                ],
                "requestBody": {"required": True,
                                "content": _json({"type": "object",
                                                  "description": "A Stripe event."})},
                "responses": {
                    "200": _ok("Event handled, or already seen and ignored.",
                               _json(_ref("schemas", "WebhookReceived"))),
                    "400": _error("Bad or missing signature, or not a Stripe event; "
                                  "nothing changed."),
                    "413": _ref("responses", "TooLarge"),
                    "500": _ref("responses", "InternalError"),
                    "503": _error("Stripe could not be reached to apply the event; nothing was "
                                  "kept and Stripe delivers it again. `error`: "
                                  "`stripe_unavailable`."),
                },
            },
        },
        "/healthz": {
            "get": {
                "operationId": "healthz", "summary": "The process is alive", "security": [],
                "parameters": [request_id],
                "responses": {"200": _ok("Alive.", _json(_ref("schemas", "Status")))},
            },
        },
        "/readyz": {
            "get": {
                "operationId": "readyz", "summary": "Database and broker reachable",
                "security": [], "parameters": [request_id],
                "responses": {
                    "200": _ok("Ready.", _json(_ref("schemas", "Status"))),
                    "503": {"description": "Not ready.",
                            "headers": {"X-Request-Id": _ref("headers", "X-Request-Id")},
                            "content": _json(_ref("schemas", "NotReady"))},
                },
            },
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics (for the internal network)",
                "security": [], "parameters": [request_id],
                "responses": {"200": _ok("Prometheus text exposition format.",
                                         {"text/plain": {"schema": {"type": "string"}}})},
            },
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi", "summary": "This document", "security": [],
                "parameters": [request_id],
                "responses": {"200": _ok("OpenAPI 3.1.", _json({"type": "object"}))},
            },
        },
    }


# -- approvals (SPEC 12) ----------------------------------------------------------------


def _approval_props(timestamp: dict[str, Any]) -> dict[str, Any]:
    """Fields of a refund's GET shape: who decided, how and when (who asked is
    ``initiated_by``, when is ``created_at``)."""
    return {
        "approval_threshold_cents": {
            "type": ["integer", "null"],
            "description": "The approval threshold in force when the refund was requested, "
                           "if it reached it (then it was created `awaiting_approval`); "
                           "null when it needed no approval."},
        "decision": {
            "type": ["string", "null"], "enum": ["approved", "rejected", "withdrawn", "expired",
                                                 None],
            "description": "What was decided before Stripe: `approved` or `rejected` by an "
                           "approver, `withdrawn` (cancel), `expired` (by the reconciler after "
                           "APPROVAL_EXPIRES_SECONDS); null while none was taken."},
        "decided_by": {"type": ["string", "null"],
                       "description": "The `sub` of who decided, or `reconciler`."},
        "decided_at": {**timestamp, "type": ["string", "null"]},
        "decision_note": {"type": ["string", "null"],
                          "description": "The note given with the decision."},
    }


def _approval_schemas() -> dict[str, Any]:
    return {
        "Decision": {
            "type": "object",
            "description": "Optional; the note is kept with the decision in the audit trail.",
            "additionalProperties": False,
            "properties": {
                "note": {"type": ["string", "null"], "maxLength": NOTE_MAX,
                         "pattern": NO_NUL_PATTERN},
            },
        },
    }


def _approval_paths(settings: Settings) -> dict[str, Any]:
    write, approve = settings.refunds_write_scope, settings.refunds_approve_scope
    request_id = _ref("parameters", "X-Request-Id")
    order = ("Checked in this order: token (401), scope (403), body (422 `validation_error`), "
             "the refund (404 `not_found`)")
    decisions = {
        "approve": (
            "approveRefund", "Approve a refund awaiting approval (four eyes)",
            f"{order}, who asks (403 `self_approval`: never the refund's initiator), its "
            "status (409 `not_awaiting_approval`; 409 `charge_disputed` when the charge was "
            "disputed meanwhile). The refund becomes `pending` and is sent to the workers "
            "after the decision is committed.",
            approve, "The refund, now `pending`.",
            "Not awaiting approval (`not_awaiting_approval`: already decided, withdrawn, "
            "expired or never held), or the charge is disputed (`charge_disputed`).",
        ),
        "reject": (
            "rejectRefund", "Reject a refund awaiting approval",
            f"{order}, who asks (403 `self_approval`), its status (409 "
            "`not_awaiting_approval`). The refund becomes `canceled`; what it held is free "
            "again.",
            approve, "The refund, now `canceled`.",
            "Not awaiting approval (`not_awaiting_approval`).",
        ),
        "cancel": (
            "cancelRefund", "Withdraw a refund nothing has sent to Stripe",
            f"{order}, its status (409 `cannot_cancel`, the message says why). A refund "
            "`awaiting_approval`, or `pending` with no attempt at Stripe yet, becomes "
            "`canceled`. Safe against a worker taking it at the same moment: exactly one wins.",
            write, "The refund, now `canceled`.",
            "Already sent to Stripe, finished or already canceled (`cannot_cancel`).",
        ),
    }
    paths: dict[str, Any] = {}
    for action, (operation_id, summary, description, scope, ok, conflict) in decisions.items():
        forbidden = (f"The token lacks the `{scope}` scope (`forbidden`), or the caller "
                     "initiated this refund (`self_approval`)." if scope == approve else
                     f"The token lacks the `{scope}` scope. `error`: `forbidden`.")
        paths[f"/v1/admin/refunds/{{refund_id}}/{action}"] = {
            "post": {
                "operationId": operation_id,
                "summary": summary,
                "description": description,
                "security": [{"bearerAuth": [scope]}],
                "parameters": [
                    {"name": "refund_id", "in": "path", "required": True,
                     "schema": {"type": "string"}},
                    request_id,
                ],
                "requestBody": {"required": False,
                                "content": _json(_ref("schemas", "Decision"))},
                "responses": {
                    "200": _ok(ok, _json(_ref("schemas", "Refund"))),
                    **_auth_errors(scope),
                    "403": _error(forbidden),
                    "404": _error("No refund has that id. `error`: `not_found`."),
                    "409": _error(conflict),
                    "413": _ref("responses", "TooLarge"),
                    "422": _error("The body is not a JSON object, has unknown fields, or a "
                                  f"note over {NOTE_MAX} characters. `error`: "
                                  "`validation_error`."),
                },
            },
        }
    return paths


def build_document(settings: Settings) -> dict[str, Any]:
    write, read = settings.refunds_write_scope, settings.refunds_read_scope
    paths = {**_paths(settings), **_webhook_paths(settings)}
    for item in paths.values():
        for operation in item.values():
            # Refused by the HTTP server before the app sees the request (gunicorn.conf.py).
            operation["responses"]["414"] = _ref("responses", "UriTooLong")
            operation["responses"]["431"] = _ref("responses", "HeadersTooLarge")
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Refund service",
            "version": "1.0.0",
            "description": "Refunds of card payments taken through Stripe. Every response "
                           'body is JSON; every error is `{"error", "message"}`.',
        },
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": f"HS256 or RS256 (JWKS) JWT with `exp` and `sub`. Scopes in "
                                   f"`scope` (space-separated) or `scp`/`scopes` (lists): "
                                   f"`{write}` to create refunds, `{read}` to read them, "
                                   f"`{settings.refunds_approve_scope}` to approve or reject "
                                   "refunds awaiting approval.",
                },
            },
            "schemas": {**_schemas(), **_webhook_schemas()},
            "parameters": {
                "Idempotency-Key": {
                    "name": "Idempotency-Key", "in": "header",
                    "description": "Per caller (`sub`), kept 24 h: the same key and body "
                                   "replay the first answer; another body is 422.",
                    # Printable ASCII; no space at either end, as HTTP strips it there.
                    "schema": {"type": "string", "minLength": 1,
                               "maxLength": IDEMPOTENCY_KEY_MAX,
                               "pattern": r"^[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?$"},
                },
                "X-Request-Id": {
                    "name": "X-Request-Id", "in": "header",
                    "description": f"Echoed back when it is 1 to {REQUEST_ID_MAX} printable "
                                   "ASCII characters, otherwise replaced by a generated id.",
                    "schema": {"type": "string"},
                },
            },
            "headers": {
                "X-Request-Id": {"required": True, "schema": {"type": "string"},
                                 "description": "The request's id, to quote in reports."},
                "WWW-Authenticate": {"required": True, "schema": {"type": "string"}},
            },
            "responses": {
                "Unauthorized": _error(
                    "Missing, malformed, expired or untrusted token. `error`: `unauthorized`.",
                    **{"WWW-Authenticate": _ref("headers", "WWW-Authenticate")},
                ),
                "TooLarge": _error("The body is too large. `error`: `request_too_large`."),
                "UriTooLong": _error("The URL is too long. `error`: `uri_too_long`."),
                "HeadersTooLarge": _error("The headers are too large or too many. `error`: "
                                          "`headers_too_large`."),
                "InternalError": _error("Unexpected failure; the message quotes the request id."
                                        " `error`: `internal_error`."),
            },
        },
    }


# ----------------------------------------------------- refund events out (SPEC 13)


def _webhook_schemas() -> dict[str, Any]:
    timestamp = {"type": "string", "format": "date-time"}
    nullable_time = {"type": ["string", "null"], "format": "date-time"}
    event_names = {"type": "string", "enum": [ALL_EVENTS, *event_types()]}
    events = {"type": "array", "minItems": 1, "maxItems": EVENTS_MAX, "items": event_names,
              "description": "Event types to receive; omitted or `[\"*\"]`: every type, "
                             "including ones added later."}
    url = {"type": "string", "minLength": 1, "maxLength": URL_MAX,
           "description": "Where events are POSTed. `https://` in production; never a "
                          "link-local or cloud metadata address (169.254.0.0/16, fe80::/10); "
                          "redirects are not followed."}
    description = {"type": ["string", "null"], "maxLength": DESCRIPTION_MAX,
                   "pattern": NO_NUL_PATTERN}
    endpoint_props: dict[str, Any] = {
        "id": {"type": "string", "description": "`we_…`"},
        "url": {"type": "string"},
        "events": {"type": "array", "items": {"type": "string"}},
        "description": {"type": ["string", "null"]},
        "enabled": {"type": "boolean"},
        "disabled_reason": {"type": ["string", "null"],
                            "description": "Why it is disabled (by an operator, or after "
                                           "every delivery failed for "
                                           "WEBHOOK_DISABLE_AFTER_SECONDS)."},
        "failing_since": {**nullable_time,
                          "description": "Since when every attempt has failed; null after a "
                                         "success."},
        "previous_secret_expires_at": {**nullable_time,
                                       "description": "After a rotation: until when events "
                                                      "are signed with the old secret too."},
        "created_at": timestamp,
        "updated_at": timestamp,
    }
    attempt_props: dict[str, Any] = {
        "attempted_at": timestamp,
        "duration_ms": {"type": "integer", "minimum": 0},
        "status_code": {"type": ["integer", "null"]},
        "error": {"type": ["string", "null"]},
        "response_body": {"type": ["string", "null"],
                          "description": "The receiver's answer, cut to 1 KB."},
        "requested_by": {"type": ["string", "null"],
                         "description": "Who asked for this attempt (send again), if anyone."},
    }
    delivery_props: dict[str, Any] = {
        "id": {"type": "string", "description": "`whd_…`"},
        "endpoint_id": {"type": "string"},
        "event_id": {"type": "string", "description": "`evt_…`, sent as `webhook-id`."},
        "event_type": {"type": "string"},
        "refund_id": {"type": "string"},
        "status": {"type": "string", "enum": list(DELIVERY_STATUSES)},
        "attempts": {"type": "integer", "minimum": 0},
        "next_attempt_at": nullable_time,
        "last_attempt_at": nullable_time,
        "last_status_code": {"type": ["integer", "null"]},
        "last_error": {"type": ["string", "null"]},
        "delivered_at": nullable_time,
        "created_at": timestamp,
        "attempt_log": {"type": "array", "description": "The latest 20 attempts, oldest first.",
                        "items": {"type": "object", "additionalProperties": False,
                                  "properties": attempt_props,
                                  "required": list(attempt_props)}},
    }
    return {
        "WebhookEndpointCreate": {
            "type": "object", "additionalProperties": False,
            "properties": {"url": url, "events": events, "description": description},
            "required": ["url"],
        },
        "WebhookEndpointUpdate": {
            "type": "object", "additionalProperties": False, "minProperties": 1,
            "properties": {"url": url, "events": events, "description": description,
                           "enabled": {"type": "boolean"}},
        },
        "WebhookEndpoint": {
            "type": "object", "additionalProperties": False,
            "properties": endpoint_props, "required": list(endpoint_props),
        },
        "WebhookEndpointCreated": {
            "type": "object", "additionalProperties": False,
            "properties": {**endpoint_props, "secret": {
                "type": "string", "description": "`whsec_` + base64 of 32 random bytes: the "
                "Standard Webhooks signing secret. Shown only in this answer."}},
            "required": [*endpoint_props, "secret"],
        },
        "WebhookSecretRotation": {
            "type": "object", "additionalProperties": False,
            "properties": {"overlap_seconds": {
                "type": "integer", "minimum": 0, "maximum": OVERLAP_MAX, "default": 86400,
                "description": "How long events are signed with the old secret too; 0 "
                               "stops it at once (a leaked secret)."}},
        },
        "WebhookEndpointList": {
            "type": "object", "additionalProperties": False,
            "properties": {"data": {"type": "array",
                                    "items": _ref("schemas", "WebhookEndpoint")}},
            "required": ["data"],
        },
        "WebhookEndpointDeleted": {
            "type": "object", "additionalProperties": False,
            "properties": {"id": {"type": "string"}, "deleted": {"const": True}},
            "required": ["id", "deleted"],
        },
        "WebhookDelivery": {
            "type": "object", "additionalProperties": False,
            "properties": delivery_props, "required": list(delivery_props),
        },
        "WebhookDeliveryList": {
            "type": "object", "additionalProperties": False,
            "properties": {
                "data": {"type": "array", "items": _ref("schemas", "WebhookDelivery"),
                         "description": "Newest first."},
                "has_more": {"type": "boolean"},
                "next_cursor": {"type": ["string", "null"]},
            },
            "required": ["data", "has_more", "next_cursor"],
        },
    }


def _webhook_paths(settings: Settings) -> dict[str, Any]:
    admin = settings.refunds_admin_scope
    request_id = _ref("parameters", "X-Request-Id")
    security = [{"bearerAuth": [admin]}]
    endpoint_id = {"name": "endpoint_id", "in": "path", "required": True,
                   "schema": {"type": "string"}}
    not_found = _error("No webhook endpoint has that id. `error`: `not_found`.")

    def answer(description: str, schema: str) -> dict[str, Any]:
        return _ok(description, _json(_ref("schemas", schema)))

    return {
        "/v1/admin/webhook-endpoints": {
            "post": {
                "operationId": "createWebhookEndpoint",
                "summary": "Subscribe an endpoint to refund events",
                "security": security, "parameters": [request_id],
                "requestBody": {"required": True,
                                "content": _json(_ref("schemas", "WebhookEndpointCreate"))},
                "responses": {
                    "201": _ok("Created; the secret is shown only here.",
                               _json(_ref("schemas", "WebhookEndpointCreated")),
                               Location={"required": True, "schema": {"type": "string"}}),
                    **_auth_errors(admin),
                    "413": _ref("responses", "TooLarge"),
                    "422": _error("Bad body; the message names the field (a URL that is not "
                                  "allowed included). Nothing is stored."),
                },
            },
            "get": {
                "operationId": "listWebhookEndpoints", "summary": "Every endpoint (no secrets)",
                "security": security, "parameters": [request_id],
                "responses": {"200": answer("The endpoints, newest first.",
                                            "WebhookEndpointList"),
                              **_auth_errors(admin),
                              "422": _error("Unknown query parameter.")},
            },
        },
        "/v1/admin/webhook-endpoints/{endpoint_id}": {
            "get": {
                "operationId": "getWebhookEndpoint", "summary": "One endpoint (no secret)",
                "security": security, "parameters": [endpoint_id, request_id],
                "responses": {"200": answer("The endpoint.", "WebhookEndpoint"),
                              **_auth_errors(admin), "404": not_found},
            },
            "patch": {
                "operationId": "updateWebhookEndpoint",
                "summary": "Change url, events, description or enabled",
                "description": "Enabling clears `disabled_reason` and `failing_since`; its "
                               "waiting deliveries resume.",
                "security": security, "parameters": [endpoint_id, request_id],
                "requestBody": {"required": True,
                                "content": _json(_ref("schemas", "WebhookEndpointUpdate"))},
                "responses": {"200": answer("The endpoint.", "WebhookEndpoint"),
                              **_auth_errors(admin), "404": not_found,
                              "413": _ref("responses", "TooLarge"),
                              "422": _error("Bad body; the message names the field.")},
            },
            "delete": {
                "operationId": "deleteWebhookEndpoint",
                "summary": "Delete an endpoint and its delivery log",
                "security": security, "parameters": [endpoint_id, request_id],
                "responses": {"200": answer("Deleted.", "WebhookEndpointDeleted"),
                              **_auth_errors(admin), "404": not_found},
            },
        },
        "/v1/admin/webhook-endpoints/{endpoint_id}/rotate-secret": {
            "post": {
                "operationId": "rotateWebhookSecret",
                "summary": "A new signing secret, shown once",
                "description": "Events are signed with both secrets (two `v1,` signatures) "
                               "for `overlap_seconds`, so the subscriber can switch without "
                               "a failed verification.",
                "security": security, "parameters": [endpoint_id, request_id],
                "requestBody": {"required": False,
                                "content": _json(_ref("schemas", "WebhookSecretRotation"))},
                "responses": {"200": answer("The endpoint with its new secret.",
                                            "WebhookEndpointCreated"),
                              **_auth_errors(admin), "404": not_found,
                              "413": _ref("responses", "TooLarge"),
                              "422": _error("Bad body; the message names the field.")},
            },
        },
        "/v1/admin/webhook-endpoints/{endpoint_id}/deliveries": {
            "get": {
                "operationId": "listWebhookDeliveries",
                "summary": "An endpoint's deliveries, newest first, with their attempts",
                "security": security,
                "parameters": [
                    endpoint_id,
                    {"name": "status", "in": "query",
                     "schema": {"type": "string", "enum": list(DELIVERY_STATUSES)}},
                    {"name": "limit", "in": "query", "schema": {
                        "type": "integer", "minimum": 1, "maximum": LIST_LIMIT_MAX,
                        "default": LIST_LIMIT_DEFAULT}},
                    {"name": "cursor", "in": "query",
                     "description": "A `next_cursor` from an earlier page.",
                     "schema": {"type": "string", "minLength": 1, "maxLength": CURSOR_MAX}},
                    request_id,
                ],
                "responses": {"200": answer("A page of deliveries.", "WebhookDeliveryList"),
                              **_auth_errors(admin), "404": not_found,
                              "422": _error("Bad status, limit or cursor.")},
            },
        },
        "/v1/admin/webhook-deliveries/{delivery_id}/retry": {
            "post": {
                "operationId": "retryWebhookDelivery",
                "summary": "Send a delivery again now",
                "description": "A delivered or failed delivery gets one more attempt; a "
                               "pending one has its next retry brought forward. Same "
                               "`webhook-id` and body as before.",
                "security": security,
                "parameters": [{"name": "delivery_id", "in": "path", "required": True,
                                "schema": {"type": "string"}}, request_id],
                "responses": {"202": answer("Queued.", "WebhookDelivery"),
                              **_auth_errors(admin),
                              "404": _error("No delivery has that id. `error`: `not_found`."),
                              "409": _error("The endpoint is disabled. `error`: "
                                            "`endpoint_disabled`.")},
            },
        },
    }
