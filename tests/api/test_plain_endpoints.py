"""``POST /v1/admin/refunds`` and ``POST /v1/webhooks/stripe`` have two ways in:
``api.plain_endpoints`` answers a body sent with a Content-Length in front of Flask, and
the Flask view answers one sent chunked. Both must give the same answer to the same
request, error or not."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import stripe
from sqlalchemy import text

from tests.api.helpers import REFUNDS
from tests.support import auth, seed_payment

COMPARED_HEADERS = ("content-type", "www-authenticate", "retry-after", "idempotent-replayed")


def _chunked(body: bytes) -> Iterator[bytes]:
    yield body  # a generator: httpx sends it with Transfer-Encoding: chunked


def _both_ways(
    client: httpx.Client, body: bytes, headers: dict[str, str], path: str = REFUNDS
) -> list[httpx.Response]:
    return [
        client.post(path, content=body, headers=headers),
        client.post(path, content=_chunked(body), headers=headers),
    ]


def _answer(response: httpx.Response) -> dict[str, Any]:
    return {
        "status": response.status_code,
        "body": response.json(),
        "headers": {name: response.headers.get(name) for name in COMPARED_HEADERS},
        "request_id": bool(response.headers.get("x-request-id")),
    }


@pytest.fixture
def charge_id(db) -> str:
    _, charge = seed_payment(db, amount=10_000)
    return charge.id


WITH_A_WRITE_TOKEN = ["refunds:write"]
CASES: dict[str, tuple[bytes, list[str] | None]] = {  # body, the token's scopes (None: no token)
    "no token": (b'{"charge_id": "%(charge)s", "amount_cents": 100}', None),
    "read-only token": (b'{"charge_id": "%(charge)s", "amount_cents": 100}', ["refunds:read"]),
    "not JSON": (b"{nope", WITH_A_WRITE_TOKEN),
    "empty body": (b"", WITH_A_WRITE_TOKEN),
    "a field given twice": (
        b'{"charge_id": "%(charge)s", "amount_cents": 1, "amount_cents": 2}', WITH_A_WRITE_TOKEN),
    "unknown charge": (b'{"charge_id": "ch_nobody", "amount_cents": 100}', WITH_A_WRITE_TOKEN),
    "more than was captured": (
        b'{"charge_id": "%(charge)s", "amount_cents": 10001}', WITH_A_WRITE_TOKEN),
    "negative amount": (b'{"charge_id": "%(charge)s", "amount_cents": -5}', WITH_A_WRITE_TOKEN),
    "unknown field": (
        b'{"charge_id": "%(charge)s", "amount_cents": 5, "extra": 1}', WITH_A_WRITE_TOKEN),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_errors_are_the_same_either_way(client, settings, charge_id, case) -> None:
    template, scopes = CASES[case]
    body = template.replace(b"%(charge)s", charge_id.encode())
    headers = {"Content-Type": "application/json"}
    if scopes is not None:
        headers.update(auth(settings, scopes=scopes))
    plain, through_flask = _both_ways(client, body, headers)
    assert plain.status_code >= 400
    assert _answer(plain) == _answer(through_flask)


def test_refunds_and_replays_are_the_same_either_way(client, settings, charge_id) -> None:
    headers = {**auth(settings), "Content-Type": "application/json"}
    body = b'{"charge_id": "%s", "amount_cents": 100}' % charge_id.encode()
    created = _both_ways(client, body, headers)
    assert [r.status_code for r in created] == [201, 201]
    assert [r.headers["location"] for r in created] == [
        f"{REFUNDS}/{r.json()['refund_id']}" for r in created
    ]
    shape = [{k: v for k, v in r.json().items() if k not in ("refund_id", "created_at")}
             for r in created]
    assert shape[0] == shape[1]

    keyed = {**headers, "Idempotency-Key": f"same-either-way-{charge_id}"}
    first = client.post(REFUNDS, content=body, headers=keyed)
    replays = _both_ways(client, body, keyed)
    assert [r.status_code for r in replays] == [201, 201]
    assert [r.json() for r in replays] == [first.json()] * 2
    assert [r.headers.get("idempotent-replayed") for r in replays] == ["true", "true"]

    bad_key = {**headers, "Idempotency-Key": "x" * 300}
    plain, through_flask = _both_ways(client, body, bad_key)
    assert plain.status_code == 422
    assert _answer(plain) == _answer(through_flask)


def test_the_request_id_is_echoed_either_way(client, settings, charge_id) -> None:
    headers = {**auth(settings), "Content-Type": "application/json", "X-Request-Id": "trace-42"}
    body = b'{"charge_id": "%s", "amount_cents": 1}' % charge_id.encode()
    assert [r.headers["x-request-id"] for r in _both_ways(client, body, headers)] == [
        "trace-42", "trace-42"]


# -- POST /v1/webhooks/stripe ------------------------------------------------------------

WEBHOOK = "/v1/webhooks/stripe"


def _event(event_type: str) -> bytes:
    obj: dict[str, Any] = {"id": f"re_{uuid.uuid4().hex[:12]}", "object": "refund"}
    if event_type.startswith("payment_intent."):  # a snapshot the webhook can trust
        obj = {"id": f"pi_{uuid.uuid4().hex[:12]}", "object": "payment_intent",
               "amount": 1000, "currency": "usd", "status": "requires_payment_method",
               "amount_received": 0}
    return json.dumps({
        "id": f"evt_plain_{uuid.uuid4().hex[:16]}", "object": "event", "type": event_type,
        "created": int(time.time()), "data": {"object": obj},
    }).encode()


def _signed(settings, body: bytes) -> dict[str, str]:
    signature = stripe.WebhookSignature.generate_signature_header(
        body.decode(), settings.stripe_webhook_secret)
    return {"Content-Type": "application/json", "Stripe-Signature": signature}


WEBHOOK_ERRORS: dict[str, tuple[bytes, str | None]] = {  # body, signature (None: signed)
    "no signature": (b'{"id": "evt_1"}', ""),
    "a wrong signature": (b'{"id": "evt_1"}', "t=1,v1=00"),
    "not JSON": (b"{nope", None),
    "not an event": (b'{"id": "evt_1", "type": "refund.updated"}', None),
}


@pytest.mark.parametrize("case", sorted(WEBHOOK_ERRORS))
def test_webhook_errors_are_the_same_either_way(client, settings, case) -> None:
    body, signature = WEBHOOK_ERRORS[case]
    headers = _signed(settings, body)
    if signature is not None:
        headers["Stripe-Signature"] = signature
    if not signature:
        del headers["Stripe-Signature"]
    plain, through_flask = _both_ways(client, body, headers, WEBHOOK)
    assert plain.status_code == 400
    assert _answer(plain) == _answer(through_flask)


@pytest.mark.parametrize(("event_type", "outcome"), [
    ("refund.updated", "deferred"),  # stored for a worker, in one statement
    ("customer.created", "ignored"),  # no handler: stored as applied
    ("payment_intent.created", "processed"),  # applied in the webhook's transaction
])
def test_webhook_answers_are_the_same_either_way(
    client, settings, db, log_dir, event_type, outcome
) -> None:
    bodies = [_event(event_type) for _ in range(2)]
    plain = client.post(WEBHOOK, content=bodies[0], headers=_signed(settings, bodies[0]))
    through_flask = client.post(
        WEBHOOK, content=_chunked(bodies[1]), headers=_signed(settings, bodies[1]))
    assert _answer(plain) == _answer(through_flask)
    assert plain.json() == {"received": True, "outcome": outcome}
    # Each stored once: the next delivery of either is a duplicate, either way.
    again = [client.post(WEBHOOK, content=body, headers=_signed(settings, body)) for body in bodies]
    again += [client.post(WEBHOOK, content=_chunked(body), headers=_signed(settings, body))
              for body in bodies]
    assert [r.json()["outcome"] for r in again] == ["duplicate"] * 4
    stored = db.execute(
        text("SELECT type, applied_at IS NOT NULL FROM stripe_events WHERE id = ANY(:ids)"),
        {"ids": [json.loads(body)["id"] for body in bodies]},
    ).all()
    assert sorted(stored) == [(event_type, outcome != "deferred")] * 2
    # One log line a delivery, either way: the access line names the event and what became
    # of it (no second line from the service).
    for body in bodies:
        event_id = json.loads(body)["id"]
        lines = [json.loads(line) for path in log_dir.glob("web-*.log")
                 for line in path.read_text().splitlines() if event_id in line]
        assert [(line["logger"], line["route"], line["status"], line["event_type"],
                 line["outcome"]) for line in lines] == (
            [("api.access", WEBHOOK, 200, event_type, outcome)]
            + [("api.access", WEBHOOK, 200, event_type, "duplicate")] * 2
        ), lines
