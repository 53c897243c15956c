"""POST /v1/webhooks/stripe (SPEC 3.3): authenticated by Stripe's signature, not a token.

Verify, store once, apply what needs no call to Stripe, answer: the request never waits
for Stripe, so a burst of events or a slow Stripe never holds up the API's threads."""

from __future__ import annotations

import logging

from flask import Blueprint, Response, jsonify, request

from api.errors import ApiError
from shared.adapters.celery_app import enqueue_stripe_event
from shared.adapters.config import get_settings
from shared.adapters.db import unit_of_work
from shared.services import stripe_events

log = logging.getLogger(__name__)

bp = Blueprint("webhooks", __name__, url_prefix="/v1/webhooks")


@bp.post("/stripe")
def stripe_webhook() -> Response:
    # The raw bytes: the signature covers them exactly. MAX_CONTENT_LENGTH caps the read.
    payload = request.get_data(cache=False)
    try:
        event = stripe_events.verify_event(
            payload, request.headers.get("Stripe-Signature"), get_settings().stripe_webhook_secret
        )
    except (stripe_events.InvalidSignature, stripe_events.InvalidPayload) as exc:
        raise ApiError(400, exc.message, code=exc.code) from exc
    with unit_of_work() as session:
        outcome = stripe_events.receive_event(session=session, event=event)
    if outcome == "deferred":
        # After the commit; if this fails the reconciler sends the stored event on.
        enqueue_stripe_event(str(event["id"]))
    return jsonify(received=True, outcome=outcome)
