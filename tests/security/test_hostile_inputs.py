"""Hostile input over real HTTP (SPEC 3): SQL-looking and unicode ids, megabyte strings,
JSON that parsers disagree on, bodies over the limit however they are sent. Each is a
clean JSON 4xx (never a 500, never an echo of a megabyte), writes nothing, and leaves
every table as it was.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from urllib.parse import quote

import httpx
import pytest

from tests.api.helpers import REFUNDS, assert_error
from tests.security.helpers import raw_exchange
from tests.support import auth, seed_payment, table_counts

MEGABYTE = "A" * 1_048_576
HOSTILE_IDS = [
    "ch_1' OR '1'='1",
    "'; DROP TABLE refunds; --",
    "ch_1\"; DELETE FROM payments WHERE \"1\"=\"1",
    "ch_1) UNION SELECT id, amount FROM payments --",
    "%' OR id LIKE '%",
    "ch_\u202e1\u202d",  # right-to-left override
    "ch_\U0001f4b8\U0001f4b8",
    "\u0441h_cyrillic_look_alike",
    "ch_1\\x00",
    "../../etc/passwd",
    "${jndi:ldap://127.0.0.1/x}",
    "{{7*7}}",
]


@pytest.fixture
def client(api_url: str, settings) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api_url, timeout=30, headers=auth(settings)) as c:
        yield c


@pytest.mark.parametrize("hostile", HOSTILE_IDS)
def test_sql_and_unicode_ids_are_not_found_and_write_nothing(client, db, hostile) -> None:
    seed_payment(db, amount=1000)
    before = table_counts(db)

    created = client.post(REFUNDS, json={"charge_id": hostile, "full": True})
    one = client.get(f"{REFUNDS}/{quote(hostile, safe='')}")
    listed = client.get(REFUNDS, params={"charge_id": hostile, "payment_id": hostile,
                                         "initiated_by": hostile})

    assert_error(created, 404, "not_found")
    assert_error(one, 404, "not_found")
    assert listed.status_code == 200 and listed.json()["data"] == [], listed.text
    assert table_counts(db) == before  # every table still there, nothing added


@pytest.mark.parametrize(
    "body",
    [
        {"charge_id": MEGABYTE, "full": True},
        {"charge_id": "ch_x", "amount_cents": 100, "reason": MEGABYTE},
        {"charge_id": "ch_x", "full": True, MEGABYTE[:100_000]: 1},
    ],
    ids=["1 MB charge id", "1 MB reason", "100 kB field name"],
)
def test_megabyte_bodies_are_413_and_not_read_into_an_error(client, db, body) -> None:
    before = table_counts(db)
    resp = client.post(REFUNDS, json=body)
    assert_error(resp, 413, "request_too_large")
    assert len(resp.content) < 1_000
    assert table_counts(db) == before


@pytest.mark.parametrize("path", [REFUNDS, "/v1/webhooks/stripe"])
@pytest.mark.parametrize("padding", [b"B", b" "], ids=["inside a string", "whitespace"])
def test_a_chunked_body_over_the_limit_is_413_not_parsed_truncated(
    client, db, path, padding
) -> None:
    """No Content-Length to check up front: the limit holds while the body streams in,
    and a body cut at the limit is never parsed (cut in trailing whitespace, it would
    even be valid JSON)."""
    _, charge = seed_payment(db, amount=1000)
    before = table_counts(db)
    head = f'{{"charge_id": "{charge.id}", "full": true}}'.encode()
    if padding == b"B":
        head = b'{"charge_id": "'

    def chunks() -> Iterator[bytes]:
        yield head
        for _ in range(64):
            yield padding * 16_384
        if padding == b"B":
            yield b'", "full": true}'

    resp = client.post(path, content=chunks(), headers={"Content-Type": "application/json"})
    assert_error(resp, 413, "request_too_large")
    assert table_counts(db) == before


@pytest.mark.parametrize(
    ("where", "status", "code"),
    [("query", 414, "uri_too_long"), ("path", 414, "uri_too_long"),
     ("Idempotency-Key", 431, "headers_too_large"), ("X-Request-Id", 431, "headers_too_large")],
)
def test_megabyte_urls_and_headers_are_refused_before_the_app(
    api_url, settings, db, where, status, code
) -> None:
    _, charge = seed_payment(db, amount=1000)
    before = table_counts(db)
    target, headers = REFUNDS, auth(settings)
    if where == "query":
        target += f"?charge_id={MEGABYTE}"
    elif where == "path":
        target += f"/{MEGABYTE}"
    else:
        headers[where] = MEGABYTE
    body = json.dumps({"charge_id": charge.id, "full": True}).encode()
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    got, answer_headers, answer = raw_exchange(
        api_url,
        f"POST {target} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{head}\r\n".encode() + body,
    )
    assert got == status, answer[:300]
    assert answer_headers["content-type"].startswith("application/json")
    assert json.loads(answer)["error"] == code and len(answer) < 1_000
    assert table_counts(db) == before


@pytest.mark.parametrize(
    "raw",
    [
        b'{"charge_id": "CHARGE", "amount_cents": NaN}',
        b'{"charge_id": "CHARGE", "amount_cents": Infinity}',
        b'{"charge_id": "CHARGE", "amount_cents": 1e400}',
        b'{"charge_id": "CHARGE", "amount_cents": -0}',
        b'{"charge_id": "CHARGE", "amount_cents": 9007199254740993}',
        b'{"charge_id": "CHARGE", "amount_cents": 99999999999999999999999999999999999}',
        b'{"charge_id": "CHARGE", "amount_cents": "100"}',
        b'{"charge_id": "CHARGE", "amount_cents": 100.0}',
        b'{"charge_id": "CHARGE", "full": "true"}',
        b'{"charge_id": "CHARGE", "full": 1}',
        b'{"charge_id": ["CHARGE"], "full": true}',
        b'{"charge_id": {"$ne": null}, "full": true}',
        b'{"charge_id": "CHARGE\\u0000", "full": true}',
        b'{"charge_id": "CHARGE", "full": true, "reason": "\\ud800"}',
        b'\xef\xbb\xbf{"charge_id": "CHARGE", "full": true}',
        '{"charge_id": "CHARGE", "full": true}'.encode("utf-16"),
        b'{"charge_id": "CHARGE", "full": true',
        b"[" * 20_000 + b"]" * 20_000,
        b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
        b"",
        b"null",
    ],
    ids=["NaN", "Infinity", "1e400", "minus zero", "2^53+1", "huge integer", "string amount",
         "float amount", "string boolean", "number boolean", "list id", "operator object",
         "NUL in id", "lone surrogate", "byte order mark", "UTF-16", "truncated",
         "deeply nested list", "deeply nested object", "empty", "null"],
)
def test_json_that_parsers_disagree_on_is_422_and_writes_nothing(client, db, raw) -> None:
    _, charge = seed_payment(db, amount=10_000)
    before = table_counts(db)
    resp = client.post(REFUNDS, content=raw.replace(b"CHARGE", charge.id.encode()),
                       headers={"Content-Type": "application/json"})
    assert_error(resp, 422, "validation_error")
    assert table_counts(db) == before


def test_a_field_given_twice_is_refused_not_taken_from_either_copy(client, db) -> None:
    """``{"amount_cents": 1, "amount_cents": 9000}``: parsers disagree on which copy wins,
    so a proxy, a log or a person reading the body could see another refund than the
    one made."""
    _, charge = seed_payment(db, amount=10_000)
    before = table_counts(db)
    raw = f'{{"charge_id": "{charge.id}", "amount_cents": 1, "amount_cents": 9000}}'
    resp = client.post(REFUNDS, content=raw, headers={"Content-Type": "application/json"})
    assert_error(resp, 422, "validation_error")
    assert table_counts(db) == before
