"""Stripe webhook events: verify, store each event id once, and apply its effect.

The event id is inserted in the same transaction as the event's effect, so an event
is either fully applied and remembered, or neither (and Stripe delivers it again).
Payment and charge events carry a snapshot that is applied forward-only; refund
events only say "look again": the refund is fetched from Stripe and that answer is
applied, so a late or replayed refund event can never move a refund backwards.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import stripe
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from shared import payments
from shared.errors import RefundServiceError
from shared.models import StripeEvent
from shared.stripe_gateway import StripeGateway

log = logging.getLogger(__name__)

#: Stripe's recommended replay window for signed webhooks.
SIGNATURE_TOLERANCE_SECONDS = 300
EVENT_ID_MAX = 255
EVENT_TYPE_MAX = 100
STATUS_MAX = 40  # payments.status and charges.status are String(40)


class InvalidSignature(RefundServiceError):
    code = "invalid_signature"


class InvalidPayload(RefundServiceError):
    code = "invalid_payload"


def verify_event(payload: bytes, signature: str | None, secret: str) -> dict[str, Any]:
    """The event a signed webhook body carries, as a plain dict.

    Raises ``InvalidSignature`` (missing, wrong, or older than the tolerance) before
    looking at the body, then ``InvalidPayload`` for a body that is not an event.
    Messages never repeat the signature or the body."""
    if not signature:
        raise InvalidSignature("The Stripe-Signature header is missing.")
    try:
        event = stripe.Webhook.construct_event(
            payload, signature, secret, tolerance=SIGNATURE_TOLERANCE_SECONDS
        ).to_dict()
    except stripe.SignatureVerificationError as exc:
        raise InvalidSignature(
            "The Stripe-Signature header does not match this body and the webhook secret, "
            f"or its timestamp is more than {SIGNATURE_TOLERANCE_SECONDS} seconds old."
        ) from exc
    except (ValueError, TypeError, AttributeError) as exc:  # not UTF-8 JSON, or not an object
        raise InvalidPayload("The body is not a Stripe event (a JSON object).") from exc
    event_id, event_type = event.get("id"), event.get("type")
    data = event.get("data")
    if not _is_name(event_id, EVENT_ID_MAX):
        raise InvalidPayload("The event has no valid id.")
    if not _is_name(event_type, EVENT_TYPE_MAX):
        raise InvalidPayload("The event has no valid type.")
    if not (isinstance(data, Mapping) and isinstance(data.get("object"), Mapping)):
        raise InvalidPayload("The event has no data.object.")
    if event_type in HANDLERS:
        _object_id(data["object"])
    return event


# Handlers: (session, the event's object, gateway) -> None ----------------------------


def _is_name(value: Any, longest: int) -> bool:
    """Stripe's ids and event types: printable ASCII (Postgres refuses a NUL outright)."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= longest
        and value.isascii()
        and value.isprintable()
    )


def _object_id(obj: Mapping[str, Any]) -> str:
    """The id of the object an event is about; every object a handler reads has one."""
    value = obj.get("id")
    if not _is_name(value, EVENT_ID_MAX):
        raise InvalidPayload("The event's data.object has no valid id.")
    return str(value)


def _is_amount(value: Any, *, optional: bool = False) -> bool:
    if value is None:
        return optional
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def _is_snapshot(obj: Mapping[str, Any]) -> bool:
    """Whether an event's object carries the fields a payment or charge is stored from,
    each of the type Stripe sends. One that does not (a field missing, as in thin
    events, or malformed) is not trusted: the object is read from Stripe instead."""
    status, currency, pi = obj.get("status"), obj.get("currency"), obj.get("payment_intent")
    if isinstance(pi, Mapping):
        pi = pi.get("id")
    return (
        isinstance(status, str)
        and 0 < len(status) <= STATUS_MAX
        and isinstance(currency, str)
        and len(currency) == 3
        and currency.isascii()
        and currency.isalpha()
        and _is_amount(obj.get("amount"))
        and _is_amount(obj.get("amount_received"), optional=True)
        and _is_amount(obj.get("amount_captured"), optional=True)
        and (pi is None or _is_name(pi, EVENT_ID_MAX))
    )


def _on_payment_intent(session: Session, pi: Mapping[str, Any], gateway: StripeGateway) -> None:
    if not _is_snapshot(pi):
        pi = payments.as_dict(gateway.retrieve_payment_intent(_object_id(pi)))
    payments.apply_payment_intent(session, pi, gateway=gateway)


def _charge_snapshot(ch: Mapping[str, Any], gateway: StripeGateway) -> Mapping[str, Any]:
    if not _is_snapshot(ch):
        return payments.as_dict(gateway.retrieve_charge(_object_id(ch)))
    return ch


def _on_charge(session: Session, ch: Mapping[str, Any], gateway: StripeGateway) -> None:
    payments.upsert_charges(session, [_charge_snapshot(ch, gateway)], gateway=gateway)


def _on_charge_refunded(session: Session, ch: Mapping[str, Any], gateway: StripeGateway) -> None:
    _on_charge(session, ch, gateway)
    # The event's own list of refunds may be absent (not expanded) or cut short:
    # ask Stripe for all of this charge's refunds and apply what it says.
    payments.apply_refunds(
        session, gateway.iter_refunds(charge_id=_object_id(ch)), gateway=gateway, actor="webhook"
    )


def _on_dispute(session: Session, dispute: Mapping[str, Any], gateway: StripeGateway) -> None:
    charge = dispute.get("charge")
    if isinstance(charge, Mapping):
        charge = charge.get("id")
    if not _is_name(charge, EVENT_ID_MAX):
        log.warning("dispute event without a charge", extra={"dispute": dispute.get("id")})
        return
    if not payments.mark_disputed(session, str(charge)):
        fresh = payments.as_dict(gateway.retrieve_charge(str(charge)))
        payments.upsert_charges(session, [fresh], gateway=gateway, disputed=True)


def _on_refund(session: Session, refund: Mapping[str, Any], gateway: StripeGateway) -> None:
    payments.apply_refunds(
        session, [gateway.retrieve_refund(_object_id(refund))], gateway=gateway, actor="webhook"
    )


Handler = Callable[[Session, Mapping[str, Any], StripeGateway], None]

HANDLERS: dict[str, Handler] = {
    "payment_intent.created": _on_payment_intent,
    "payment_intent.processing": _on_payment_intent,
    "payment_intent.requires_action": _on_payment_intent,
    "payment_intent.amount_capturable_updated": _on_payment_intent,
    "payment_intent.succeeded": _on_payment_intent,
    "payment_intent.payment_failed": _on_payment_intent,
    "payment_intent.canceled": _on_payment_intent,
    "charge.pending": _on_charge,
    "charge.succeeded": _on_charge,
    "charge.failed": _on_charge,
    "charge.captured": _on_charge,
    "charge.updated": _on_charge,
    "charge.expired": _on_charge,
    "charge.refunded": _on_charge_refunded,
    "charge.dispute.created": _on_dispute,
    "refund.created": _on_refund,
    "refund.updated": _on_refund,
    "refund.failed": _on_refund,
    "charge.refund.updated": _on_refund,
}


def handle_event(*, session: Session, event: Mapping[str, Any], gateway: StripeGateway) -> str:
    """Apply one verified event and commit; returns ``processed``, ``ignored`` or
    ``duplicate``.

    A concurrent delivery of the same event waits on the event id's insert and then
    finds it taken. If the handler raises (Stripe unreachable...), nothing is
    committed and the event id is not kept, so Stripe's redelivery is applied."""
    event_id, event_type = str(event["id"]), str(event["type"])
    claimed = session.execute(
        pg_insert(StripeEvent)
        .values(id=event_id, type=event_type)
        .on_conflict_do_nothing(index_elements=[StripeEvent.id])
        .returning(StripeEvent.id)
    ).first()
    if claimed is None:
        session.rollback()
        log.info("stripe event %s %s: duplicate", event_id, event_type)
        return "duplicate"
    handler = HANDLERS.get(event_type)
    if handler is not None:
        handler(session, event["data"]["object"], gateway)
    session.commit()
    outcome = "processed" if handler is not None else "ignored"
    log.info("stripe event %s %s: %s", event_id, event_type, outcome)
    return outcome

