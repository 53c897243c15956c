"""Forged Stripe webhooks beyond tests/payments/test_webhooks.py (which covers a wrong
secret, a missing or garbled header, a body changed after signing, and a signature
older than five minutes): the other schemes Stripe's header can carry, the wrong one
of our secrets, a captured delivery replayed with a fresh timestamp, a header stuffed
with guesses. Each is a 400 ``invalid_signature`` that changes nothing and repeats
neither the signature nor a secret.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid

import httpx
import pytest

from tests.support import table_counts

WEBHOOK = "/v1/webhooks/stripe"


def event_body() -> bytes:
    return json.dumps({
        "id": f"evt_forged_{uuid.uuid4().hex[:16]}", "object": "event", "type":
        "charge.refunded", "created": int(time.time()), "livemode": False,
        "data": {"object": {"id": f"ch_forged_{uuid.uuid4().hex[:12]}", "object": "charge",
                            "amount": 5000, "amount_refunded": 5000, "currency": "usd",
                            "status": "succeeded", "refunded": True}},
    }).encode()


def mac(secret: str, timestamp: int, payload: bytes) -> str:
    signed = f"{timestamp}.".encode() + payload
    return hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def forged_headers(settings, payload: bytes) -> dict[str, str]:
    now = int(time.time())
    secret, api_key = settings.stripe_webhook_secret, settings.stripe_api_key
    captured_at = now - 600
    return {
        "v0 scheme only": f"t={now},v0={mac(secret, now, payload)}",
        "signed with the Stripe API key": f"t={now},v1={mac(api_key, now, payload)}",
        "signed with the JWT secret": f"t={now},v1={mac(settings.jwt_secret, now, payload)}",
        "captured signature, timestamp moved to now": (
            f"t={now},v1={mac(secret, captured_at, payload)}"),
        "two timestamps, the fresh one unsigned": (
            f"t={captured_at},t={now},v1={mac(secret, captured_at, payload)}"),
        "a hundred guesses": f"t={now}," + ",".join(
            f"v1={hashlib.sha256(str(i).encode()).hexdigest()}" for i in range(100)),
        "signature of an empty body": f"t={now},v1={mac(secret, now, b'')}",
        "secret itself as the signature": f"t={now},v1={secret}",
    }


@pytest.mark.parametrize(
    "case",
    ["v0 scheme only", "signed with the Stripe API key", "signed with the JWT secret",
     "captured signature, timestamp moved to now", "two timestamps, the fresh one unsigned",
     "a hundred guesses", "signature of an empty body", "secret itself as the signature"],
)
def test_forged_webhook_signatures_are_400_and_change_nothing(api_url, settings, db, case) -> None:
    payload = event_body()
    signature = forged_headers(settings, payload)[case]
    before = table_counts(db)
    resp = httpx.post(f"{api_url}{WEBHOOK}", content=payload, timeout=10,
                      headers={"Content-Type": "application/json", "Stripe-Signature": signature})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"] == "invalid_signature"
    for secret in (settings.stripe_webhook_secret, settings.stripe_api_key, settings.jwt_secret):
        assert secret not in resp.text
    assert "v1=" not in resp.text and "v0=" not in resp.text
    assert table_counts(db) == before


def test_the_genuine_signature_of_the_same_body_is_accepted(api_url, settings) -> None:
    """The forgeries above fail on their signature alone, not on the body."""
    payload, now = event_body(), int(time.time())
    resp = httpx.post(f"{api_url}{WEBHOOK}", content=payload, timeout=10, headers={
        "Content-Type": "application/json",
        "Stripe-Signature": f"t={now},v1={mac(settings.stripe_webhook_secret, now, payload)}"})
    assert resp.status_code in (200, 503), resp.text  # 503: no Stripe behind this server
    assert resp.json().get("error") != "invalid_signature"
