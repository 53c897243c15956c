"""POST /v1/webhooks/stripe (SPEC 3.3): authenticated by Stripe's signature, not a token.

Verify, store once, apply what needs no call to Stripe, answer: the request never waits
for Stripe, so a burst of events or a slow Stripe never holds up the API. A body sent with
a Content-Length is answered in front of Flask (``api.plain_endpoints``); the view below
takes the rest (a chunked body). Both call ``receive``."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Response, g, jsonify, request

from api.errors import ApiError
from shared.adapters.celery_app import enqueue_stripe_event
from shared.adapters.config import get_settings
from shared.adapters.db import get_webhook_pool, unit_of_work
from shared.services import stripe_events

log = logging.getLogger(__name__)

bp = Blueprint("webhooks", __name__, url_prefix="/v1/webhooks")
STRIPE_ROUTE = "/stripe"
#: The path Stripe is given (``api.plain_endpoints`` answers it too).
STRIPE_PATH = f"{bp.url_prefix}{STRIPE_ROUTE}"


@dataclass(frozen=True)
class Received:
    """One delivery of a verified event: what to answer and what its access line says."""

    event_id: str
    event_type: str
    outcome: str

    def answer(self) -> dict[str, Any]:
        return {"received": True, "outcome": self.outcome}

    def log_fields(self) -> dict[str, object]:
        # On the request's access line rather than a line of its own: a refund burst is
        # mostly these requests, and a second JSON line each was a sixth of the web's CPU.
        return {"stripe_event": self.event_id, "event_type": self.event_type,
                "outcome": self.outcome}


def receive(payload: bytes, signature: str | None) -> Received:
    """One delivery of a Stripe event: ``payload`` is the raw body, which the signature
    covers byte for byte."""
    try:
        event = stripe_events.verify_event(
            payload, signature, get_settings().stripe_webhook_secret
        )
    except (stripe_events.InvalidSignature, stripe_events.InvalidPayload) as exc:
        raise ApiError(400, exc.message, code=exc.code) from exc
    if stripe_events.applied_on_receipt(event):
        with unit_of_work() as session:
            outcome = stripe_events.receive_event(session=session, event=event)
    else:  # most of a refund burst: one statement, on connections of the webhook's own
        with get_webhook_pool().connection() as connection:
            outcome = stripe_events.store_event(connection, event)
    if outcome == "deferred":
        # After the commit; if this fails the reconciler sends the stored event on.
        enqueue_stripe_event(str(event["id"]), coalesce=stripe_events.coalescing_key(event))
    return Received(str(event["id"]), str(event["type"]), outcome)


@bp.post(STRIPE_ROUTE)
def stripe_webhook() -> Response:
    # MAX_CONTENT_LENGTH caps the read.
    received = receive(request.get_data(cache=False), request.headers.get("Stripe-Signature"))
    g.access_log_fields = received.log_fields()
    return jsonify(received.answer())
