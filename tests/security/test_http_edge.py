"""Requests refused at the HTTP edge, before the application sees them, are answered
like every other error (SPEC 3): JSON ``{"error", "message"}`` with a request id,
never gunicorn's HTML page, never an echo of what was sent; and nothing is written.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.api.helpers import REFUNDS, Contract
from tests.security.helpers import raw_exchange
from tests.support import auth, seed_payment, table_counts

LONG = "x" * 10_000


@pytest.fixture(scope="module")
def contract(api_url: str) -> Contract:
    return Contract(httpx.get(f"{api_url}/openapi.json", timeout=10).json())


def assert_json_error(status: int, headers: dict[str, str], body: bytes, expected: int,
                      code: str) -> None:
    assert status == expected, body[:300]
    assert headers["content-type"].startswith("application/json"), body[:300]
    data = json.loads(body)
    assert set(data) == {"error", "message"} and data["error"] == code, data
    assert data["message"] and LONG[:50] not in data["message"]
    assert headers.get("x-request-id")


@pytest.mark.parametrize(
    ("method", "path", "template"),
    [
        ("GET", f"{REFUNDS}?charge_id={LONG}", REFUNDS),
        ("GET", f"{REFUNDS}/{LONG}", f"{REFUNDS}/{{refund_id}}"),
        ("POST", f"{REFUNDS}?{LONG}", REFUNDS),
    ],
    ids=["long query", "long refund id", "long url on create"],
)
def test_a_url_over_the_limit_is_a_json_414_and_writes_nothing(
    api_url, settings, db, contract, method, path, template
) -> None:
    _, charge = seed_payment(db, amount=1000)
    before = table_counts(db)
    resp = httpx.request(method, f"{api_url}{path}", headers=auth(settings), timeout=10,
                         json={"charge_id": charge.id, "full": True} if method == "POST" else None)
    assert_json_error(resp.status_code, dict(resp.headers), resp.content, 414, "uri_too_long")
    contract.check(resp, method, template)
    assert table_counts(db) == before


@pytest.mark.parametrize(
    "headers",
    [{"X-Padding": "y" * 20_000}, {f"X-Header-{i}": "z" for i in range(150)}],
    ids=["one huge header", "too many headers"],
)
def test_headers_over_the_limit_are_a_json_431_and_write_nothing(
    api_url, settings, db, contract, headers
) -> None:
    _, charge = seed_payment(db, amount=1000)
    before = table_counts(db)
    resp = httpx.post(f"{api_url}{REFUNDS}", json={"charge_id": charge.id, "full": True},
                      headers={**auth(settings), **headers}, timeout=10)
    assert_json_error(resp.status_code, dict(resp.headers), resp.content, 431,
                      "headers_too_large")
    contract.check(resp, "POST", REFUNDS)
    assert table_counts(db) == before


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n",
        b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n",
        b"POST /v1/admin/refunds HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        b"Content-Length: 7\r\n\r\n{}{}{}{",
    ],
    ids=["not http", "space in a header name", "unknown http version", "two content lengths"],
)
def test_a_malformed_request_is_a_json_400(api_url, request_bytes) -> None:
    status, headers, body = raw_exchange(api_url, request_bytes)
    assert_json_error(status, headers, body, 400, "bad_request")
    assert b"GARBAGE" not in body and b"Bad Header" not in body
