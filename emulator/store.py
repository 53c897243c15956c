"""In-memory Stripe objects and the rules Stripe applies to them.

Everything here runs under ``Store.lock`` (a re-entrant lock held by the HTTP
layer around each call and by the scheduler's callbacks), so the rules that
guard money (what is left to refund) are checked and applied atomically.

Objects are kept as the JSON-ready dicts the API returns. Every collection is an
append-only ``IndexList`` ordered by a global sequence number, so lookups are
dict hits and list pages are a bisect plus ``limit`` steps: nothing scans all
objects per request.
"""

from __future__ import annotations

import os
import random
import re
import string
import threading
import time
from bisect import bisect_left, bisect_right
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from . import cards
from .cards import TestCard
from .config import Config
from .errors import StripeError, invalid, missing, param_error
from .params import Params, merge_metadata
from .scheduler import Scheduler

API_VERSION = "2026-10-28.endive"
REFUND_REASONS = ["duplicate", "fraudulent", "requested_by_customer"]
CANCELLATION_REASONS = ["duplicate", "fraudulent", "requested_by_customer", "abandoned"]
CANCELABLE_PI_STATUSES = [
    "requires_payment_method",
    "requires_capture",
    "requires_confirmation",
    "requires_action",
    "processing",
]
CONFIRMABLE_PI_STATUSES = ("requires_payment_method", "requires_confirmation", "requires_action")


def _names(text: str) -> frozenset[str]:
    return frozenset(text.split())


ZERO_DECIMAL = _names("bif clp djf gnf jpy kmf krw mga pyg rwf ugx vnd vuv xaf xof xpf")


# Parameters the SDK or a caller may send that the emulator accepts and ignores.
_PI_IGNORED = _names(
    """
    automatic_payment_methods confirmation_method customer error_on_requires_action mandate
    mandate_data off_session on_behalf_of payment_method_options payment_method_types
    radar_options receipt_email return_url setup_future_usage shipping statement_descriptor
    statement_descriptor_suffix transfer_data transfer_group use_stripe_sdk
    application_fee_amount payment_method_configuration confirmation_token
    excluded_payment_method_types
    """
)
PI_CREATE_PARAMS = _PI_IGNORED | _names(
    "amount currency payment_method payment_method_data confirm metadata description capture_method"
)
PI_UPDATE_PARAMS = _PI_IGNORED | _names(
    "amount currency payment_method payment_method_data metadata description"
)
PI_CONFIRM_PARAMS = _PI_IGNORED | _names("payment_method payment_method_data capture_method")
PI_CANCEL_PARAMS = _names("cancellation_reason")
CHARGE_CREATE_PARAMS = _names(
    """
    amount currency source customer description metadata capture receipt_email
    statement_descriptor statement_descriptor_suffix shipping transfer_group on_behalf_of
    """
)
CHARGE_UPDATE_PARAMS = _names(
    "metadata description receipt_email shipping fraud_details transfer_group"
)
REFUND_CREATE_PARAMS = _names(
    """
    charge payment_intent amount reason metadata instructions_email refund_application_fee
    reverse_transfer origin currency customer
    """
)
REFUND_UPDATE_PARAMS = _names("metadata")
PM_CREATE_PARAMS = _names("type card billing_details metadata")
LIST_PARAMS = _names("limit starting_after ending_before created")

_ALPHABET = string.ascii_letters + string.digits
# Object ids need to be unique, not unguessable; a seeded PRNG is much faster than secrets.
_rng = random.Random(os.urandom(16))  # noqa: S311


def new_id(prefix: str, length: int = 24) -> str:
    return prefix + "_" + "".join(_rng.choices(_ALPHABET, k=length))


def copy_json(value: Any) -> Any:
    """A deep copy of a JSON tree (faster than ``copy.deepcopy``)."""
    if isinstance(value, dict):
        return {k: copy_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [copy_json(v) for v in value]
    return value


def format_amount(amount: int, currency: str) -> str:
    if currency in ZERO_DECIMAL:
        return f"{amount} {currency.upper()}"
    if currency == "usd":
        return f"${amount / 100:.2f}"
    return f"{amount / 100:.2f} {currency.upper()}"


@dataclass
class RequestContext:
    request_id: str | None = None
    idempotency_key: str | None = None


class Rec:
    """One stored object: its API dict plus what the emulator knows about it."""

    __slots__ = ("card", "kind", "obj", "seq")

    def __init__(
        self, obj: dict[str, Any], seq: int, kind: str, card: TestCard | None = None
    ) -> None:
        self.obj = obj
        self.seq = seq
        self.kind = kind
        self.card = card


class IndexList:
    """Records in creation order, with their sequence numbers for bisecting."""

    __slots__ = ("recs", "seqs")

    def __init__(self) -> None:
        self.recs: list[Rec] = []
        self.seqs: list[int] = []

    def append(self, rec: Rec) -> None:
        self.recs.append(rec)
        self.seqs.append(rec.seq)

    def insert(self, rec: Rec) -> None:
        i = bisect_left(self.seqs, rec.seq)
        self.seqs.insert(i, rec.seq)
        self.recs.insert(i, rec)

    def remove(self, rec: Rec) -> None:
        i = bisect_left(self.seqs, rec.seq)
        if i < len(self.recs) and self.recs[i] is rec:
            del self.recs[i]
            del self.seqs[i]

    def __len__(self) -> int:
        return len(self.recs)


KINDS = ("payment_intent", "charge", "refund", "event", "payment_method", "dispute")
_KIND_NAMES = {
    "payment_intent": "payment_intent",
    "charge": "charge",
    "refund": "refund",
    "event": "event",
    "payment_method": "PaymentMethod",
    "dispute": "dispute",
}


class Store:
    def __init__(
        self,
        config: Config,
        scheduler: Scheduler,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.lock = threading.RLock()
        self.config = config
        self.scheduler = scheduler
        self.on_event = on_event
        self.clock = clock
        self.generation = 0
        self._reset_state()

    # ------------------------------------------------------------------ state

    def _reset_state(self) -> None:
        self.objects: dict[str, Rec] = {}
        self.lists: dict[str, IndexList] = {kind: IndexList() for kind in KINDS}
        self.charges_by_pi: dict[str, IndexList] = defaultdict(IndexList)
        self.refunds_by_charge: dict[str, IndexList] = defaultdict(IndexList)
        self.refunds_by_pi: dict[str, IndexList] = defaultdict(IndexList)
        self.refunds_by_refund_id: dict[str, IndexList] = defaultdict(IndexList)
        self.disputes_by_charge: dict[str, IndexList] = defaultdict(IndexList)
        self.disputes_by_pi: dict[str, IndexList] = defaultdict(IndexList)
        self.events_by_type: dict[str, IndexList] = defaultdict(IndexList)
        self.refund_status_counts: dict[str, int] = defaultdict(int)
        self._seq = 0
        self.generation += 1

    def reset(self) -> None:
        with self.lock:
            self._reset_state()

    def _now(self) -> int:
        return int(self.clock())

    def _add(self, kind: str, obj: dict[str, Any], card: TestCard | None = None) -> Rec:
        self._seq += 1
        rec = Rec(obj, self._seq, kind, card)
        self.objects[obj["id"]] = rec
        self.lists[kind].append(rec)
        return rec

    def _get(self, kind: str, object_id: str | None, *, param: str | None = None) -> Rec:
        rec = self.objects.get(object_id) if object_id else None
        if rec is None or rec.kind != kind:
            raise missing(_KIND_NAMES[kind], str(object_id), param=param)
        return rec

    def _emit(
        self,
        event_type: str,
        obj: dict[str, Any],
        ctx: RequestContext | None,
        previous: dict[str, Any] | None = None,
    ) -> None:
        data: dict[str, Any] = {"object": copy_json(obj)}
        if previous is not None:
            data["previous_attributes"] = previous
        event = {
            "id": new_id("evt"),
            "object": "event",
            "api_version": API_VERSION,
            "created": self._now(),
            "data": data,
            "livemode": False,
            "pending_webhooks": 1 if self.config.webhook_url else 0,
            "request": {
                "id": ctx.request_id if ctx else None,
                "idempotency_key": ctx.idempotency_key if ctx else None,
            },
            "type": event_type,
        }
        rec = self._add("event", event)
        self.events_by_type[event_type].append(rec)
        if self.on_event is not None:
            self.on_event(event)

    # -------------------------------------------------------------- rendering

    def render(self, obj: dict[str, Any], expand: Iterable[str] = ()) -> dict[str, Any]:
        """The API view of ``obj`` with ``expand`` paths replaced by the objects they name."""
        expand = list(expand)
        if not expand:
            return obj
        out = dict(obj)
        for path in expand:
            self._expand_path(out, path.split("."), path)
        return out

    def _expand_path(self, node: dict[str, Any], parts: list[str], path: str) -> None:
        field = parts[0]
        if field not in node and not (field == "refunds" and node.get("object") == "charge"):
            raise param_error(f"This property cannot be expanded ({path}).", param="expand")
        value = node.get(field)
        if field == "refunds" and node.get("object") == "charge" and not isinstance(value, dict):
            value = self._refunds_list_of_charge(node["id"])
        elif isinstance(value, str):
            rec = self.objects.get(value)
            if rec is not None:
                value = dict(rec.obj)
        elif isinstance(value, dict):
            value = dict(value)
        node[field] = value
        if len(parts) > 1 and isinstance(value, dict):
            self._expand_path(value, parts[1:], path)

    def _refunds_list_of_charge(self, charge_id: str) -> dict[str, Any]:
        index = self.refunds_by_charge.get(charge_id)
        recs = list(reversed(index.recs)) if index else []
        return {
            "object": "list",
            "data": [r.obj for r in recs[:10]],
            "has_more": len(recs) > 10,
            "total_count": len(recs),
            "url": f"/v1/charges/{charge_id}/refunds",
        }

    def _list(
        self,
        index: IndexList | None,
        params: dict[str, Any],
        url: str,
        *,
        allowed: Iterable[str] = (),
        match: Callable[[Rec], bool] | None = None,
    ) -> dict[str, Any]:
        p = Params(params, set(allowed) | LIST_PARAMS)
        limit = p.integer("limit", minimum=1)
        if limit is None:
            limit = 10
        if limit > 100:
            raise param_error(
                "This value must be less than or equal to 100.",
                code="parameter_invalid_integer",
                param="limit",
            )
        starting_after = p.string("starting_after")
        ending_before = p.string("ending_before")
        if starting_after and ending_before:
            raise param_error(
                "You may only specify one of these parameters: ending_before, starting_after.",
                code="parameters_exclusive",
                param="ending_before",
            )
        lower, upper = _created_bounds(params.get("created"))
        expand = [e[len("data.") :] for e in p.expand() if e.startswith("data.")]

        def ok(rec: Rec) -> bool:
            created = rec.obj["created"]
            if upper is not None and created > upper:
                return False
            if lower is not None and created < lower:
                return False
            return match is None or match(rec)

        found: list[Rec] = []
        has_more = False
        if index is not None and len(index):
            recs, seqs = index.recs, index.seqs
            if ending_before:
                anchor = self._anchor(ending_before, "ending_before")
                i = bisect_right(seqs, anchor.seq)
                while i < len(recs) and len(found) <= limit:
                    rec = recs[i]
                    if upper is not None and rec.obj["created"] > upper:
                        break
                    if ok(rec):
                        found.append(rec)
                    i += 1
                has_more = len(found) > limit
                found = found[:limit]
                found.reverse()
            else:
                if starting_after:
                    i = bisect_left(seqs, self._anchor(starting_after, "starting_after").seq) - 1
                else:
                    i = len(recs) - 1
                while i >= 0 and len(found) <= limit:
                    rec = recs[i]
                    if lower is not None and rec.obj["created"] < lower:
                        break
                    if ok(rec):
                        found.append(rec)
                    i -= 1
                has_more = len(found) > limit
                found = found[:limit]
        return {
            "object": "list",
            "data": [self.render(r.obj, expand) for r in found],
            "has_more": has_more,
            "url": url,
        }

    def _anchor(self, object_id: str, param: str) -> Rec:
        rec = self.objects.get(object_id)
        if rec is None:
            raise StripeError(
                404, f"No such object: '{object_id}'", code="resource_missing", param=param
            )
        return rec

    # -------------------------------------------------------- payment methods

    def _payment_method_obj(
        self, card: TestCard, metadata: dict[str, str] | None = None
    ) -> dict[str, Any]:
        return {
            "id": new_id("pm"),
            "object": "payment_method",
            "allow_redisplay": "unspecified",
            "billing_details": {
                "address": {
                    "city": None,
                    "country": None,
                    "line1": None,
                    "line2": None,
                    "postal_code": None,
                    "state": None,
                },
                "email": None,
                "name": None,
                "phone": None,
            },
            "card": _card_details(card),
            "created": self._now(),
            "customer": None,
            "livemode": False,
            "metadata": metadata or {},
            "type": "card",
        }

    def _new_payment_method(self, card: TestCard, metadata: dict[str, str] | None = None) -> Rec:
        return self._add("payment_method", self._payment_method_obj(card, metadata), card)

    def _resolve_payment_method(self, value: str, param: str = "payment_method") -> Rec:
        rec = self.objects.get(value)
        if rec is not None and rec.kind == "payment_method":
            return rec
        card = cards.by_alias(value)
        if card is None:
            raise missing("PaymentMethod", value, param=param)
        return self._new_payment_method(card)

    def _payment_method_from_data(self, data: dict[str, Any], param: str) -> Rec:
        if data.get("type", "card") != "card":
            raise param_error(
                "Only payment_method_data[type]=card is supported.", param=f"{param}[type]"
            )
        card_data = data.get("card")
        if not isinstance(card_data, dict):
            raise param_error(
                "Missing required param: card.", code="parameter_missing", param=f"{param}[card]"
            )
        card = _card_from_params(card_data, f"{param}[card]")
        return self._new_payment_method(card)

    def create_payment_method(self, params: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
        p = Params(params, PM_CREATE_PARAMS)
        p.enum("type", ["card"], default="card")
        card_data = p.mapping("card")
        if card_data is None:
            raise param_error(
                "Missing required param: card.", code="parameter_missing", param="card"
            )
        card = _card_from_params(card_data, "card")
        rec = self._new_payment_method(card, p.metadata())
        return self.render(rec.obj, p.expand())

    def retrieve_payment_method(self, pm_id: str, params: dict[str, Any]) -> dict[str, Any]:
        p = Params(params, ())
        return self.render(self._get("payment_method", pm_id).obj, p.expand())

    # -------------------------------------------------------- payment intents

    def create_payment_intent(self, params: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
        p = Params(params, PI_CREATE_PARAMS)
        amount = p.integer("amount", required=True, minimum=1)
        currency = p.currency(required=True)
        capture_method = p.enum(
            "capture_method", ["automatic", "automatic_async", "manual"], default="automatic_async"
        )
        if capture_method == "manual":
            raise param_error(
                "The emulator supports only automatic capture (capture_method=automatic).",
                param="capture_method",
            )
        confirm = p.boolean("confirm")
        metadata = p.metadata() or {}
        description = p.string("description")
        pm_rec = self._payment_method_param(p)
        assert amount is not None and currency is not None
        pi = self._payment_intent_obj(
            amount, currency, capture_method or "automatic_async", metadata, description, pm_rec
        )
        rec = self._add("payment_intent", pi)
        self._emit("payment_intent.created", pi, ctx)
        if confirm:
            self._confirm(rec, ctx)
        return self.render(pi, p.expand())

    def _payment_method_param(self, p: Params) -> Rec | None:
        pm_value = p.string("payment_method")
        pm_data = p.mapping("payment_method_data")
        if pm_value and pm_data:
            raise param_error(
                "You may only specify one of these parameters: payment_method, "
                "payment_method_data.",
                code="parameters_exclusive",
                param="payment_method_data",
            )
        if pm_value:
            return self._resolve_payment_method(pm_value)
        if pm_data:
            return self._payment_method_from_data(pm_data, "payment_method_data")
        return None

    def _payment_intent_obj(
        self,
        amount: int,
        currency: str,
        capture_method: str,
        metadata: dict[str, str],
        description: str | None,
        pm_rec: Rec | None,
    ) -> dict[str, Any]:
        pi_id = new_id("pi")
        return {
            "id": pi_id,
            "object": "payment_intent",
            "amount": amount,
            "amount_capturable": 0,
            "amount_details": {"tip": {}},
            "amount_received": 0,
            "application": None,
            "application_fee_amount": None,
            "automatic_payment_methods": None,
            "canceled_at": None,
            "cancellation_reason": None,
            "capture_method": capture_method,
            "client_secret": f"{pi_id}_secret_{new_id('s')[2:]}",
            "confirmation_method": "automatic",
            "created": self._now(),
            "currency": currency,
            "customer": None,
            "description": description,
            "last_payment_error": None,
            "latest_charge": None,
            "livemode": False,
            "metadata": metadata,
            "next_action": None,
            "on_behalf_of": None,
            "payment_method": pm_rec.obj["id"] if pm_rec else None,
            "payment_method_configuration_details": None,
            "payment_method_options": {"card": {"request_three_d_secure": "automatic"}},
            "payment_method_types": ["card"],
            "processing": None,
            "receipt_email": None,
            "review": None,
            "setup_future_usage": None,
            "shipping": None,
            "source": None,
            "statement_descriptor": None,
            "statement_descriptor_suffix": None,
            "status": "requires_confirmation" if pm_rec else "requires_payment_method",
            "transfer_data": None,
            "transfer_group": None,
        }

    def retrieve_payment_intent(self, pi_id: str, params: dict[str, Any]) -> dict[str, Any]:
        p = Params(params, ("client_secret",))
        return self.render(self._get("payment_intent", pi_id).obj, p.expand())

    def update_payment_intent(
        self, pi_id: str, params: dict[str, Any], ctx: RequestContext
    ) -> dict[str, Any]:
        p = Params(params, PI_UPDATE_PARAMS)
        rec = self._get("payment_intent", pi_id)
        pi = rec.obj
        metadata = p.metadata()
        description = p.string("description")
        amount = p.integer("amount", minimum=1)
        currency = p.currency()
        pm_rec = self._payment_method_param(p)
        changes_payment = amount is not None or currency is not None or pm_rec is not None
        if changes_payment and pi["status"] not in CONFIRMABLE_PI_STATUSES:
            raise invalid(
                f"You cannot update this PaymentIntent because it has a status of {pi['status']}.",
                code="payment_intent_unexpected_state",
            )
        if metadata is not None:
            pi["metadata"] = merge_metadata(pi["metadata"], metadata)
        if description is not None:
            pi["description"] = description
        if amount is not None:
            pi["amount"] = amount
        if currency is not None:
            pi["currency"] = currency
        if pm_rec is not None:
            pi["payment_method"] = pm_rec.obj["id"]
            pi["status"] = "requires_confirmation"
        return self.render(pi, p.expand())

    def confirm_payment_intent(
        self, pi_id: str, params: dict[str, Any], ctx: RequestContext
    ) -> dict[str, Any]:
        p = Params(params, PI_CONFIRM_PARAMS)
        rec = self._get("payment_intent", pi_id)
        pm_rec = self._payment_method_param(p)
        if pm_rec is not None and rec.obj["status"] in CONFIRMABLE_PI_STATUSES:
            rec.obj["payment_method"] = pm_rec.obj["id"]
        self._confirm(rec, ctx)
        return self.render(rec.obj, p.expand())

    def _confirm(self, rec: Rec, ctx: RequestContext) -> None:
        pi = rec.obj
        if pi["status"] not in CONFIRMABLE_PI_STATUSES:
            raise invalid(
                f"You cannot confirm this PaymentIntent because it has a status of {pi['status']}. "
                "Only a PaymentIntent with one of the following statuses may be confirmed: "
                "requires_confirmation, requires_payment_method, requires_action.",
                code="payment_intent_unexpected_state",
                payment_intent=copy_json(pi),
            )
        if not pi["payment_method"]:
            raise invalid(
                "You cannot confirm this PaymentIntent because it's missing a payment method. To "
                "confirm the "
                "PaymentIntent with a PaymentMethod, pass `payment_method`.",
                code="payment_intent_unexpected_state",
                param="payment_method",
                payment_intent=copy_json(pi),
            )
        pm_rec = self._get("payment_method", pi["payment_method"], param="payment_method")
        card = pm_rec.card or cards.CARDS["visa"]
        if card.behavior == cards.REQUIRES_ACTION and pi["status"] != "requires_action":
            pi["status"] = "requires_action"
            pi["next_action"] = {
                "type": "use_stripe_sdk",
                "use_stripe_sdk": {"type": "three_d_secure_redirect"},
            }
            self._emit("payment_intent.requires_action", pi, ctx)
            return
        pi["next_action"] = None
        charge_rec = self._charge(
            amount=pi["amount"],
            currency=pi["currency"],
            card=card,
            pm_id=pm_rec.obj["id"],
            pi_id=pi["id"],
            description=pi["description"],
            metadata=dict(pi["metadata"]),
            ctx=ctx,
        )
        charge = charge_rec.obj
        pi["latest_charge"] = charge["id"]
        if charge["status"] == "failed":
            error = {
                "type": "card_error",
                "code": card.error_code,
                "decline_code": card.decline_code,
                "message": card.message,
                "charge": charge["id"],
                "doc_url": "https://docs.stripe.com/error-codes/"
                + card.error_code.replace("_", "-"),
                "payment_method": copy_json(pm_rec.obj),
            }
            pi["status"] = "requires_payment_method"
            pi["last_payment_error"] = error
            pi["payment_method"] = None
            self._emit("payment_intent.payment_failed", pi, ctx)
            raise StripeError(
                402,
                card.message,
                type="card_error",
                code=card.error_code,
                decline_code=card.decline_code,
                charge=charge["id"],
                payment_intent=copy_json(pi),
                payment_method=copy_json(pm_rec.obj),
            )
        pi["status"] = "succeeded"
        pi["amount_received"] = pi["amount"]
        pi["last_payment_error"] = None
        self._emit("payment_intent.succeeded", pi, ctx)
        self._maybe_dispute(charge_rec, ctx)

    def cancel_payment_intent(
        self, pi_id: str, params: dict[str, Any], ctx: RequestContext
    ) -> dict[str, Any]:
        p = Params(params, PI_CANCEL_PARAMS)
        reason = p.enum("cancellation_reason", CANCELLATION_REASONS)
        rec = self._get("payment_intent", pi_id)
        pi = rec.obj
        if pi["status"] not in CANCELABLE_PI_STATUSES:
            raise invalid(
                f"You cannot cancel this PaymentIntent because it has a status of {pi['status']}. "
                "Only a "
                "PaymentIntent with one of the following statuses may be canceled: "
                + ", ".join(CANCELABLE_PI_STATUSES)
                + ".",
                code="payment_intent_unexpected_state",
                payment_intent=copy_json(pi),
            )
        pi["status"] = "canceled"
        pi["canceled_at"] = self._now()
        pi["cancellation_reason"] = reason
        pi["next_action"] = None
        self._emit("payment_intent.canceled", pi, ctx)
        return self.render(pi, p.expand())

    def list_payment_intents(self, params: dict[str, Any]) -> dict[str, Any]:
        if params.get("customer"):
            return self._list(None, params, "/v1/payment_intents", allowed=("customer",))
        return self._list(
            self.lists["payment_intent"], params, "/v1/payment_intents", allowed=("customer",)
        )

    # ---------------------------------------------------------------- charges

    def _charge(
        self,
        *,
        amount: int,
        currency: str,
        card: TestCard,
        pm_id: str | None,
        pi_id: str | None,
        description: str | None,
        metadata: dict[str, str],
        ctx: RequestContext | None,
        emit: bool = True,
    ) -> Rec:
        declined = card.behavior == cards.DECLINE
        charge = self._charge_obj(
            amount, currency, card, pm_id, pi_id, description, metadata, declined
        )
        rec = self._add("charge", charge, card)
        if pi_id:
            self.charges_by_pi[pi_id].append(rec)
        if emit:
            self._emit("charge.failed" if declined else "charge.succeeded", charge, ctx)
        return rec

    def _charge_obj(
        self,
        amount: int,
        currency: str,
        card: TestCard,
        pm_id: str | None,
        pi_id: str | None,
        description: str | None,
        metadata: dict[str, str],
        declined: bool,
    ) -> dict[str, Any]:
        charge_id = new_id("ch")
        if declined:
            outcome = {
                "network_status": "declined_by_network",
                "reason": card.decline_code,
                "risk_level": "normal",
                "risk_score": 20,
                "seller_message": "The bank did not return any further details with this decline.",
                "type": "issuer_declined",
            }
        else:
            outcome = {
                "network_status": "approved_by_network",
                "reason": None,
                "risk_level": "normal",
                "risk_score": 20,
                "seller_message": "Payment complete.",
                "type": "authorized",
            }
        return {
            "id": charge_id,
            "object": "charge",
            "amount": amount,
            "amount_captured": 0 if declined else amount,
            "amount_refunded": 0,
            "application": None,
            "application_fee": None,
            "application_fee_amount": None,
            "balance_transaction": None if declined else new_id("txn"),
            "billing_details": {
                "address": {
                    "city": None,
                    "country": None,
                    "line1": None,
                    "line2": None,
                    "postal_code": None,
                    "state": None,
                },
                "email": None,
                "name": None,
                "phone": None,
            },
            "calculated_statement_descriptor": "STRIPE EMULATOR",
            "captured": not declined,
            "created": self._now(),
            "currency": currency,
            "customer": None,
            "description": description,
            "disputed": False,
            "failure_balance_transaction": None,
            "failure_code": card.error_code if declined else None,
            "failure_message": card.message if declined else None,
            "fraud_details": {},
            "livemode": False,
            "metadata": metadata,
            "on_behalf_of": None,
            "outcome": outcome,
            "paid": not declined,
            "payment_intent": pi_id,
            "payment_method": pm_id,
            "payment_method_details": {"card": _card_details(card), "type": "card"},
            "receipt_email": None,
            "receipt_number": None,
            "receipt_url": f"https://pay.stripe.com/receipts/emulator/{charge_id}",
            "refunded": False,
            "review": None,
            "shipping": None,
            "source": None,
            "source_transfer": None,
            "statement_descriptor": None,
            "statement_descriptor_suffix": None,
            "status": "failed" if declined else "succeeded",
            "transfer_data": None,
            "transfer_group": None,
        }

    def create_charge(self, params: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
        p = Params(params, CHARGE_CREATE_PARAMS)
        amount = p.integer("amount", required=True, minimum=1)
        currency = p.currency(required=True)
        if not p.boolean("capture", default=True):
            raise param_error(
                "The emulator supports only captured charges (capture=true).", param="capture"
            )
        source = p.string("source")
        if source is None:
            raise param_error(
                "Must provide source or customer.", code="parameter_missing", param="source"
            )
        metadata = p.metadata() or {}
        description = p.string("description")
        assert amount is not None and currency is not None
        pm_rec = self.objects.get(source)
        if pm_rec is not None and pm_rec.kind == "payment_method":
            card = pm_rec.card or cards.CARDS["visa"]
        else:
            found = cards.by_alias(source)
            if found is None:
                raise missing("source", source, param="source")
            card = found
        rec = self._charge(
            amount=amount,
            currency=currency,
            card=card,
            pm_id=pm_rec.obj["id"]
            if pm_rec is not None and pm_rec.kind == "payment_method"
            else new_id("card"),
            pi_id=None,
            description=description,
            metadata=metadata,
            ctx=ctx,
        )
        charge = rec.obj
        if charge["status"] == "failed":
            raise StripeError(
                402,
                card.message,
                type="card_error",
                code=card.error_code,
                decline_code=card.decline_code,
                charge=charge["id"],
            )
        self._maybe_dispute(rec, ctx)
        return self.render(charge, p.expand())

    def retrieve_charge(self, charge_id: str, params: dict[str, Any]) -> dict[str, Any]:
        p = Params(params, ())
        return self.render(self._get("charge", charge_id).obj, p.expand())

    def update_charge(
        self, charge_id: str, params: dict[str, Any], ctx: RequestContext
    ) -> dict[str, Any]:
        p = Params(params, CHARGE_UPDATE_PARAMS)
        rec = self._get("charge", charge_id)
        charge = rec.obj
        metadata = p.metadata()
        description = p.string("description")
        previous: dict[str, Any] = {}
        if metadata is not None:
            previous["metadata"] = dict(charge["metadata"])
            charge["metadata"] = merge_metadata(charge["metadata"], metadata)
        if description is not None:
            previous["description"] = charge["description"]
            charge["description"] = description
        if previous:
            self._emit("charge.updated", charge, ctx, previous)
        return self.render(charge, p.expand())

    def list_charges(self, params: dict[str, Any]) -> dict[str, Any]:
        pi_id = params.get("payment_intent")
        allowed = ("payment_intent", "customer", "transfer_group")
        if params.get("customer") or params.get("transfer_group"):
            return self._list(None, params, "/v1/charges", allowed=allowed)
        if pi_id:
            return self._list(
                self.charges_by_pi.get(str(pi_id)), params, "/v1/charges", allowed=allowed
            )
        return self._list(self.lists["charge"], params, "/v1/charges", allowed=allowed)

    # --------------------------------------------------------------- disputes

    def _maybe_dispute(self, charge_rec: Rec, ctx: RequestContext | None) -> None:
        card = charge_rec.card
        if card is None or card.behavior not in (cards.DISPUTE, cards.DISPUTE_INQUIRY):
            return
        self.dispute_charge(
            charge_rec.obj["id"],
            reason=card.dispute_reason,
            inquiry=card.behavior == cards.DISPUTE_INQUIRY,
            ctx=ctx,
        )

    def dispute_charge(
        self,
        charge_id: str,
        *,
        reason: str = "fraudulent",
        inquiry: bool = False,
        ctx: RequestContext | None = None,
    ) -> dict[str, Any]:
        rec = self._get("charge", charge_id)
        charge = rec.obj
        if charge["status"] != "succeeded":
            raise invalid(f"Charge {charge_id} did not succeed and cannot be disputed.")
        now = self._now()
        dispute = {
            "id": new_id("dp"),
            "object": "dispute",
            "amount": charge["amount"],
            "balance_transactions": [],
            "charge": charge["id"],
            "created": now,
            "currency": charge["currency"],
            "evidence": {},
            "evidence_details": {
                "due_by": now + 7 * 86400,
                "has_evidence": False,
                "past_due": False,
                "submission_count": 0,
            },
            "is_charge_refundable": inquiry,
            "livemode": False,
            "metadata": {},
            "payment_intent": charge["payment_intent"],
            "reason": reason,
            "status": "warning_needs_response" if inquiry else "needs_response",
        }
        drec = self._add("dispute", dispute)
        self.disputes_by_charge[charge["id"]].append(drec)
        if charge["payment_intent"]:
            self.disputes_by_pi[charge["payment_intent"]].append(drec)
        charge["disputed"] = True
        self._emit("charge.dispute.created", dispute, ctx)
        return dispute

    def retrieve_dispute(self, dispute_id: str, params: dict[str, Any]) -> dict[str, Any]:
        p = Params(params, ())
        return self.render(self._get("dispute", dispute_id).obj, p.expand())

    def list_disputes(self, params: dict[str, Any]) -> dict[str, Any]:
        allowed = ("charge", "payment_intent")
        if params.get("charge"):
            return self._list(
                self.disputes_by_charge.get(str(params["charge"])),
                params,
                "/v1/disputes",
                allowed=allowed,
            )
        if params.get("payment_intent"):
            return self._list(
                self.disputes_by_pi.get(str(params["payment_intent"])),
                params,
                "/v1/disputes",
                allowed=allowed,
            )
        return self._list(self.lists["dispute"], params, "/v1/disputes", allowed=allowed)

    # ---------------------------------------------------------------- refunds

    def create_refund(
        self, params: dict[str, Any], ctx: RequestContext, *, charge_id: str | None = None
    ) -> dict[str, Any]:
        p = Params(params, REFUND_CREATE_PARAMS)
        if charge_id is None:
            charge_id = p.string("charge")
        pi_id = p.string("payment_intent")
        amount = p.integer("amount", minimum=1)
        reason = p.enum("reason", REFUND_REASONS)
        metadata = p.metadata() or {}
        if charge_id and pi_id:
            raise param_error(
                "You may only specify one of these parameters: charge, payment_intent.",
                code="parameters_exclusive",
                param="payment_intent",
            )
        if not charge_id and not pi_id:
            raise param_error(
                "One of the following params should be provided for this request: charge or "
                "payment_intent.",
                code="parameter_missing",
            )
        if pi_id:
            pi = self._get("payment_intent", pi_id, param="payment_intent").obj
            if pi["status"] != "succeeded" or not pi["latest_charge"]:
                raise invalid(
                    f"This PaymentIntent ({pi_id}) does not have a successful charge to refund.",
                    code="payment_intent_unexpected_state",
                    param="payment_intent",
                )
            charge_rec = self._get("charge", pi["latest_charge"])
        else:
            charge_rec = self._get("charge", charge_id, param="charge")
        rec = self._refund_charge(charge_rec, amount, reason, metadata, ctx)
        return self.render(rec.obj, p.expand())

    def _refund_charge(
        self,
        charge_rec: Rec,
        amount: int | None,
        reason: str | None,
        metadata: dict[str, str],
        ctx: RequestContext,
    ) -> Rec:
        charge = charge_rec.obj
        cid = charge["id"]
        if charge["status"] != "succeeded":
            raise invalid(f"Charge {cid} has not succeeded and cannot be refunded.", param="charge")
        if self._charged_back(cid):
            raise invalid(
                f"Charge {cid} has been charged back; cannot issue a refund.",
                code="charge_disputed",
            )
        remaining = charge["amount_captured"] - charge["amount_refunded"]
        if remaining <= 0:
            raise invalid(
                f"Charge {cid} has already been refunded.", code="charge_already_refunded"
            )
        if amount is None:
            amount = remaining
        if amount > remaining:
            raise invalid(
                f"Refund amount ({format_amount(amount, charge['currency'])}) is greater than "
                "unrefunded amount "
                f"on charge ({format_amount(remaining, charge['currency'])})",
                code="amount_too_large",
                param="amount",
            )
        behavior = charge_rec.card.behavior if charge_rec.card else cards.SUCCEED
        status = "pending" if behavior == cards.PENDING_REFUND else "succeeded"
        refund = {
            "id": new_id("re"),
            "object": "refund",
            "amount": amount,
            "balance_transaction": new_id("txn"),
            "charge": cid,
            "created": self._now(),
            "currency": charge["currency"],
            "destination_details": {
                "card": {
                    "reference_status": "pending",
                    "reference_type": "acquirer_reference_number",
                    "type": "refund",
                },
                "type": "card",
            },
            "failure_reason": None,
            "metadata": metadata,
            "payment_intent": charge["payment_intent"],
            "pending_reason": "processing" if status == "pending" else None,
            "reason": reason,
            "receipt_number": None,
            "source_transfer_reversal": None,
            "status": status,
            "transfer_reversal": None,
        }
        rec = self._add("refund", refund, charge_rec.card)
        self.refunds_by_charge[cid].append(rec)
        if charge["payment_intent"]:
            self.refunds_by_pi[charge["payment_intent"]].append(rec)
        refund_id = metadata.get("refund_id")
        if refund_id is not None:
            self.refunds_by_refund_id[refund_id].append(rec)
        self.refund_status_counts[status] += 1
        previous = {"amount_refunded": charge["amount_refunded"], "refunded": charge["refunded"]}
        charge["amount_refunded"] += amount
        charge["refunded"] = charge["amount_refunded"] >= charge["amount_captured"]
        self._emit("refund.created", refund, ctx)
        self._emit("charge.refunded", charge, ctx, previous)
        generation = self.generation
        if behavior == cards.PENDING_REFUND:
            self.scheduler.call_later(
                self.config.pending_refund_delay,
                lambda: self._scheduled(generation, refund["id"], "succeed"),
            )
        elif behavior == cards.REFUND_FAIL:
            self.scheduler.call_later(
                self.config.failing_refund_delay,
                lambda: self._scheduled(generation, refund["id"], "fail"),
            )
        return rec

    def _charged_back(self, charge_id: str) -> bool:
        index = self.disputes_by_charge.get(charge_id)
        return bool(index) and any(not r.obj["is_charge_refundable"] for r in index.recs)

    def _scheduled(self, generation: int, refund_id: str, action: str) -> None:
        with self.lock:
            if generation != self.generation:
                return
            rec = self.objects.get(refund_id)
            if rec is None:
                return
            if action == "succeed" and rec.obj["status"] == "pending":
                self._succeed_refund(rec, None)
            elif action == "fail" and rec.obj["status"] in ("pending", "succeeded"):
                self._fail_refund(rec, "expired_or_canceled_card", None)

    def _set_refund_status(self, rec: Rec, status: str) -> str:
        refund = rec.obj
        old = refund["status"]
        self.refund_status_counts[old] -= 1
        self.refund_status_counts[status] += 1
        refund["status"] = status
        return old

    def _succeed_refund(self, rec: Rec, ctx: RequestContext | None) -> None:
        refund = rec.obj
        old = self._set_refund_status(rec, "succeeded")
        refund["pending_reason"] = None
        previous = (
            {"status": old, "pending_reason": "processing"} if old == "pending" else {"status": old}
        )
        self._emit("refund.updated", refund, ctx, previous)
        self._emit("charge.refund.updated", refund, ctx, previous)

    def _fail_refund(self, rec: Rec, failure_reason: str, ctx: RequestContext | None) -> None:
        refund = rec.obj
        old = self._set_refund_status(rec, "failed")
        refund["failure_reason"] = failure_reason
        refund["failure_balance_transaction"] = new_id("txn")
        refund["pending_reason"] = None
        charge = self.objects[refund["charge"]].obj
        # A failed refund gives its amount back to the charge.
        charge["amount_refunded"] -= refund["amount"]
        charge["refunded"] = charge["amount_refunded"] >= charge["amount_captured"] > 0
        previous = {"status": old, "failure_reason": None}
        self._emit("refund.failed", refund, ctx, previous)
        self._emit("refund.updated", refund, ctx, previous)
        self._emit("charge.refund.updated", refund, ctx, previous)

    def retrieve_refund(self, refund_id: str, params: dict[str, Any]) -> dict[str, Any]:
        p = Params(params, ())
        return self.render(self._get("refund", refund_id).obj, p.expand())

    def update_refund(
        self, refund_id: str, params: dict[str, Any], ctx: RequestContext
    ) -> dict[str, Any]:
        p = Params(params, REFUND_UPDATE_PARAMS)
        rec = self._get("refund", refund_id)
        refund = rec.obj
        metadata = p.metadata()
        if metadata is not None:
            previous = {"metadata": dict(refund["metadata"])}
            old_key = refund["metadata"].get("refund_id")
            refund["metadata"] = merge_metadata(refund["metadata"], metadata)
            new_key = refund["metadata"].get("refund_id")
            if old_key != new_key:
                if old_key is not None:
                    self.refunds_by_refund_id[old_key].remove(rec)
                if new_key is not None:
                    self.refunds_by_refund_id[new_key].insert(rec)
            self._emit("refund.updated", refund, ctx, previous)
            self._emit("charge.refund.updated", refund, ctx, previous)
        return self.render(refund, p.expand())

    def cancel_refund(
        self, refund_id: str, params: dict[str, Any], ctx: RequestContext
    ) -> dict[str, Any]:
        p = Params(params, ())
        rec = self._get("refund", refund_id)
        refund = rec.obj
        if refund["status"] != "requires_action":
            raise invalid(
                f"Refund {refund_id} has a status of {refund['status']}; only refunds with a "
                "status of "
                "requires_action can be canceled."
            )
        self._set_refund_status(rec, "canceled")
        charge = self.objects[refund["charge"]].obj
        charge["amount_refunded"] -= refund["amount"]
        charge["refunded"] = False
        self._emit("refund.updated", refund, ctx, {"status": "requires_action"})
        return self.render(refund, p.expand())

    def list_refunds(self, params: dict[str, Any]) -> dict[str, Any]:
        allowed = ("charge", "payment_intent")
        if params.get("charge"):
            return self._list(
                self.refunds_by_charge.get(str(params["charge"])),
                params,
                "/v1/refunds",
                allowed=allowed,
            )
        if params.get("payment_intent"):
            return self._list(
                self.refunds_by_pi.get(str(params["payment_intent"])),
                params,
                "/v1/refunds",
                allowed=allowed,
            )
        return self._list(self.lists["refund"], params, "/v1/refunds", allowed=allowed)

    def list_charge_refunds(self, charge_id: str, params: dict[str, Any]) -> dict[str, Any]:
        self._get("charge", charge_id)
        return self._list(
            self.refunds_by_charge.get(charge_id), params, f"/v1/charges/{charge_id}/refunds"
        )

    # ----------------------------------------------------------------- events

    def retrieve_event(self, event_id: str, params: dict[str, Any]) -> dict[str, Any]:
        Params(params, ())
        return self._get("event", event_id).obj

    def list_events(self, params: dict[str, Any]) -> dict[str, Any]:
        allowed = ("type", "types", "delivery_success")
        event_type = params.get("type")
        types = params.get("types")
        if isinstance(types, str):
            types = [types]
        if types is not None and not (
            isinstance(types, list) and all(isinstance(t, str) for t in types)
        ):
            raise param_error("Invalid array", param="types")
        if event_type is not None and not isinstance(event_type, str):
            raise param_error("Invalid string", param="type")
        if event_type and types:
            raise param_error(
                "You may only specify one of these parameters: type, types.",
                code="parameters_exclusive",
                param="types",
            )
        if event_type and "*" not in event_type:
            return self._list(
                self.events_by_type.get(event_type), params, "/v1/events", allowed=allowed
            )
        patterns = [event_type] if event_type else (types or [])
        if not patterns:
            return self._list(self.lists["event"], params, "/v1/events", allowed=allowed)
        regexes = [re.compile("^" + re.escape(t).replace(r"\*", "[^ ]*") + "$") for t in patterns]
        return self._list(
            self.lists["event"],
            params,
            "/v1/events",
            allowed=allowed,
            match=lambda rec: any(rx.match(rec.obj["type"]) for rx in regexes),
        )

    # ------------------------------------------------------------------ admin

    def seed(
        self,
        *,
        count: int,
        amount: int,
        currency: str,
        payment_method: str,
        metadata: dict[str, str] | None = None,
        events: bool = False,
    ) -> dict[str, list[str]]:
        """Create ``count`` succeeded PaymentIntents with their charges, fast.

        No events (and so no webhooks) unless ``events``."""
        card = cards.by_alias(payment_method)
        if card is None:
            raise ValueError(f"unknown test payment method: {payment_method}")
        if card.behavior in (cards.DECLINE, cards.REQUIRES_ACTION):
            raise ValueError(f"{payment_method} does not make a succeeded payment")
        pi_ids: list[str] = []
        charge_ids: list[str] = []
        with self.lock:
            pm_rec = self._new_payment_method(card)
            pm_id = pm_rec.obj["id"]
            for _ in range(count):
                pi = self._payment_intent_obj(
                    amount, currency, "automatic_async", dict(metadata or {}), None, pm_rec
                )
                pi_rec = self._add("payment_intent", pi)
                charge_rec = self._charge(
                    amount=amount,
                    currency=currency,
                    card=card,
                    pm_id=pm_id,
                    pi_id=pi["id"],
                    description=None,
                    metadata=dict(metadata or {}),
                    ctx=None,
                    emit=events,
                )
                pi["status"] = "succeeded"
                pi["amount_received"] = amount
                pi["latest_charge"] = charge_rec.obj["id"]
                if events:
                    self._emit("payment_intent.created", pi, None)
                    self._emit("payment_intent.succeeded", pi, None)
                if card.behavior in (cards.DISPUTE, cards.DISPUTE_INQUIRY):
                    self._maybe_dispute(charge_rec, None)
                pi_ids.append(pi_rec.obj["id"])
                charge_ids.append(charge_rec.obj["id"])
        return {"payment_intents": pi_ids, "charges": charge_ids}

    def admin_refunds(self, refund_id: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            if refund_id is not None:
                index = self.refunds_by_refund_id.get(refund_id)
                recs = index.recs if index else []
            else:
                recs = self.lists["refund"].recs
            return [copy_json(r.obj) for r in recs]

    def admin_move_refund(
        self, refund_id: str, action: str, failure_reason: str | None = None
    ) -> dict[str, Any]:
        with self.lock:
            rec = self._get("refund", refund_id)
            status = rec.obj["status"]
            if action == "succeed":
                if status not in ("pending", "requires_action"):
                    raise invalid(
                        f"Refund {refund_id} is {status}; only a pending refund can succeed."
                    )
                self._succeed_refund(rec, None)
            else:
                if status not in ("pending", "requires_action", "succeeded"):
                    raise invalid(
                        f"Refund {refund_id} is {status}; only a pending or succeeded refund can "
                        "fail."
                    )
                self._fail_refund(rec, failure_reason or "expired_or_canceled_card", None)
            return copy_json(rec.obj)

    def counts(self) -> dict[str, Any]:
        with self.lock:
            return {
                "payment_intents": len(self.lists["payment_intent"]),
                "charges": len(self.lists["charge"]),
                "refunds": len(self.lists["refund"]),
                "refunds_by_status": {k: v for k, v in self.refund_status_counts.items() if v},
                "refunds_by_metadata_refund_id": {
                    k: len(v) for k, v in self.refunds_by_refund_id.items() if len(v)
                },
                "disputes": len(self.lists["dispute"]),
                "events": len(self.lists["event"]),
            }


def _card_details(card: TestCard) -> dict[str, Any]:
    return {
        "brand": card.brand,
        "checks": {
            "address_line1_check": None,
            "address_postal_code_check": None,
            "cvc_check": "pass",
        },
        "country": "US",
        "exp_month": 12,
        "exp_year": 2034,
        "fingerprint": "emu" + card.number[-8:],
        "funding": card.funding,
        "last4": card.last4,
        "network": card.brand,
    }


def _card_from_params(card_data: dict[str, Any], param: str) -> TestCard:
    token = card_data.get("token")
    if isinstance(token, str) and token:
        found = cards.by_alias(token)
        if found is None:
            raise missing("token", token, param=f"{param}[token]")
        return found
    number = card_data.get("number")
    if not isinstance(number, str) or not number:
        raise param_error(
            "Missing required param: card[number].",
            code="parameter_missing",
            param=f"{param}[number]",
        )
    found = cards.by_number(number)
    if found is None:
        raise StripeError(
            402,
            "Your card number is incorrect.",
            type="card_error",
            code="incorrect_number",
            param=f"{param}[number]",
        )
    return found


def _created_bounds(value: Any) -> tuple[int | None, int | None]:
    """``created`` as ``(lowest, highest)`` inclusive bounds."""
    if value is None or value == "":
        return None, None

    def as_int(v: Any, name: str) -> int:
        if not isinstance(v, str) or not re.fullmatch(r"-?\d+", v):
            raise param_error(f"Invalid integer: {v}", code="parameter_invalid_integer", param=name)
        return int(v)

    if isinstance(value, str):
        exact = as_int(value, "created")
        return exact, exact
    if not isinstance(value, dict):
        raise param_error("Invalid hash", param="created")
    lower: int | None = None
    upper: int | None = None
    for op, raw in value.items():
        bound = as_int(raw, f"created[{op}]")
        if op == "gt":
            lower = bound + 1
        elif op == "gte":
            lower = bound
        elif op == "lt":
            upper = bound - 1
        elif op == "lte":
            upper = bound
        else:
            raise param_error(
                f"Received unknown parameter: created[{op}]",
                code="parameter_unknown",
                param=f"created[{op}]",
            )
    return lower, upper
