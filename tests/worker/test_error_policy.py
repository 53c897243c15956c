"""What a Stripe error means for a refund, and how long to wait before trying again.

Pure rules, on the SDK's real exception classes as it raises them for Stripe's answers."""

from __future__ import annotations

import pytest
import stripe

from shared.adapters.celery_app import MAX_RETRY_COUNTDOWN_SECONDS
from shared.adapters.config import get_settings
from shared.adapters.rate_limit import RateLimited
from shared.adapters.stripe_gateway import ErrorKind, UnexpectedAnswer, classify_error
from shared.services.processing import retry_countdown

T, D, A, K = ErrorKind.TRANSIENT, ErrorKind.DEFINITE, ErrorKind.AUTH, ErrorKind.KEY_CONFLICT


def _stripe_says(cls: type[stripe.StripeError], message: str, status: int, *,
                 error_type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> stripe.StripeError:
    """The error the SDK raises for a Stripe error body (``{"error": {...}}``)."""
    body = {"error": {"type": error_type, "message": message, "code": code, "param": param}}
    kwargs = {"http_status": status, "json_body": body}
    if cls is stripe.CardError:
        return stripe.CardError(message, param, code, **kwargs)
    if cls is stripe.InvalidRequestError:
        return stripe.InvalidRequestError(message, param, code=code, **kwargs)
    return cls(message, code=code, **kwargs)


@pytest.mark.parametrize(
    ("error", "kind", "code"),
    [
        (stripe.APIConnectionError("Network error: ReadTimeout"), T, "connection_error"),
        (stripe.RateLimitError("Too many", http_status=429, code="rate_limit"), T, "rate_limit"),
        (stripe.APIError("An unknown error occurred", http_status=500), T, "http_500"),
        (stripe.APIError("Unavailable", http_status=503), T, "http_503"),
        (_stripe_says(stripe.InvalidRequestError, "in progress", 409,
                      code="idempotency_key_in_use"), T, "idempotency_key_in_use"),
        # Stripe's own lock on the charge timed out: nothing says the refund was not made.
        (_stripe_says(stripe.InvalidRequestError, "lock timeout", 409, code="lock_timeout"),
         T, "lock_timeout"),
        # A request timeout, from Stripe or a proxy in between: unknown.
        (stripe.APIError("Request Timeout", http_status=408), T, "http_408"),
        (_stripe_says(stripe.InvalidRequestError, "timeout", 408), T, "http_408"),
        # A 4xx from something in between (no Stripe error body): unknown, never definite.
        (stripe.InvalidRequestError("<html>Bad Request</html>", None, http_status=400), T,
         "http_400"),
        (stripe.APIError("Not Found", http_status=404), T, "http_404"),
        # A 2xx whose body is not Stripe's JSON: the SDK's "Invalid response body".
        (stripe.APIError("Invalid response body from API", http_status=200), T, "http_200"),
        (UnexpectedAnswer("Stripe's answer did not carry a refund.", http_status=200), T,
         "http_200"),
        (RateLimited(retry_after=0.5), T, "rate_limited"),
        (_stripe_says(stripe.InvalidRequestError,
                      "Refund amount is greater than unrefunded amount", 400,
                      code="amount_too_large", param="amount"), D, "amount_too_large"),
        (_stripe_says(stripe.InvalidRequestError, "Charge ch_1 has already been refunded.", 400,
                      code="charge_already_refunded", param="charge"),
         D, "charge_already_refunded"),
        (_stripe_says(stripe.InvalidRequestError, "No such charge: 'ch_x'", 404,
                      code="resource_missing", param="charge"), D, "resource_missing"),
        (_stripe_says(stripe.CardError, "Your card was declined.", 402, error_type="card_error",
                      code="card_declined"), D, "card_declined"),
        (_stripe_says(stripe.AuthenticationError, "Invalid API Key provided: sk_test_****1234",
                      401), A, "authentication_error"),
        (_stripe_says(stripe.PermissionError, "The provided key does not have access", 403),
         A, "authentication_error"),
        (_stripe_says(stripe.IdempotencyError, "Keys for idempotent requests can only be used "
                      "with the same parameters", 400, error_type="idempotency_error"),
         K, "idempotency_error"),
    ],
)
def test_only_a_4xx_with_a_stripe_error_body_is_definite(
    error: stripe.StripeError, kind: ErrorKind, code: str
) -> None:
    failure = classify_error(error)
    assert (failure.kind, failure.code) == (kind, code)
    assert failure.describe().startswith(f"{code}: ")


def test_retry_after_from_stripe_is_kept() -> None:
    failure = classify_error(stripe.RateLimitError("slow", http_status=429,
                                                   headers={"Retry-After": "2"}))
    assert failure.retry_after == 2.0


def test_backoff_grows_with_jitter_and_never_passes_the_bound() -> None:
    settings = get_settings()  # what retry_countdown reads (a stack may have set them)
    cap = min(settings.retry_max_seconds, MAX_RETRY_COUNTDOWN_SECONDS)
    for retries in range(40):
        ceiling = min(cap, settings.retry_base_seconds * 2**retries)
        samples = [retry_countdown(retries) for _ in range(50)]
        assert all(ceiling / 2 <= s <= ceiling for s in samples), (retries, samples)
        assert len(set(samples)) > 1  # jittered: a herd of retries spreads out
    assert retry_countdown(0, retry_after=cap / 2) >= cap / 2
    assert retry_countdown(0, retry_after=10 * cap) == cap
