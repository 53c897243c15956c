"""/console/webhooks: refund events out (SPEC 13) for operators: each endpoint, its
backlog and state, the deliveries that are failing, and "send again" (with the admin
scope, CSRF-checked like every console form)."""

from __future__ import annotations

from typing import Any

from flask import flash, redirect, render_template, url_for

from api.console import _error_page, bp
from api.console.session import current_operator, login_required
from shared.adapters.celery_app import enqueue_webhook_delivery
from shared.adapters.config import get_settings
from shared.adapters.db import unit_of_work
from shared.services import webhook_delivery

FAILING_SHOWN = 50


@bp.get("/webhooks")
@login_required
def webhooks() -> Any:
    with unit_of_work() as session:
        data = webhook_delivery.console_overview(session=session, failing_limit=FAILING_SHOWN)
        return render_template("console/webhooks.html", data=data)


@bp.post("/webhooks/deliveries/<delivery_id>/resend")
@login_required
def resend_delivery(delivery_id: str) -> Any:
    operator = current_operator()
    assert operator is not None  # login_required
    if not operator.can_admin:
        scope = get_settings().refunds_admin_scope
        return _error_page(403, f"Sending an event again needs a token with the '{scope}' scope.")
    with unit_of_work() as session:
        webhook_delivery.resend(session=session, delivery_id=delivery_id,
                                requested_by=operator.subject)
    if enqueue_webhook_delivery(delivery_id):
        flash(f"Delivery {delivery_id} is being sent again; its attempts show who asked.", "ok")
    else:
        flash("Recorded, but the queue refused the task; the workers' dispatcher will send "
              "it within seconds.", "warn")
    return redirect(url_for(".webhooks"), code=303)
