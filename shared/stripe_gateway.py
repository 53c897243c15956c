"""The one adapter to Stripe. Real Stripe by default; the project's emulator when
STRIPE_API_BASE points at it. Everything else talks to Stripe through this class."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import stripe

from shared.config import Settings, get_settings

# Stripe sends these as `reason`; any other text travels in metadata only.
STRIPE_REFUND_REASONS = frozenset({"duplicate", "fraudulent", "requested_by_customer"})
PAGE_SIZE = 100


class StripeGateway:
    def __init__(self, settings: Settings) -> None:
        base = {"api": settings.stripe_api_base} if settings.stripe_api_base else None
        self._client = stripe.StripeClient(
            settings.stripe_api_key,
            base_addresses=base,  # type: ignore[arg-type]
            # Retries are the worker's decision (SPEC 6), never hidden in the SDK.
            max_network_retries=0,
            http_client=stripe.RequestsClient(timeout=settings.stripe_timeout_seconds),
        )

    # Refunds -----------------------------------------------------------------

    def create_refund(
        self,
        *,
        refund_id: str,
        idempotency_key: str,
        amount: int,
        charge_id: str | None,
        payment_intent_id: str | None,
        reason: str | None,
    ) -> stripe.Refund:
        """Create the Stripe refund for our refund. The same arguments on every attempt."""
        params: dict[str, Any] = {"amount": amount, "metadata": {"refund_id": refund_id}}
        if charge_id is not None:
            params["charge"] = charge_id
        else:
            params["payment_intent"] = payment_intent_id
        if reason in STRIPE_REFUND_REASONS:
            params["reason"] = reason
        elif reason:
            params["metadata"]["reason"] = reason[:500]
        return self._client.v1.refunds.create(params, {"idempotency_key": idempotency_key})  # type: ignore[arg-type]

    def retrieve_refund(self, stripe_refund_id: str) -> stripe.Refund:
        return self._client.v1.refunds.retrieve(stripe_refund_id)

    def iter_refunds(
        self, *, charge_id: str | None = None, payment_intent_id: str | None = None
    ) -> Iterator[stripe.Refund]:
        params: dict[str, Any] = {"limit": PAGE_SIZE}
        if charge_id is not None:
            params["charge"] = charge_id
        elif payment_intent_id is not None:
            params["payment_intent"] = payment_intent_id
        return self._client.v1.refunds.list(params).auto_paging_iter()  # type: ignore[arg-type]

    def find_refund(
        self, *, refund_id: str, charge_id: str | None, payment_intent_id: str | None
    ) -> stripe.Refund | None:
        """The Stripe refund whose ``metadata.refund_id`` is ours, if Stripe has one."""
        for refund in self.iter_refunds(charge_id=charge_id, payment_intent_id=payment_intent_id):
            if (refund.metadata or {}).get("refund_id") == refund_id:
                return refund
        return None

    # Payments in -------------------------------------------------------------

    def iter_payment_intents(self) -> Iterator[stripe.PaymentIntent]:
        return self._client.v1.payment_intents.list({"limit": PAGE_SIZE}).auto_paging_iter()

    def iter_charges(self) -> Iterator[stripe.Charge]:
        return self._client.v1.charges.list({"limit": PAGE_SIZE}).auto_paging_iter()

    def retrieve_charge(self, charge_id: str) -> stripe.Charge:
        return self._client.v1.charges.retrieve(charge_id)

    def retrieve_payment_intent(self, payment_intent_id: str) -> stripe.PaymentIntent:
        return self._client.v1.payment_intents.retrieve(payment_intent_id)


@functools.cache
def get_gateway() -> StripeGateway:
    return StripeGateway(get_settings())
