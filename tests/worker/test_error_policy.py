"""What a Stripe error means for a refund, and how long to wait before trying again.

Pure rules, on the SDK's real exception classes as it raises them for Stripe's answers."""

from __future__ import annotations

import pytest
import stripe

from shared.celery_app import MAX_RETRY_COUNTDOWN_SECONDS
from shared.config import Settings
from shared.processing import retry_countdown
from shared.rate_limit import RateLimited
from shared.stripe_gateway import ErrorKind, classify_error

T, D, A, K = ErrorKind.TRANSIENT, ErrorKind.DEFINITE, ErrorKind.AUTH, ErrorKind.KEY_CONFLICT


@pytest.mark.parametrize(
    ("error", "kind", "code"),
    [
        (stripe.APIConnectionError("Network error: ReadTimeout"), T, "connection_error"),
        (stripe.RateLimitError("Too many", http_status=429, code="rate_limit"), T, "rate_limit"),
        (stripe.APIError("An unknown error occurred", http_status=500), T, "http_500"),
        (stripe.APIError("Unavailable", http_status=503), T, "http_503"),
        (stripe.InvalidRequestError("in progress", None, code="idempotency_key_in_use",
                                    http_status=409), T, "idempotency_key_in_use"),
        (RateLimited(retry_after=0.5), T, "rate_limited"),
        (stripe.InvalidRequestError("Refund amount is greater than unrefunded amount", "amount",
                                    code="amount_too_large", http_status=400),
         D, "amount_too_large"),
        (stripe.InvalidRequestError("Charge ch_1 has already been refunded.", "charge",
                                    code="charge_already_refunded", http_status=400),
         D, "charge_already_refunded"),
        (stripe.InvalidRequestError("No such charge: 'ch_x'", "charge",
                                    code="resource_missing", http_status=404),
         D, "resource_missing"),
        (stripe.CardError("Your card was declined.", None, "card_declined", http_status=402),
         D, "card_declined"),
        (stripe.AuthenticationError("Invalid API Key provided: sk_test_****1234",
                                    http_status=401), A, "authentication_error"),
        (stripe.PermissionError("The provided key does not have access", http_status=403),
         A, "authentication_error"),
        (stripe.IdempotencyError("Keys for idempotent requests can only be used with the same "
                                 "parameters", http_status=400), K, "idempotency_error"),
    ],
)
def test_only_a_definite_stripe_answer_can_fail_a_refund(
    error: stripe.StripeError, kind: ErrorKind, code: str
) -> None:
    failure = classify_error(error)
    assert (failure.kind, failure.code) == (kind, code)
    assert failure.describe().startswith(f"{code}: ")


def test_retry_after_from_stripe_is_kept() -> None:
    failure = classify_error(stripe.RateLimitError("slow", http_status=429,
                                                   headers={"Retry-After": "2"}))
    assert failure.retry_after == 2.0


def test_backoff_grows_with_jitter_and_never_passes_the_bound(settings: Settings) -> None:
    cap = min(settings.retry_max_seconds, MAX_RETRY_COUNTDOWN_SECONDS)
    for retries in range(40):
        ceiling = min(cap, settings.retry_base_seconds * 2**retries)
        samples = [retry_countdown(retries) for _ in range(50)]
        assert all(ceiling / 2 <= s <= ceiling for s in samples), (retries, samples)
        assert len(set(samples)) > 1  # jittered: a herd of retries spreads out
    assert retry_countdown(0, retry_after=cap / 2) >= cap / 2
    assert retry_countdown(0, retry_after=10 * cap) == cap
