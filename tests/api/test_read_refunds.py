"""GET /v1/admin/refunds/<id> and GET /v1/admin/refunds over real HTTP (SPEC 3.2)."""

from __future__ import annotations

import base64
import json

import httpx
import pytest

from shared.adapters.db import unit_of_work
from shared.domain.models import Refund, RefundStatus
from shared.services.transitions import transition
from tests.api.helpers import REFUNDS, assert_error
from tests.support import auth, seed_payment

ONE = f"{REFUNDS}/{{refund_id}}"


def create(client: httpx.Client, settings, body: dict, sub: str = "ops@example.com") -> dict:
    resp = client.post(REFUNDS, json=body, headers=auth(settings, sub=sub))
    assert resp.status_code == 201, resp.text
    return resp.json()


def move(refund_id: str, *steps: RefundStatus, actor: str = "worker") -> None:
    """Move a refund through the real state machine, one committed step at a time."""
    for to_status in steps:
        with unit_of_work() as session:
            assert transition(
                session, refund_id, to_status, actor=actor, detail={"step": str(to_status)}
            )
            session.commit()


def list_page(client: httpx.Client, settings, **params: object) -> httpx.Response:
    return client.get(REFUNDS, params=params, headers=auth(settings, scopes=("refunds:read",)))


def test_get_one_has_every_field_and_the_audit_trail_oldest_first(
    client, settings, db, contract
) -> None:
    payment, charge = seed_payment(db, amount=4000, currency="eur")
    created = create(
        client,
        settings,
        {"charge_id": charge.id, "amount_cents": 1500, "reason": "damaged parcel"},
        sub="carol@example.com",
    )
    move(created["refund_id"], RefundStatus.PROCESSING, RefundStatus.SUCCEEDED)

    resp = client.get(
        f"{REFUNDS}/{created['refund_id']}", headers=auth(settings, scopes=("refunds:read",))
    )

    assert resp.status_code == 200, resp.text
    contract.check(resp, "GET", ONE)
    body = resp.json()
    assert set(body) == {
        "refund_id",
        "payment_id",
        "charge_id",
        "amount_cents",
        "status",
        "stripe_refund_id",
        "currency",
        "reason",
        "failure_reason",
        "initiated_by",
        "created_at",
        "updated_at",
        "attempts",
        "approval_threshold_cents",
        "decision",
        "decided_by",
        "decided_at",
        "decision_note",
        "events",
    }
    assert body["refund_id"] == created["refund_id"]
    assert body["payment_id"] == payment.id and body["charge_id"] == charge.id
    assert body["amount_cents"] == 1500 and body["currency"] == "eur"
    assert body["status"] == "succeeded"
    assert body["stripe_refund_id"] == ""
    assert body["reason"] == "damaged parcel" and body["failure_reason"] is None
    assert body["initiated_by"] == "carol@example.com"
    assert body["attempts"] == 0
    assert body["created_at"].endswith("Z") and body["updated_at"] >= body["created_at"]
    trail = [(e["from_status"], e["to_status"], e["actor"]) for e in body["events"]]
    assert trail == [
        (None, "pending", "carol@example.com"),
        ("pending", "processing", "worker"),
        ("processing", "succeeded", "worker"),
    ]
    times = [e["created_at"] for e in body["events"]]
    assert times == sorted(times)


@pytest.mark.parametrize(
    "refund_id",
    [
        "rf_000000000000000000000000",
        "nope",
        "a/b",
        "%00",
        "rf_x%00y",
        "%FF",
        "x" * 300,
        "%20",
        "..%2F",
    ],
)
def test_any_id_that_names_no_refund_is_404(client, settings, contract, refund_id) -> None:
    resp = client.get(f"{REFUNDS}/{refund_id}", headers=auth(settings, scopes=("refunds:read",)))
    assert_error(resp, 404, "not_found")
    contract.check(resp, "GET", ONE)


def test_double_slash_in_the_path_is_a_json_404_not_a_redirect(client, settings) -> None:
    resp = client.get(f"{REFUNDS}//rf_x", headers=auth(settings))
    assert_error(resp, 404, "not_found")


def test_list_filters_by_payment_charge_status_and_initiator(
    client, settings, db, contract
) -> None:
    payment, charge = seed_payment(db, amount=9000)
    other_payment, other_charge = seed_payment(db, amount=9000)
    a = create(client, settings, {"charge_id": charge.id, "amount_cents": 100})
    b = create(
        client, settings, {"charge_id": charge.id, "amount_cents": 200}, sub="dave@example.com"
    )
    c = create(client, settings, {"charge_id": other_charge.id, "amount_cents": 300})
    move(b["refund_id"], RefundStatus.FAILED)

    def ids(**params: object) -> list[str]:
        resp = list_page(client, settings, **params)
        assert resp.status_code == 200, resp.text
        contract.check(resp, "GET", REFUNDS)
        return [r["refund_id"] for r in resp.json()["data"]]

    assert ids(payment_id=payment.id) == [b["refund_id"], a["refund_id"]]
    assert ids(charge_id=charge.id) == [b["refund_id"], a["refund_id"]]
    assert ids(payment_id=other_payment.id) == [c["refund_id"]]
    assert ids(payment_id=payment.id, status="failed") == [b["refund_id"]]
    assert ids(payment_id=payment.id, status="pending") == [a["refund_id"]]
    assert ids(charge_id=charge.id, initiated_by="dave@example.com") == [b["refund_id"]]
    assert ids(charge_id="ch_nothing_here") == []


def test_list_items_carry_the_refund_fields_without_events(client, settings, db) -> None:
    payment, charge = seed_payment(db, amount=900)
    created = create(client, settings, {"charge_id": charge.id, "full": True})
    [item] = list_page(client, settings, payment_id=payment.id).json()["data"]
    assert item["refund_id"] == created["refund_id"] and item["amount_cents"] == 900
    assert "events" not in item and item["currency"] == "usd"


def test_paging_walks_every_refund_once_newest_first(client, settings, db) -> None:
    payment, charge = seed_payment(db, amount=10_000)
    made = [
        create(client, settings, {"charge_id": charge.id, "amount_cents": 10 + i})["refund_id"]
        for i in range(7)
    ]
    db.expire_all()
    expected = [
        r.id
        for r in sorted(
            (db.get(Refund, i) for i in made), key=lambda r: (r.created_at, r.id), reverse=True
        )
    ]
    assert set(expected) == set(made)

    seen: list[str] = []
    pages = 0
    cursor = None
    while True:
        params = {"payment_id": payment.id, "limit": 3} | ({"cursor": cursor} if cursor else {})
        body = list_page(client, settings, **params).json()
        seen += [r["refund_id"] for r in body["data"]]
        pages += 1
        if not body["has_more"]:
            assert body["next_cursor"] is None
            break
        cursor = body["next_cursor"]
        assert cursor
    assert pages == 3
    assert seen == expected  # newest first, no duplicates, no gaps


def test_limit_defaults_to_20_and_accepts_1_to_100(client, settings, db) -> None:
    _, charge = seed_payment(db, amount=10_000)
    for _ in range(21):
        create(client, settings, {"charge_id": charge.id, "amount_cents": 1})
    default = list_page(client, settings, charge_id=charge.id).json()
    assert len(default["data"]) == 20 and default["has_more"] is True
    assert len(list_page(client, settings, charge_id=charge.id, limit=1).json()["data"]) == 1
    everything = list_page(client, settings, charge_id=charge.id, limit=100).json()
    assert len(everything["data"]) == 21 and everything["has_more"] is False


def _cursor(payload: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")


BAD_QUERIES = [
    ("limit 0", {"limit": "0"}),
    ("limit 101", {"limit": "101"}),
    ("limit negative", {"limit": "-1"}),
    ("limit word", {"limit": "ten"}),
    ("limit fraction", {"limit": "1.5"}),
    ("limit empty", {"limit": ""}),
    ("cursor garbage", {"cursor": "!!!not-a-cursor"}),
    ("cursor not base64 json", {"cursor": "bm90IGpzb24"}),
    ("cursor wrong shape", {"cursor": _cursor({"a": 1})}),
    ("cursor naive time", {"cursor": _cursor(["2026-01-01T00:00:00", "rf_x"])}),
    ("cursor nul id", {"cursor": _cursor(["2026-01-01T00:00:00+00:00", "rf_\u0000"])}),
    ("cursor number id", {"cursor": _cursor(["2026-01-01T00:00:00+00:00", 5])}),
    ("cursor empty", {"cursor": ""}),
    ("status unknown", {"status": "done"}),
    ("status empty", {"status": ""}),
    ("charge_id control char", {"charge_id": "ch_\u0001"}),
    ("unknown parameter", {"sort": "asc"}),
    ("repeated parameter", [("limit", "5"), ("limit", "6")]),
]


@pytest.mark.parametrize(("case", "params"), BAD_QUERIES, ids=[c for c, _ in BAD_QUERIES])
def test_bad_list_queries_are_422(client, settings, contract, case, params) -> None:
    resp = client.get(REFUNDS, params=params, headers=auth(settings, scopes=("refunds:read",)))
    body = assert_error(resp, 422, "validation_error")
    contract.check(resp, "GET", REFUNDS)
    if case == "unknown parameter":
        assert "sort" in body["message"] and "payment_id" in body["message"]
