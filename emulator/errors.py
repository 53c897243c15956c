"""Stripe-shaped API errors."""

from __future__ import annotations

from typing import Any

DOC_BASE = "https://docs.stripe.com/error-codes/"


class StripeError(Exception):
    """An error answered as ``{"error": {...}}`` with Stripe's HTTP status.

    ``saved`` says whether the idempotency layer stores the answer. Stripe saves
    the result of any request whose endpoint began executing (a card decline, an
    ``amount_too_large``), but not of one rejected while its parameters were
    validated, so a corrected retry with the same key can still go through.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        saved: bool = True,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.saved = saved
        self.headers = headers or {}
        self.extra = extra

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"type": self.type, "code": self.code, "message": self.message}
        if self.param is not None:
            error["param"] = self.param
        if self.code:
            error["doc_url"] = DOC_BASE + self.code.replace("_", "-")
        error.update(self.extra)
        return {"error": error}


def invalid(
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    status: int = 400,
    **extra: Any,
) -> StripeError:
    """A request the endpoint refused after it began executing (saved for idempotency)."""
    return StripeError(status, message, code=code, param=param, **extra)


def param_error(message: str, *, code: str | None = None, param: str | None = None) -> StripeError:
    """A parameter that failed validation (not saved for idempotency)."""
    return StripeError(400, message, code=code, param=param, saved=False)


def missing(kind: str, object_id: str, *, param: str | None = None) -> StripeError:
    return StripeError(404, f"No such {kind}: '{object_id}'", code="resource_missing", param=param)
