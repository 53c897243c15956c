"""``POST /v1/admin/refunds`` has two ways in: ``api.initiation_endpoint`` answers a
body sent with a Content-Length in front of Flask, and the Flask view answers one sent
chunked. Both must give the same answer to the same request, error or not."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.api.helpers import REFUNDS
from tests.support import auth, seed_payment

COMPARED_HEADERS = ("content-type", "www-authenticate", "retry-after", "idempotent-replayed")


def _chunked(body: bytes) -> Iterator[bytes]:
    yield body  # a generator: httpx sends it with Transfer-Encoding: chunked


def _both_ways(client: httpx.Client, body: bytes, headers: dict[str, str]) -> list[httpx.Response]:
    return [
        client.post(REFUNDS, content=body, headers=headers),
        client.post(REFUNDS, content=_chunked(body), headers=headers),
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
