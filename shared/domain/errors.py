"""The domain's small exception tree. Each carries a machine code; the HTTP edge
(``api/errors.py``) maps codes to statuses and the ``{"error","message"}`` body."""

from __future__ import annotations


class RefundServiceError(Exception):
    code = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(RefundServiceError):
    code = "not_found"


class PaymentNotSucceeded(RefundServiceError):
    code = "payment_not_succeeded"


class ChargeDisputed(RefundServiceError):
    code = "charge_disputed"


class AlreadyRefunded(RefundServiceError):
    code = "already_refunded"


class AmountExceedsRefundable(RefundServiceError):
    code = "amount_exceeds_refundable"

    def __init__(self, *, requested: int, left: int, currency: str) -> None:
        super().__init__(
            f"amount_cents {requested} is larger than what is left to refund on this payment: "
            f"{left} ({currency}). Ask for at most {left}, or use \"full\": true."
        )
        self.left = left


class IdempotencyKeyReused(RefundServiceError):
    code = "idempotency_key_reused"


class SelfApproval(RefundServiceError):
    code = "self_approval"


class NotAwaitingApproval(RefundServiceError):
    code = "not_awaiting_approval"


class CannotCancel(RefundServiceError):
    code = "cannot_cancel"


class OutcomeUnknown(RefundServiceError):
    """The connection broke while COMMIT was on its way: the change may or may not have
    been recorded (SPEC 3.4). Never to be reported as "nothing was recorded"."""

    code = "outcome_unknown"
