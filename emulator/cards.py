"""Stripe's test cards, as the emulator understands them.

A card can be named three ways, as on Stripe: a test PaymentMethod id
(``pm_card_visa``), a test token for ``POST /v1/charges`` (``tok_visa``) or a
card number given as ``payment_method_data[card][number]`` /
``card[number]`` when creating a PaymentMethod. All three lead to the same
``TestCard``, whose ``behavior`` decides what a charge and its refunds do.
"""

from __future__ import annotations

from dataclasses import dataclass

# What a card does when charged and refunded.
SUCCEED = "succeed"  # the charge succeeds, refunds succeed at once
DECLINE = "decline"  # the charge is declined (402 card_error)
DISPUTE = "dispute"  # the charge succeeds, then is disputed (fraudulent)
DISPUTE_INQUIRY = "dispute_inquiry"  # the charge succeeds, then an inquiry opens
PENDING_REFUND = "pending_refund"  # refunds are pending, then succeed
REFUND_FAIL = "refund_fail"  # refunds succeed, then fail asynchronously
REQUIRES_ACTION = "requires_action"  # 3-D Secure is required


@dataclass(frozen=True)
class TestCard:
    number: str
    brand: str
    behavior: str = SUCCEED
    funding: str = "credit"
    decline_code: str | None = None  # for DECLINE
    error_code: str = "card_declined"  # for DECLINE
    message: str = "Your card was declined."  # for DECLINE
    dispute_reason: str = "fraudulent"  # for DISPUTE*

    @property
    def last4(self) -> str:
        return self.number[-4:]


def _declined(
    number: str, decline_code: str, message: str, code: str = "card_declined"
) -> TestCard:
    return TestCard(
        number=number,
        brand="visa",
        behavior=DECLINE,
        decline_code=decline_code,
        error_code=code,
        message=message,
    )


# Names are the part after ``pm_card_`` / ``tok_``.
CARDS: dict[str, TestCard] = {
    "visa": TestCard("4242424242424242", "visa"),
    "visa_debit": TestCard("4000056655665556", "visa", funding="debit"),
    "mastercard": TestCard("5555555555554444", "mastercard"),
    "amex": TestCard("378282246310005", "amex"),
    "bypassPending": TestCard("4000000000000077", "visa"),
    "chargeDeclined": _declined("4000000000000002", "generic_decline", "Your card was declined."),
    "chargeDeclinedInsufficientFunds": _declined(
        "4000000000009995", "insufficient_funds", "Your card has insufficient funds."
    ),
    "chargeDeclinedLostCard": _declined("4000000000009987", "lost_card", "Your card was declined."),
    "chargeDeclinedStolenCard": _declined(
        "4000000000009979", "stolen_card", "Your card was declined."
    ),
    "chargeDeclinedExpiredCard": _declined(
        "4000000000000069", "expired_card", "Your card has expired.", code="expired_card"
    ),
    "chargeDeclinedIncorrectCvc": _declined(
        "4000000000000127",
        "incorrect_cvc",
        "Your card's security code is incorrect.",
        code="incorrect_cvc",
    ),
    "chargeDeclinedProcessingError": _declined(
        "4000000000000119",
        "processing_error",
        "An error occurred while processing your card. Try again in a little bit.",
        code="processing_error",
    ),
    "createDispute": TestCard("4000000000000259", "visa", behavior=DISPUTE),
    "createDisputeProductNotReceived": TestCard(
        "4000000000002685", "visa", behavior=DISPUTE, dispute_reason="product_not_received"
    ),
    "createDisputeInquiry": TestCard("4000000000001976", "visa", behavior=DISPUTE_INQUIRY),
    "pendingRefund": TestCard("4000000000007726", "visa", behavior=PENDING_REFUND),
    "refundFail": TestCard("4000000000005126", "visa", behavior=REFUND_FAIL),
    "authenticationRequired": TestCard("4000002760003184", "visa", behavior=REQUIRES_ACTION),
}

_BY_NUMBER: dict[str, TestCard] = {card.number: card for card in CARDS.values()}


def by_alias(value: str) -> TestCard | None:
    """The card for ``pm_card_<name>`` or ``tok_<name>``, else None."""
    for prefix in ("pm_card_", "tok_"):
        if value.startswith(prefix):
            return CARDS.get(value[len(prefix) :])
    return None


def by_number(number: str) -> TestCard | None:
    """The card for a test card number; any other Luhn-valid-looking number succeeds like a Visa."""
    digits = "".join(ch for ch in str(number) if ch.isdigit())
    if not digits:
        return None
    card = _BY_NUMBER.get(digits)
    if card is not None:
        return card
    if 12 <= len(digits) <= 19 and _luhn_ok(digits):
        return TestCard(digits, "visa" if digits.startswith("4") else "unknown")
    return None


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def accepted_payment_method_ids() -> list[str]:
    return ["pm_card_" + name for name in CARDS]


def accepted_tokens() -> list[str]:
    return ["tok_" + name for name in CARDS]
