"""/console/approvals: refunds awaiting a second person (SPEC 12), and the forms that
decide on them. The server refuses what the page does not offer: a decision without
the approve scope, on one's own refund, or without the session's CSRF token."""

from __future__ import annotations

from typing import Any

from flask import abort, flash, redirect, render_template, request, url_for

from api.console import _error_page, bp
from api.console.session import current_operator, login_required, safe_next
from api.schemas import NOTE_MAX
from shared.adapters.celery_app import enqueue_refund
from shared.adapters.config import get_settings
from shared.adapters.db import unit_of_work
from shared.domain.errors import SelfApproval
from shared.services import approvals

QUEUE_LIMIT = 100
DECISIONS = {"approve": approvals.approve, "reject": approvals.reject}


@bp.get("/approvals")
@login_required
def approval_queue() -> Any:
    with unit_of_work() as session:
        queue = approvals.approval_queue(session=session, limit=QUEUE_LIMIT)
        return render_template(
            "console/approvals.html", queue=queue, note_max=NOTE_MAX,
            approve_scope=get_settings().refunds_approve_scope,
        )


def _note() -> str | None:
    note = request.form.get("note", "").strip()
    if len(note) > NOTE_MAX or "\x00" in note:
        abort(400, description=f"A note is at most {NOTE_MAX} characters, without NUL.")
    return note or None


def _back(refund_id: str) -> str:
    return safe_next(request.form.get("next")) or url_for(".refund", refund_id=refund_id)


@bp.post("/refunds/<refund_id>/decision")
@login_required
def decide(refund_id: str) -> Any:
    operator = current_operator()
    assert operator is not None  # login_required
    if not operator.can_approve:
        scope = get_settings().refunds_approve_scope
        return _error_page(403, f"Approving or rejecting needs a token with the '{scope}' scope.")
    action = request.form.get("decision", "")
    if action not in DECISIONS:
        return _error_page(400, "Choose approve or reject.")
    note = _note()
    with unit_of_work() as session:
        try:
            DECISIONS[action](session=session, refund_id=refund_id, approver=operator.subject,
                              note=note)
        except SelfApproval as exc:
            return _error_page(403, exc.message)
    if action == "approve":
        enqueue_refund(refund_id)  # after the commit; beat re-enqueues it if this fails
        flash(f"Approved {refund_id}: it is pending and on its way to Stripe.", "ok")
    else:
        flash(f"Rejected {refund_id}: it is canceled and what it held is free again.", "ok")
    return redirect(_back(refund_id), code=303)


@bp.post("/refunds/<refund_id>/cancel")
@login_required
def withdraw(refund_id: str) -> Any:
    operator = current_operator()
    assert operator is not None  # login_required
    if not operator.can_write:
        scope = get_settings().refunds_write_scope
        return _error_page(403, f"Withdrawing a refund needs a token with the '{scope}' scope.")
    note = _note()
    with unit_of_work() as session:
        approvals.cancel(session=session, refund_id=refund_id, person=operator.subject, note=note)
    flash(f"Withdrew {refund_id}: it is canceled and was never sent to Stripe.", "ok")
    return redirect(_back(refund_id), code=303)
