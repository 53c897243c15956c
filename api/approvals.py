"""Approve, reject and cancel a refund (SPEC 12): thin views over ``shared.services.approvals``.

Checked in this order: token (401), scope (403), body (422), the refund (404), who asks
(403 ``self_approval``), where the refund is (409). A refused request changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Blueprint, Response, g, jsonify, request
from pydantic import ValidationError

from api.auth import require_scope
from api.errors import ApiError
from api.refunds import _repeated_keys
from api.schemas import Decision, describe
from shared.adapters.celery_app import enqueue_refund
from shared.adapters.db import unit_of_work
from shared.services import approvals, refunds

bp = Blueprint("approvals", __name__, url_prefix="/v1/admin/refunds")


def _note() -> str | None:
    """The optional ``{"note": "..."}`` body: nothing, or a JSON object with at most a note."""
    raw = request.get_data(cache=False)
    if not raw:
        return None
    try:
        body = Decision.model_validate_json(raw)
    except ValidationError as exc:
        if any(e["type"] in ("json_invalid", "model_type") for e in exc.errors()):
            raise ApiError(422, 'The body must be a JSON object, e.g. {"note": "checked the '
                           'order"}, or empty.') from exc
        raise ApiError(422, describe(exc, Decision)) from exc
    repeated = _repeated_keys(raw)
    if repeated:
        raise ApiError(422, f"{', '.join(repeated)}: give each field once.")
    return body.note


def _decide(
    refund_id: str, decide: Callable[..., None], **who: str
) -> tuple[Response, dict[str, Any]]:
    note = _note()
    with unit_of_work() as session:
        decide(session=session, refund_id=refund_id, note=note, **who)
        # Read back before anything is enqueued: the answer shows the decision itself.
        body = refunds.get_refund(session=session, refund_id=refund_id)
    return jsonify(body), body


@bp.post("/<refund_id>/approve")
@require_scope("approve")
def approve_refund(refund_id: str) -> Response:
    response, body = _decide(refund_id, approvals.approve, approver=g.caller.subject)
    enqueue_refund(body["refund_id"])  # after the commit; beat re-enqueues it if this fails
    return response


@bp.post("/<refund_id>/reject")
@require_scope("approve")
def reject_refund(refund_id: str) -> Response:
    response, _ = _decide(refund_id, approvals.reject, approver=g.caller.subject)
    return response


@bp.post("/<refund_id>/cancel")
@require_scope("write")
def cancel_refund(refund_id: str) -> Response:
    response, _ = _decide(refund_id, approvals.cancel, person=g.caller.subject)
    return response
