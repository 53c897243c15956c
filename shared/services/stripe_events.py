"""Stripe webhook events: verify, store each event id once, and apply its effect.

The webhook endpoint stores each event id once, with the event's object (SPEC 3.3).
Payment, charge and dispute events carry a snapshot that is applied forward-only in
that same short transaction, so a payment is refundable as soon as its webhook was
answered. Refund events only say "look again", and some snapshots cannot be trusted:
those need Stripe, so they are applied by a worker (``apply_stored_event``), which
fetches from Stripe and applies that answer; a late or replayed refund event can never
move a refund backwards. The reconciler sends again any event stored but not applied.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

import psycopg
import stripe
from psycopg.types.json import Jsonb
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shared.adapters.db import driver_cursor, run_and_commit, unit_of_work
from shared.adapters.stripe_gateway import StripeGateway
from shared.domain.errors import RefundServiceError
from shared.domain.models import StripeEvent
from shared.domain.stripe_objects import as_dict, id_of
from shared.services import payments

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
        # The SDK's check alone: ``Webhook.construct_event`` would also build the SDK's
        # event object (9 times the CPU of the check), and its to_dict() leaves objects
        # inside lists as SDK objects, which nothing downstream can encode: the body's
        # own JSON is what is kept.
        text = payload.decode("utf-8")
        stripe.WebhookSignature.verify_header(
            text, signature, secret, tolerance=SIGNATURE_TOLERANCE_SECONDS
        )
        event = json.loads(text)
    except stripe.SignatureVerificationError as exc:
        raise InvalidSignature(
            "The Stripe-Signature header does not match this body and the webhook secret, "
            f"or its timestamp is more than {SIGNATURE_TOLERANCE_SECONDS} seconds old."
        ) from exc
    except (ValueError, TypeError, AttributeError) as exc:  # not UTF-8 JSON, or not an object
        raise InvalidPayload("The body is not a Stripe event (a JSON object).") from exc
    if not isinstance(event, dict):
        raise InvalidPayload("The body is not a Stripe event (a JSON object).")
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
        pi = as_dict(gateway.retrieve_payment_intent(_object_id(pi)))
    payments.apply_payment_intent(session, pi, gateway=gateway)


def _charge_snapshot(ch: Mapping[str, Any], gateway: StripeGateway) -> Mapping[str, Any]:
    if not _is_snapshot(ch):
        return as_dict(gateway.retrieve_charge(_object_id(ch)))
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


def _dispute_charge(dispute: Mapping[str, Any]) -> str | None:
    charge = id_of(dispute.get("charge"))
    return charge if _is_name(charge, EVENT_ID_MAX) else None


def _on_dispute(session: Session, dispute: Mapping[str, Any], gateway: StripeGateway) -> None:
    charge = _dispute_charge(dispute)
    if charge is None:
        log.warning("dispute event without a charge", extra={"dispute": dispute.get("id")})
        return
    if not payments.mark_disputed(session, charge):
        fresh = as_dict(gateway.retrieve_charge(charge))
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


# Receiving (the webhook's request path) and applying later (a worker) ----------------

#: Handlers that ask Stripe whatever the event says: their events go straight to a worker.
ALWAYS_NEED_STRIPE = frozenset({_on_refund, _on_charge_refunded})


class NeedsStripe(Exception):
    """Applying this event needs a call to Stripe: not on the webhook's request path."""


class _NoStripe:
    """The gateway handed to handlers on the request path: any use of it means the event
    needs Stripe, so it is left to a worker instead (SPEC 3.3)."""

    def __getattr__(self, name: str) -> Any:
        raise NeedsStripe(name)


NO_STRIPE: Any = _NoStripe()


def applied_on_receipt(event: Mapping[str, Any]) -> bool:
    """Whether the webhook applies this event itself (``receive_event``, a transaction
    of its own) rather than only storing it (``store_event``, one statement): events
    whose handler can take the snapshot it carries."""
    handler = HANDLERS.get(str(event["type"]))
    return handler is not None and handler not in ALWAYS_NEED_STRIPE


# Store an event once; one whose type nothing handles is applied as it is stored.
_STORE_SQL = """
INSERT INTO stripe_events (id, type, payload, applied_at)
VALUES (%(id)s, %(type)s, %(payload)s, CASE WHEN %(applied)s THEN now() END)
ON CONFLICT (id) DO NOTHING RETURNING id
"""


def _store_params(event: Mapping[str, Any], *, applied: bool = False) -> dict[str, Any]:
    handler = HANDLERS.get(str(event["type"]))
    return {
        "id": str(event["id"]),
        "type": str(event["type"]),
        "payload": Jsonb(_storable(event["data"]["object"])) if handler is not None else None,
        "applied": applied,
    }


def store_event(connection: psycopg.Connection[Any], event: Mapping[str, Any]) -> str:
    """Store a verified event that the webhook does not apply (see ``applied_on_receipt``)
    in one statement on an autocommit connection. Returns ``ignored`` (no handler: stored
    as applied), ``deferred`` (stored for ``apply_stored_event``: call ``enqueue`` after
    this) or ``duplicate``.

    A refund burst is mostly these events: one round trip each, with no transaction
    around it, keeps the webhook's answer quick and its CPU small (README, Performance)."""
    ignored = HANDLERS.get(str(event["type"])) is None
    claimed = run_and_commit(connection, _STORE_SQL, _store_params(event, applied=ignored))
    return "duplicate" if claimed is None else "ignored" if ignored else "deferred"


def receive_event(*, session: Session, event: Mapping[str, Any]) -> str:
    """Store one verified event once and apply it if it carries all that is needed;
    commits. Returns ``processed``, ``ignored``, ``duplicate``, or ``deferred`` (stored,
    to be applied by ``apply_stored_event`` on a worker: call ``enqueue`` after this).

    Nothing here calls Stripe or holds a lock across a network call: an event whose
    handler would need Stripe (a refund event, a snapshot that cannot be trusted, a
    payment only Stripe can settle) is rolled back to a savepoint and stored for later.
    A concurrent delivery of the same event waits on the event id's insert and then
    finds it taken."""
    event_id = str(event["id"])
    handler = HANDLERS.get(str(event["type"]))
    claimed = driver_cursor(session).execute(_STORE_SQL, _store_params(event)).fetchone()
    if claimed is None:
        session.rollback()
        return "duplicate"
    applied = handler is None
    if handler is not None and handler not in ALWAYS_NEED_STRIPE:
        try:
            with session.begin_nested():
                handler(session, event["data"]["object"], NO_STRIPE)
            applied = True
        except NeedsStripe:
            applied = False
    if applied:
        _mark_applied(session, event_id)
    session.commit()
    return "deferred" if not applied else "processed" if handler is not None else "ignored"


def _storable(value: Any) -> Any:
    """The event's object as Postgres' jsonb can keep it: a string holding NUL (no Stripe
    field does; jsonb refuses them) is dropped. The worker then finds the snapshot
    untrusted and reads the object from Stripe, by its id (which verify_event checked)."""
    if isinstance(value, Mapping):
        return {str(k): _storable(v) for k, v in value.items() if "\x00" not in str(k)}
    if isinstance(value, list):
        return [_storable(v) for v in value]
    if isinstance(value, str) and "\x00" in value:
        return None
    return value


def coalescing_key(event: Mapping[str, Any]) -> str | None:
    """What a deferred event is about, for events that one answer from Stripe applies
    together (``_mark_superseded``): the handler and the object's id. None for the rest,
    which each need a task of their own."""
    handler = HANDLERS.get(str(event["type"]))
    if handler not in ALWAYS_NEED_STRIPE:
        return None
    return f"{handler.__name__}:{_object_id(event['data']['object'])}"


def apply_stored_event(event_id: str, *, gateway: StripeGateway, coalesced: bool = False) -> str:
    """Apply a stored event that needed Stripe (a worker's task). Returns ``processed``,
    or ``already_applied`` when another worker or an earlier delivery got there first.

    A ``coalesced`` task stands for every event about its object that arrived while it
    waited (``enqueue_stripe_event``): if its own event was applied meanwhile, it applies
    one of those that are not.

    Stripe is asked before the transaction opens, so no lock is held while it answers;
    the event is then applied and marked in one transaction, under its row lock."""
    with unit_of_work() as session:
        row = _stored(session, event_id)
        if row is not None and row.applied_at is not None and coalesced:
            waiting = _unapplied_about_the_same(session, row)
            row = _stored(session, waiting) if waiting is not None else row
            event_id = waiting or event_id
    if row is None or row.applied_at is not None:
        return "already_applied"
    handler = HANDLERS.get(row.type)
    fetched = _Prefetched(gateway)
    if handler is not None:
        # A dry run against Stripe alone, outside any transaction: what the handler asks
        # Stripe for is fetched now and answered from memory below.
        fetched.fetch(row.type, row.payload or {})
    with unit_of_work() as session:
        if driver_cursor(session).execute(_LOCK_UNAPPLIED_SQL, (event_id,)).fetchone() is None:
            return "already_applied"
        if handler is not None:
            handler(session, row.payload or {}, fetched)  # type: ignore[arg-type]
        _mark_applied(session, event_id)
        superseded = (
            _mark_superseded(session, handler, row.payload or {}, row.asked_after)
            if handler in ALWAYS_NEED_STRIPE else 0
        )
        session.commit()
    log.info("stripe event %s %s: processed", event_id, row.type,
             extra={"superseded_events": superseded})
    return "processed"


# Plain SQL on the session's connection (``driver_cursor``): in a refund burst, applying
# stored events was half of a worker's CPU, and building these through the ORM a fifth
# of that (make bench, py-spy).
# now(): a moment before Stripe is asked (see _mark_superseded).
_STORED_SQL = """
SELECT type, payload, applied_at, now() AS asked_after FROM stripe_events WHERE id = %s
"""
_LOCK_UNAPPLIED_SQL = """
SELECT id FROM stripe_events WHERE id = %s AND applied_at IS NULL FOR UPDATE SKIP LOCKED
"""
_OLDEST_UNAPPLIED_ABOUT_SQL = """
SELECT id FROM stripe_events
WHERE applied_at IS NULL AND payload->>'id' = %(object_id)s AND type = ANY(%(types)s)
ORDER BY received_at LIMIT 1
"""


def _stored(session: Session, event_id: str) -> Any:
    return driver_cursor(session).execute(_STORED_SQL, (event_id,)).fetchone()


def _types_of(handler: Handler) -> list[str]:
    """The event types ``handler`` applies: one answer from Stripe covers them all."""
    return [name for name, h in HANDLERS.items() if h is handler]


def _unapplied_about_the_same(session: Session, row: Any) -> str | None:
    """The oldest unapplied event that the same answer would apply (see below)."""
    handler = HANDLERS.get(row.type)
    if handler not in ALWAYS_NEED_STRIPE or row.payload is None:
        return None
    found = driver_cursor(session).execute(_OLDEST_UNAPPLIED_ABOUT_SQL, {
        "object_id": str(row.payload.get("id")), "types": _types_of(handler),
    }).fetchone()
    return None if found is None else found.id


# Unapplied events of these types about this object, stored before ``asked_after``.
# SKIP LOCKED: an event another worker is applying right now is left to it (and no two
# workers wait on each other's events).
_SUPERSEDED_SQL = """
UPDATE stripe_events SET applied_at = now(), payload = NULL
WHERE id IN (
    SELECT id FROM stripe_events
    WHERE applied_at IS NULL AND payload->>'id' = %(object_id)s
      AND type = ANY(%(types)s) AND received_at <= %(asked_after)s
    FOR UPDATE SKIP LOCKED
)
"""


def _mark_superseded(
    session: Session, handler: Handler, obj: Mapping[str, Any], asked_after: Any
) -> int:
    """Mark applied the other events that the answer just applied covers; how many.

    These handlers apply what Stripe says about the object now, whatever the event says,
    and Stripe sends several events about one refund (``refund.created``,
    ``refund.updated``, ``charge.refund.updated``...). Any of them stored before Stripe
    was asked was sent before it, so Stripe's answer is at least as new: applying it
    again would change nothing, and would spend a request of Stripe's rate limit (which
    refunds need) on each. Events stored later are applied on their own."""
    cursor = driver_cursor(session).execute(_SUPERSEDED_SQL, {
        "object_id": str(obj.get("id")), "types": _types_of(handler), "asked_after": asked_after,
    })
    return cursor.rowcount


class _Prefetched:
    """The gateway for a stored event's handler: the objects the event names, fetched
    from Stripe before the transaction; anything else (rare: a payment never seen) is
    passed through to Stripe."""

    def __init__(self, gateway: StripeGateway) -> None:
        self._gateway = gateway
        self._refunds: dict[str, Any] = {}
        self._charge_refunds: dict[str, list[Any]] = {}
        self._charges: dict[str, Any] = {}
        self._payment_intents: dict[str, Any] = {}

    def fetch(self, event_type: str, obj: Mapping[str, Any]) -> None:
        gateway = self._gateway
        object_id = str(obj.get("id"))
        if event_type.startswith("refund.") or event_type == "charge.refund.updated":
            self._refunds[object_id] = gateway.retrieve_refund(object_id)
        elif event_type == "charge.dispute.created":
            charge = _dispute_charge(obj)
            if charge is not None:
                self._charges[charge] = as_dict(gateway.retrieve_charge(charge))
        elif event_type.startswith("charge."):
            if not _is_snapshot(obj):
                self._charges[object_id] = as_dict(gateway.retrieve_charge(object_id))
            if event_type == "charge.refunded":
                self._charge_refunds[object_id] = list(gateway.iter_refunds(charge_id=object_id))
        elif event_type.startswith("payment_intent."):
            self._payment_intents[object_id] = as_dict(
                gateway.retrieve_payment_intent(object_id)
            )

    def retrieve_refund(self, refund_id: str) -> Any:
        return self._refunds.get(refund_id) or self._gateway.retrieve_refund(refund_id)

    def iter_refunds(self, *, charge_id: str | None = None, **filters: Any) -> Any:
        if charge_id in self._charge_refunds:
            return iter(self._charge_refunds[charge_id])
        return self._gateway.iter_refunds(charge_id=charge_id, **filters)

    def retrieve_charge(self, charge_id: str) -> Any:
        return self._charges.get(charge_id) or self._gateway.retrieve_charge(charge_id)

    def retrieve_payment_intent(self, payment_intent_id: str) -> Any:
        return (self._payment_intents.get(payment_intent_id)
                or self._gateway.retrieve_payment_intent(payment_intent_id))


def unapplied_event_ids(session: Session, *, older_than_seconds: float, limit: int) -> list[str]:
    """Stored events still waiting for a worker (the reconciler sends them again)."""
    return list(session.scalars(
        select(StripeEvent.id)
        .where(StripeEvent.applied_at.is_(None),
               StripeEvent.received_at < func.now() - timedelta(seconds=older_than_seconds))
        .order_by(StripeEvent.received_at)
        .limit(limit)
    ))


def _mark_applied(session: Session, event_id: str) -> None:
    driver_cursor(session).execute(
        "UPDATE stripe_events SET applied_at = now(), payload = NULL WHERE id = %s", (event_id,)
    )
