"""/v1/admin/refunds: thin views over ``shared.services.refunds``."""

from __future__ import annotations

import json

from flask import Blueprint, Response, g, jsonify, request
from pydantic import ValidationError

from api.auth import Caller, require_scope
from api.errors import ApiError
from api.schemas import RefundCreate, RefundListQuery, describe
from shared.adapters.celery_app import enqueue_refund
from shared.adapters.db import get_web_pool, unit_of_work
from shared.domain.models import RefundStatus
from shared.services import refunds
from shared.services.idempotency import request_fingerprint

bp = Blueprint("refunds", __name__, url_prefix="/v1/admin/refunds")

IDEMPOTENCY_KEY_MAX = 255


def _parse_body(raw: bytes) -> RefundCreate:
    try:
        body = RefundCreate.model_validate_json(raw or b"null")
    except ValidationError as exc:
        if any(e["type"] in ("json_invalid", "model_type") for e in exc.errors()):
            raise ApiError(422, "The body must be a JSON object, e.g. "
                           '{"charge_id": "ch_...", "amount_cents": 500}.') from exc
        raise ApiError(422, describe(exc, RefundCreate)) from exc
    # JSON parsers disagree on a key given twice (this one keeps the last copy, others
    # the first): a proxy, a log or a person reading the body could see another refund.
    repeated = _repeated_keys(raw)
    if repeated:
        raise ApiError(422, f"{', '.join(repeated)}: give each field once.")
    return body


def _repeated_keys(raw: bytes) -> list[str]:
    repeated: list[str] = []

    def pairs(items: list[tuple[str, object]]) -> dict[str, object]:
        names = [name for name, _ in items]
        repeated.extend(sorted({name for name in names if names.count(name) > 1}))
        return dict(items)

    json.loads(raw, object_pairs_hook=pairs)
    return repeated


def _idempotency_key(key: str | None) -> str | None:
    if key is None:
        return None
    # ASCII only: header bytes beyond it arrive as Latin-1 guesses, and a key must
    # compare equal on every retry of the same request.
    if not (1 <= len(key) <= IDEMPOTENCY_KEY_MAX and key.isascii() and key.isprintable()):
        raise ApiError(
            422, f"Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_MAX} printable ASCII characters."
        )
    return key


def initiate(caller: Caller, raw_body: bytes, idempotency_key: str | None) -> refunds.Initiated:
    """``POST /v1/admin/refunds`` once the caller is known, whichever way it arrived: the
    Flask view below, or ``api.plain_endpoints`` (the same request without Flask)."""
    body = _parse_body(raw_body)
    key = _idempotency_key(idempotency_key)
    with get_web_pool().connection() as connection:
        result = refunds.initiate_refund(
            connection,
            request=refunds.RefundRequest(
                charge_id=body.charge_id,
                amount_cents=body.amount_cents,
                reason=body.reason,
            ),
            initiated_by=caller.subject,
            idempotency_key=key,
            fingerprint=request_fingerprint(body.model_dump()),
        )
    # A refund awaiting approval is enqueued when it is approved (api/approvals.py).
    if not result.replayed and result.body["status"] == RefundStatus.PENDING:
        enqueue_refund(result.refund_id)
    return result


def answer_headers(result: refunds.Initiated) -> dict[str, str]:
    headers = {"Location": f"{bp.url_prefix}/{result.refund_id}"}
    if result.replayed:
        headers["Idempotent-Replayed"] = "true"
    return headers


@bp.post("")
@require_scope("write")
def create_refund() -> Response:
    result = initiate(
        g.caller, request.get_data(cache=False), request.headers.get("Idempotency-Key")
    )
    g.refund_id = result.refund_id  # for the request's log line
    return Response(
        json.dumps(result.body),
        status=result.status,
        mimetype="application/json",
        headers=answer_headers(result),
    )


@bp.get("/<path:refund_id>")
@require_scope("read")
def get_refund(refund_id: str) -> Response:
    with unit_of_work() as session:
        return jsonify(refunds.get_refund(session=session, refund_id=refund_id))


@bp.get("")
@require_scope("read")
def list_refunds() -> Response:
    args = request.args.to_dict(flat=False)
    repeated = sorted(name for name, values in args.items() if len(values) > 1)
    if repeated:
        # Taking the first or the last value silently would hide a caller's mistake.
        raise ApiError(422, f"{', '.join(repeated)}: give each query parameter at most once.")
    try:
        query = RefundListQuery.model_validate({name: values[0] for name, values in args.items()})
    except ValidationError as exc:
        raise ApiError(422, describe(exc, RefundListQuery)) from exc
    with unit_of_work() as session:
        try:
            page = refunds.list_refunds(session=session, **query.model_dump())
        except refunds.InvalidCursor as exc:
            raise ApiError(422, "cursor: pass back a next_cursor this service returned.") from exc
    return jsonify(page)
