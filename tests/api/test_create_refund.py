"""POST /v1/admin/refunds over real HTTP against gunicorn, Postgres and Redis (SPEC 3.1)."""

from __future__ import annotations

import httpx
import pytest
from sqlalchemy import func, select

from shared.adapters.db import WEB_APPLICATION_NAME
from shared.domain.models import Refund, RefundEvent
from tests.api.helpers import REFUNDS as PATH
from tests.api.helpers import assert_error
from tests.support import auth, seed_payment, table_counts, terminate_backends


def post(client: httpx.Client, settings, body, **kwargs) -> httpx.Response:
    headers = {**auth(settings), **kwargs.pop("headers", {})}
    return client.post(PATH, json=body, headers=headers, **kwargs)


def test_partial_refund_is_initiated_pending_with_seed_fields(
    client, settings, db, contract
) -> None:
    payment, charge = seed_payment(db, amount=5000)
    resp = post(
        client,
        settings,
        {"charge_id": charge.id, "amount_cents": 1200, "reason": "requested_by_customer"},
    )
    assert resp.status_code == 201, resp.text
    contract.check(resp, "POST", PATH)
    body = resp.json()
    assert set(body) == {
        "refund_id",
        "payment_id",
        "charge_id",
        "amount_cents",
        "status",
        "stripe_refund_id",
    }
    assert body["payment_id"] == payment.id
    assert body["charge_id"] == charge.id
    assert body["amount_cents"] == 1200
    assert body["status"] == "pending"
    assert body["stripe_refund_id"] == ""
    assert resp.headers["Location"] == f"{PATH}/{body['refund_id']}"
    refund = db.get(Refund, body["refund_id"])
    assert refund.status == "pending" and refund.initiated_by == "ops@example.com"
    assert refund.currency == "usd"
    events = db.scalars(select(RefundEvent).where(RefundEvent.refund_id == refund.id)).all()
    assert [(e.from_status, e.to_status, e.actor) for e in events] == [
        (None, "pending", "ops@example.com")
    ]


def test_full_refund_takes_what_is_left(client, settings, db) -> None:
    _, charge = seed_payment(db, amount=5000)
    assert post(client, settings, {"charge_id": charge.id, "amount_cents": 1500}).status_code == 201
    resp = post(client, settings, {"charge_id": charge.id, "full": True})
    assert resp.status_code == 201
    assert resp.json()["amount_cents"] == 3500


@pytest.mark.parametrize("by", ["payment_intent", "payment_id"])
def test_payment_ids_are_accepted_where_no_charge_matches(client, settings, db, by) -> None:
    payment, charge = seed_payment(db, amount=900)
    ident = payment.stripe_payment_intent_id if by == "payment_intent" else payment.id
    resp = post(client, settings, {"charge_id": ident, "amount_cents": 100})
    assert resp.status_code == 201
    assert resp.json()["payment_id"] == payment.id
    assert resp.json()["charge_id"] == charge.id


def test_payment_without_charge_answers_null_charge_id(client, settings, db) -> None:
    payment, _ = seed_payment(db, amount=900, charge_status=None)
    resp = post(client, settings, {"charge_id": payment.id, "full": True})
    assert resp.status_code == 201
    assert resp.json()["charge_id"] is None


def test_unknown_charge_is_404(client, settings, db) -> None:
    before = table_counts(db)
    assert_error(post(client, settings, {"charge_id": "ch_nope", "full": True}), 404, "not_found")
    assert table_counts(db) == before


@pytest.mark.parametrize(
    ("status", "charge_status"), [("requires_payment_method", "failed"), ("succeeded", "pending")]
)
def test_not_succeeded_payment_is_412(client, settings, db, status, charge_status) -> None:
    _, charge = seed_payment(db, status=status, charge_status=charge_status)
    before = table_counts(db)
    assert_error(
        post(client, settings, {"charge_id": charge.id, "full": True}), 412, "payment_not_succeeded"
    )
    assert table_counts(db) == before


def test_disputed_charge_is_409(client, settings, db) -> None:
    _, charge = seed_payment(db, disputed=True)
    assert_error(
        post(client, settings, {"charge_id": charge.id, "full": True}), 409, "charge_disputed"
    )


def test_nothing_left_is_409_already_refunded(client, settings, db) -> None:
    _, charge = seed_payment(db, amount=700)
    assert post(client, settings, {"charge_id": charge.id, "full": True}).status_code == 201
    before = table_counts(db)
    assert_error(
        post(client, settings, {"charge_id": charge.id, "full": True}), 409, "already_refunded"
    )
    assert_error(
        post(client, settings, {"charge_id": charge.id, "amount_cents": 1}), 409, "already_refunded"
    )
    assert table_counts(db) == before


def test_amount_above_what_is_left_is_422_and_says_how_much_is_left(client, settings, db) -> None:
    _, charge = seed_payment(db, amount=1000)
    assert post(client, settings, {"charge_id": charge.id, "amount_cents": 600}).status_code == 201
    body = assert_error(
        post(client, settings, {"charge_id": charge.id, "amount_cents": 401}),
        422,
        "amount_exceeds_refundable",
    )
    assert "400" in body["message"]


def test_failed_refunds_release_their_amount(client, settings, db) -> None:
    _, charge = seed_payment(db, amount=1000)
    first = post(client, settings, {"charge_id": charge.id, "full": True}).json()
    refund = db.get(Refund, first["refund_id"])
    refund.status = "failed"
    db.commit()
    resp = post(client, settings, {"charge_id": charge.id, "full": True})
    assert resp.status_code == 201 and resp.json()["amount_cents"] == 1000


BAD_BODIES = [
    ("not json", b"{nope"),
    ("array", b"[1]"),
    ("null", b"null"),
    ("empty", b""),
    ("unknown field", {"charge_id": "ch_x", "amount": 500}),
    ("both", {"charge_id": "ch_x", "amount_cents": 5, "full": True}),
    ("neither", {"charge_id": "ch_x"}),
    ("full false alone", {"charge_id": "ch_x", "full": False}),
    ("string amount", {"charge_id": "ch_x", "amount_cents": "100"}),
    ("float amount", {"charge_id": "ch_x", "amount_cents": 100.0}),
    ("fraction", {"charge_id": "ch_x", "amount_cents": 1.5}),
    ("bool amount", {"charge_id": "ch_x", "amount_cents": True}),
    ("zero", {"charge_id": "ch_x", "amount_cents": 0}),
    ("negative", {"charge_id": "ch_x", "amount_cents": -5}),
    ("above 2^53", {"charge_id": "ch_x", "amount_cents": 2**53 + 1}),
    ("yes is not bool", {"charge_id": "ch_x", "full": "yes"}),
    ("null amount with full", {"charge_id": "ch_x", "amount_cents": None, "full": True}),
    ("null full with amount", {"charge_id": "ch_x", "amount_cents": 5, "full": None}),
    ("empty charge", {"charge_id": "", "full": True}),
    ("long charge", {"charge_id": "c" * 256, "full": True}),
    ("nul in charge", {"charge_id": "ch_\u0000", "full": True}),
    ("charge not string", {"charge_id": 5, "full": True}),
    ("long reason", {"charge_id": "ch_x", "full": True, "reason": "r" * 501}),
    ("missing charge", {"full": True}),
]


@pytest.mark.parametrize(("case", "body"), BAD_BODIES, ids=[c for c, _ in BAD_BODIES])
def test_bad_bodies_are_422_and_write_nothing(client, settings, db, contract, case, body) -> None:
    before = table_counts(db)
    if isinstance(body, bytes):
        resp = client.post(
            PATH, content=body, headers={**auth(settings), "Content-Type": "application/json"}
        )
    else:
        resp = post(client, settings, body)
    assert_error(resp, 422, "validation_error")
    contract.check(resp, "POST", PATH)
    assert table_counts(db) == before


def test_validation_message_names_the_field(client, settings) -> None:
    body = assert_error(
        post(client, settings, {"charge_id": "ch_x", "amount": 5}), 422, "validation_error"
    )
    assert "amount" in body["message"]


def test_auth_comes_before_validation(client, settings) -> None:
    resp = client.post(PATH, content=b"{nope")
    assert_error(resp, 401, "unauthorized")
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    resp = client.post(PATH, content=b"{nope", headers=auth(settings, scopes=("refunds:read",)))
    assert_error(resp, 403, "forbidden")


def test_validation_comes_before_not_found(client, settings) -> None:
    assert_error(post(client, settings, {"charge_id": "ch_missing"}), 422, "validation_error")


def test_request_id_is_echoed_or_generated(client, settings) -> None:
    resp = client.get("/healthz", headers={"X-Request-Id": "req-123"})
    assert resp.headers["X-Request-Id"] == "req-123"
    assert len(client.get("/healthz").headers["X-Request-Id"]) >= 16


def test_oversized_body_is_413_json(client, settings) -> None:
    resp = post(client, settings, {"charge_id": "ch_x", "full": True, "reason": "x" * 200_000})
    assert_error(resp, 413, "request_too_large")


def test_unknown_route_and_wrong_method_are_json(client) -> None:
    assert_error(client.get("/v1/nope"), 404, "not_found")
    assert_error(client.delete(PATH), 405, "method_not_allowed")


def test_unique_ids_per_request(client, settings, db) -> None:
    _, charge = seed_payment(db, amount=1000)
    ids = {
        post(client, settings, {"charge_id": charge.id, "amount_cents": 10}).json()["refund_id"]
        for _ in range(3)
    }
    assert len(ids) == 3
    assert all(i.startswith("rf_") for i in ids)


def test_pooled_connections_that_died_are_replaced_without_an_error(
    client, settings, db
) -> None:
    """No ping before each use: a connection Postgres dropped while it sat in the pool
    (a restart, a failover, an idle timeout) has something to read, its end, and is
    replaced at checkout, before the statement that records a refund is sent on it."""
    payment, charge = seed_payment(db, amount=5000)
    body = {"charge_id": charge.id, "amount_cents": 100}
    for _ in range(8):  # every web process and thread gets connections
        assert post(client, settings, body).status_code == 201
    # Gone before the next requests: the connections died while idle in the pool (one
    # dying under a statement is another case: its outcome is unknown,
    # test_commit_outcome_unknown).
    assert terminate_backends(db, WEB_APPLICATION_NAME) >= 1
    answers = [post(client, settings, body) for _ in range(8)]
    assert [r.status_code for r in answers] == [201] * 8, [r.text for r in answers]
    created = db.scalar(select(func.count()).where(Refund.payment_id == payment.id))
    assert created == 16
