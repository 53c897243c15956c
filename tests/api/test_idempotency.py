"""Idempotency-Key over real HTTP (SPEC 3.4): replays, reuse, scope, races."""

from __future__ import annotations

import uuid

import httpx
import pytest
from sqlalchemy import select

from shared.domain.models import IdempotencyRecord
from tests.api.helpers import REFUNDS, all_at_once, assert_error, refund_count
from tests.support import auth, seed_payment, table_counts


def post(
    client: httpx.Client, settings, body: dict, key: str | bytes, sub: str = "ops@example.com"
) -> httpx.Response:
    return client.post(
        REFUNDS, json=body, headers={**auth(settings, sub=sub), "Idempotency-Key": key}
    )


def new_key() -> str:
    return f"key-{uuid.uuid4()}"


def test_replay_answers_the_same_status_and_body_and_creates_nothing(
    client, settings, db, contract
) -> None:
    payment, charge = seed_payment(db, amount=5000)
    body = {"charge_id": charge.id, "amount_cents": 700, "reason": "duplicate"}
    key = new_key()

    first = post(client, settings, body, key)
    assert first.status_code == 201, first.text
    assert "Idempotent-Replayed" not in first.headers
    before = table_counts(db)

    for _ in range(2):
        again = post(client, settings, body, key)
        assert again.status_code == 201
        assert again.content == first.content  # byte for byte, key order included
        assert again.headers["Idempotent-Replayed"] == "true"
        assert again.headers["Location"] == first.headers["Location"]
        contract.check(again, "POST", REFUNDS)
    assert table_counts(db) == before
    assert refund_count(db, payment.id) == 1


def test_same_key_with_another_body_is_422_and_writes_nothing(client, settings, db) -> None:
    _, charge = seed_payment(db, amount=5000)
    key = new_key()
    assert (
        post(client, settings, {"charge_id": charge.id, "amount_cents": 100}, key).status_code
        == 201
    )
    before = table_counts(db)

    changed = post(client, settings, {"charge_id": charge.id, "amount_cents": 101}, key)

    assert_error(changed, 422, "idempotency_key_reused")
    assert table_counts(db) == before


def test_key_reuse_is_reported_before_a_missing_charge(client, settings, db) -> None:
    """SPEC 3.1 order: the key check (4) comes before the charge lookup (5)."""
    _, charge = seed_payment(db, amount=5000)
    key = new_key()
    assert post(client, settings, {"charge_id": charge.id, "full": True}, key).status_code == 201
    resp = post(client, settings, {"charge_id": "ch_does_not_exist", "full": True}, key)
    assert_error(resp, 422, "idempotency_key_reused")


def test_invalid_body_is_validation_error_even_with_a_used_key(client, settings, db) -> None:
    _, charge = seed_payment(db, amount=5000)
    key = new_key()
    assert post(client, settings, {"charge_id": charge.id, "full": True}, key).status_code == 201
    assert_error(post(client, settings, {"charge_id": charge.id}, key), 422, "validation_error")


def test_key_is_scoped_to_the_callers_sub(client, settings, db) -> None:
    payment, charge = seed_payment(db, amount=5000)
    body = {"charge_id": charge.id, "amount_cents": 250}
    key = new_key()

    alice = post(client, settings, body, key, sub="alice@example.com")
    bob = post(client, settings, body, key, sub="bob@example.com")

    assert alice.status_code == bob.status_code == 201
    assert "Idempotent-Replayed" not in bob.headers
    assert alice.json()["refund_id"] != bob.json()["refund_id"]
    assert refund_count(db, payment.id) == 2
    # And bob may send another body under the same key without tripping alice's record.
    other = post(client, settings, {"charge_id": charge.id, "amount_cents": 1}, new_key(), "bob")
    assert other.status_code == 201


def test_concurrent_requests_with_one_key_make_one_refund(api_url, settings, db) -> None:
    payment, charge = seed_payment(db, amount=5000)
    body = {"charge_id": charge.id, "amount_cents": 900}
    headers = {**auth(settings), "Idempotency-Key": new_key()}

    def send(_: int) -> httpx.Response:
        with httpx.Client(base_url=api_url, timeout=30) as c:
            return c.post(REFUNDS, json=body, headers=headers)

    answers = all_at_once(8, send)

    assert [r.status_code for r in answers] == [201] * 8, [r.text for r in answers]
    assert len({r.text for r in answers}) == 1
    assert sum("Idempotent-Replayed" not in r.headers for r in answers) == 1
    assert refund_count(db, payment.id) == 1


@pytest.mark.parametrize(
    ("first", "status", "code"),
    [
        ({"charge_id": "ch_not_yet_known", "full": True}, 404, "not_found"),
        ({"amount_cents": 9_999_999}, 422, "amount_exceeds_refundable"),
    ],
    ids=["not found", "amount too large"],
)
def test_a_rejected_first_request_does_not_claim_the_key(
    client, settings, db, first, status, code
) -> None:
    payment, charge = seed_payment(db, amount=5000)
    key = new_key()
    before = table_counts(db)

    assert_error(post(client, settings, {"charge_id": charge.id} | first, key), status, code)
    assert table_counts(db) == before

    retry = post(client, settings, {"charge_id": charge.id, "amount_cents": 300}, key)
    assert retry.status_code == 201, retry.text
    assert "Idempotent-Replayed" not in retry.headers
    assert refund_count(db, payment.id) == 1


BAD_KEYS = [
    ("empty", ""),
    ("too long", "k" * 256),
    ("tab", "a\tb"),
    ("non-ascii", b"cl\xe9"),
]


@pytest.mark.parametrize(("case", "key"), BAD_KEYS, ids=[c for c, _ in BAD_KEYS])
def test_bad_idempotency_keys_are_422_and_write_nothing(client, settings, db, case, key) -> None:
    _, charge = seed_payment(db, amount=5000)
    before = table_counts(db)
    resp = post(client, settings, {"charge_id": charge.id, "full": True}, key)
    assert_error(resp, 422, "validation_error")
    assert table_counts(db) == before


def test_longest_allowed_key_works_and_is_stored_for_the_sub(client, settings, db) -> None:
    _, charge = seed_payment(db, amount=5000)
    key = "k" * 255
    sub = f"longkey-{uuid.uuid4()}"
    assert (
        post(client, settings, {"charge_id": charge.id, "full": True}, key, sub).status_code == 201
    )
    db.expire_all()
    record = db.scalar(select(IdempotencyRecord).where(IdempotencyRecord.subject == sub))
    assert record is not None and record.key == key and record.response_status == 201
