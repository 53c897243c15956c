"""POST /v1/webhooks/stripe (SPEC 3.3): authenticated by Stripe's signature, not a token."""

from __future__ import annotations

import logging

import stripe
from flask import Blueprint, Response, jsonify, request

from api.errors import ApiError
from shared import stripe_events
from shared.config import get_settings
from shared.db import unit_of_work
from shared.stripe_gateway import get_gateway

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
    try:
        with unit_of_work() as session:
            outcome = stripe_events.handle_event(
                session=session, event=event, gateway=get_gateway()
            )
    except stripe.StripeError as exc:
        # Nothing was kept; a non-2xx makes Stripe deliver the event again later.
        log.warning(
            "stripe event %s %s not applied: Stripe call failed (%s)",
            event["id"], event["type"], type(exc).__name__,
        )
        raise ApiError(
            503, "Stripe could not be reached to apply this event; deliver it again later.",
            code="stripe_unavailable",
        ) from exc
    return jsonify(received=True, outcome=outcome)
