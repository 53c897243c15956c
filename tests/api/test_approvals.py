"""Four eyes for large refunds over real HTTP (SPEC 12): a gunicorn of this module's own
runs with an approval threshold; Postgres and Redis are the run's.

No worker runs here: what is enqueued stays on the run's Redis list, where the tests
look for it. The races with the worker's claim are in tests/worker/test_approvals.py.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from shared.adapters.celery_app import REFUNDS_QUEUE
from shared.domain.models import Refund, RefundEvent, RefundStatus
from tests.api.helpers import REFUNDS, Contract, all_at_once, assert_error
from tests.support import auth, seed_payment, table_counts, wait_for_http, web_process

THRESHOLD = 50_000  # APPROVAL_THRESHOLD_CENTS of this module's server
JPY_THRESHOLD = 5_000_000
INITIATOR = "support@example.com"
APPROVER = "controller@example.com"
SECOND_APPROVER = "cfo@example.com"
WRITE = ("refunds:read", "refunds:write")
APPROVE = ("refunds:read", "refunds:approve")
ONE = f"{REFUNDS}/{{refund_id}}"


@pytest.fixture(scope="module")
def url(service_env: dict[str, str], log_dir: Path) -> Iterator[str]:
    env = {**service_env, "APPROVAL_THRESHOLD_CENTS": str(THRESHOLD),
           "APPROVAL_THRESHOLDS": f"jpy={JPY_THRESHOLD}"}
    web, base = web_process(env, log_dir, workers=2)
    with web:
        wait_for_http(f"{base}/healthz", proc=web.proc)
        yield base


@pytest.fixture
def http(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=10) as c:
        yield c


@pytest.fixture(scope="module")
def published(url: str) -> Contract:
    """The document this module's server publishes."""
    return Contract(httpx.get(f"{url}/openapi.json", timeout=10).json())


@pytest.fixture(scope="module")
def broker(service_env: dict[str, str]) -> redis.Redis:
    return redis.Redis.from_url(service_env["REDIS_URL"])


def queued(broker: redis.Redis) -> set[str]:
    """Refund ids with a ``refunds.process`` message waiting on the run's queue."""
    ids = set()
    for raw in broker.lrange(REFUNDS_QUEUE, 0, -1):
        args = json.loads(base64.b64decode(json.loads(raw)["body"]))[0]
        ids.add(str(args[0]))
    return ids


def create(http: httpx.Client, settings, charge_id: str, amount: int, *,
           sub: str = INITIATOR, expect: int = 201, **headers: str) -> dict[str, Any]:
    resp = http.post(REFUNDS, json={"charge_id": charge_id, "amount_cents": amount},
                     headers={**auth(settings, sub=sub, scopes=WRITE), **headers})
    assert resp.status_code == expect, resp.text
    return dict(resp.json())


def decide(http: httpx.Client, settings, refund_id: str, action: str, *, sub: str = APPROVER,
           scopes: tuple[str, ...] = APPROVE, **kwargs: Any) -> httpx.Response:
    headers = {**auth(settings, sub=sub, scopes=scopes), **kwargs.pop("headers", {})}
    return http.post(f"{REFUNDS}/{refund_id}/{action}", headers=headers, **kwargs)


def cancel(http: httpx.Client, settings, refund_id: str, *, sub: str = INITIATOR,
           **kwargs: Any) -> httpx.Response:
    return decide(http, settings, refund_id, "cancel", sub=sub, scopes=WRITE, **kwargs)


def awaiting(http: httpx.Client, settings, db: Session, *, captured: int = 80_000,
             amount: int = THRESHOLD) -> dict[str, Any]:
    _, charge = seed_payment(db, amount=captured)
    body = create(http, settings, charge.id, amount)
    assert body["status"] == "awaiting_approval", body
    return body


def at_once(calls: list[Callable[[], httpx.Response]]) -> list[httpx.Response]:
    """The calls on as many threads, released together."""
    return all_at_once(len(calls), lambda i: calls[i]())


def refund_row(db: Session, refund_id: str) -> Refund:
    db.expire_all()
    row = db.get(Refund, refund_id)
    assert row is not None
    return row


def trail(db: Session, refund_id: str) -> list[RefundEvent]:
    db.expire_all()
    return list(db.scalars(select(RefundEvent).where(RefundEvent.refund_id == refund_id)
                           .order_by(RefundEvent.id)))


def snapshot(db: Session, refund_id: str) -> tuple[Any, ...]:
    """Everything a refused request must leave as it was."""
    row = refund_row(db, refund_id)
    return (row.status, row.decision, row.decided_by, row.decided_at, row.decision_note,
            row.updated_at, len(trail(db, refund_id)), table_counts(db))


# -- creation ------------------------------------------------------------------------


def test_a_refund_at_the_threshold_is_created_awaiting_approval_and_not_enqueued(
    http, settings, db, broker, published
) -> None:
    _, charge = seed_payment(db, amount=80_000)
    resp = http.post(REFUNDS, json={"charge_id": charge.id, "amount_cents": THRESHOLD},
                     headers=auth(settings, sub=INITIATOR, scopes=WRITE))

    assert resp.status_code == 201, resp.text
    published.check(resp, "POST", REFUNDS)
    body = resp.json()
    assert list(body) == ["refund_id", "payment_id", "charge_id", "amount_cents", "status",
                          "stripe_refund_id"]
    assert body["status"] == "awaiting_approval" and body["amount_cents"] == THRESHOLD
    assert body["stripe_refund_id"] == ""
    assert resp.headers["Location"] == f"{REFUNDS}/{body['refund_id']}"
    assert body["refund_id"] not in queued(broker)

    got = http.get(f"{REFUNDS}/{body['refund_id']}", headers=auth(settings, scopes=WRITE))
    published.check(got, "GET", ONE)
    one = got.json()
    assert one["status"] == "awaiting_approval" and one["initiated_by"] == INITIATOR
    assert one["approval_threshold_cents"] == THRESHOLD
    assert (one["decision"], one["decided_by"], one["decided_at"], one["decision_note"]) == (
        None, None, None, None)
    (event,) = one["events"]
    assert (event["from_status"], event["to_status"], event["actor"]) == (
        None, "awaiting_approval", INITIATOR)
    assert event["detail"]["approval_threshold"] == THRESHOLD


def test_below_the_threshold_a_refund_is_pending_and_enqueued_as_before(
    http, settings, db, broker
) -> None:
    _, charge = seed_payment(db, amount=80_000)
    body = create(http, settings, charge.id, THRESHOLD - 1)
    assert body["status"] == "pending"
    assert body["refund_id"] in queued(broker)
    assert refund_row(db, body["refund_id"]).approval_threshold is None


def test_a_full_refund_is_held_when_what_is_left_reaches_the_threshold(
    http, settings, db
) -> None:
    _, charge = seed_payment(db, amount=THRESHOLD + 5)
    resp = http.post(REFUNDS, json={"charge_id": charge.id, "full": True},
                     headers=auth(settings, sub=INITIATOR, scopes=WRITE))
    assert resp.status_code == 201, resp.text
    assert resp.json()["status"] == "awaiting_approval"


def test_a_currency_of_its_own_has_its_own_threshold(http, settings, db) -> None:
    _, yen = seed_payment(db, amount=10_000_000, currency="jpy")
    # Above the overall threshold, below the yen one: no approval needed.
    assert create(http, settings, yen.id, 1_000_000)["status"] == "pending"
    assert create(http, settings, yen.id, JPY_THRESHOLD)["status"] == "awaiting_approval"
    _, euro = seed_payment(db, amount=80_000, currency="eur")
    # Not listed: the overall threshold applies.
    assert create(http, settings, euro.id, THRESHOLD)["status"] == "awaiting_approval"


def test_a_refund_awaiting_approval_holds_its_amount_until_rejected(
    http, settings, db
) -> None:
    _, charge = seed_payment(db, amount=80_000)
    held = create(http, settings, charge.id, 60_000)
    assert held["status"] == "awaiting_approval"
    refused = http.post(REFUNDS, json={"charge_id": charge.id, "amount_cents": 30_000},
                        headers=auth(settings, sub=INITIATOR, scopes=WRITE))
    assert "20000" in assert_error(refused, 422, "amount_exceeds_refundable")["message"]
    # Two large requests can never together be approved past what is left.
    second = http.post(REFUNDS, json={"charge_id": charge.id, "amount_cents": THRESHOLD},
                       headers=auth(settings, sub=INITIATOR, scopes=WRITE))
    assert_error(second, 422, "amount_exceeds_refundable")

    assert decide(http, settings, held["refund_id"], "reject").status_code == 200
    assert create(http, settings, charge.id, 30_000)["status"] == "pending"


def test_a_replayed_idempotent_request_answers_awaiting_approval_and_enqueues_nothing(
    http, settings, db, broker
) -> None:
    _, charge = seed_payment(db, amount=80_000)
    first = create(http, settings, charge.id, THRESHOLD, **{"Idempotency-Key": "big-one"})
    again = http.post(REFUNDS, json={"charge_id": charge.id, "amount_cents": THRESHOLD},
                      headers={**auth(settings, sub=INITIATOR, scopes=WRITE),
                               "Idempotency-Key": "big-one"})
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == first
    assert first["refund_id"] not in queued(broker)


def test_the_list_filters_refunds_awaiting_approval(http, settings, db, published) -> None:
    body = awaiting(http, settings, db)
    resp = http.get(REFUNDS, params={"status": "awaiting_approval", "limit": 100},
                    headers=auth(settings, scopes=WRITE))
    published.check(resp, "GET", REFUNDS)
    rows = resp.json()["data"]
    assert body["refund_id"] in {r["refund_id"] for r in rows}
    assert {r["status"] for r in rows} == {"awaiting_approval"}


# -- decisions -----------------------------------------------------------------------


def test_approval_by_a_second_person_makes_it_pending_and_enqueues_it_after_commit(
    http, settings, db, broker, published
) -> None:
    body = awaiting(http, settings, db)
    refund_id = body["refund_id"]

    resp = decide(http, settings, refund_id, "approve", json={"note": "order 1234 checked"})

    assert resp.status_code == 200, resp.text
    published.check(resp, "POST", f"{ONE}/approve")
    got = resp.json()
    assert got["status"] == "pending" and got["refund_id"] == refund_id
    assert got["initiated_by"] == INITIATOR
    assert (got["decision"], got["decided_by"], got["decision_note"]) == (
        "approved", APPROVER, "order 1234 checked")
    assert got["decided_at"] is not None
    assert [(e["from_status"], e["to_status"], e["actor"]) for e in got["events"]] == [
        (None, "awaiting_approval", INITIATOR), ("awaiting_approval", "pending", APPROVER)]
    assert got["events"][-1]["detail"] == {"decision": "approved", "note": "order 1234 checked"}
    assert refund_id in queued(broker)
    # The GET shows the same: who asked, who decided, when.
    again = http.get(f"{REFUNDS}/{refund_id}", headers=auth(settings, scopes=WRITE)).json()
    assert {k: again[k] for k in ("decision", "decided_by", "decided_at", "decision_note")} == {
        k: got[k] for k in ("decision", "decided_by", "decided_at", "decision_note")}


def test_rejection_cancels_it_with_who_and_why(http, settings, db, broker, published) -> None:
    refund_id = awaiting(http, settings, db)["refund_id"]

    resp = decide(http, settings, refund_id, "reject", json={"note": "not our customer"})

    assert resp.status_code == 200, resp.text
    published.check(resp, "POST", f"{ONE}/reject")
    got = resp.json()
    assert got["status"] == "canceled"
    assert (got["decision"], got["decided_by"], got["decision_note"]) == (
        "rejected", APPROVER, "not our customer")
    assert got["events"][-1]["actor"] == APPROVER
    assert got["events"][-1]["detail"] == {"decision": "rejected", "note": "not our customer"}
    assert refund_id not in queued(broker)


def test_a_decision_without_a_body_or_with_an_empty_object_has_no_note(
    http, settings, db
) -> None:
    first = awaiting(http, settings, db)["refund_id"]
    second = awaiting(http, settings, db)["refund_id"]
    assert decide(http, settings, first, "approve").json()["decision_note"] is None
    assert decide(http, settings, second, "reject", json={}).json()["decision_note"] is None


@pytest.mark.parametrize("action", ["approve", "reject"])
def test_the_initiator_can_never_decide_on_their_own_refund(
    http, settings, db, action
) -> None:
    refund_id = awaiting(http, settings, db)["refund_id"]
    before = snapshot(db, refund_id)

    resp = decide(http, settings, refund_id, action, sub=INITIATOR,
                  scopes=(*WRITE, "refunds:approve"))

    assert "second person" in assert_error(resp, 403, "self_approval")["message"]
    assert snapshot(db, refund_id) == before


def test_a_second_decision_is_refused_and_changes_nothing(http, settings, db) -> None:
    refund_id = awaiting(http, settings, db)["refund_id"]
    assert decide(http, settings, refund_id, "approve").status_code == 200
    before = snapshot(db, refund_id)

    for action in ("approve", "reject"):
        resp = decide(http, settings, refund_id, action, sub=SECOND_APPROVER)
        message = assert_error(resp, 409, "not_awaiting_approval")["message"]
        assert f"approved by {APPROVER}" in message
    assert snapshot(db, refund_id) == before


def test_deciding_on_a_refund_that_never_needed_approval_is_refused(
    http, settings, db
) -> None:
    _, charge = seed_payment(db, amount=80_000)
    refund_id = create(http, settings, charge.id, 100)["refund_id"]
    resp = decide(http, settings, refund_id, "approve")
    assert_error(resp, 409, "not_awaiting_approval")
    assert refund_row(db, refund_id).status == "pending"


def test_deciding_needs_the_approve_scope_and_cancelling_the_write_scope(
    http, settings, db
) -> None:
    refund_id = awaiting(http, settings, db)["refund_id"]
    before = snapshot(db, refund_id)
    for action in ("approve", "reject"):
        resp = decide(http, settings, refund_id, action, scopes=WRITE)
        assert "refunds:approve" in assert_error(resp, 403, "forbidden")["message"]
    resp = decide(http, settings, refund_id, "cancel", scopes=APPROVE)
    assert "refunds:write" in assert_error(resp, 403, "forbidden")["message"]
    assert_error(http.post(f"{REFUNDS}/{refund_id}/approve"), 401, "unauthorized")
    assert snapshot(db, refund_id) == before


@pytest.mark.parametrize("action", ["approve", "reject", "cancel"])
def test_an_unknown_refund_is_404(http, settings, action) -> None:
    scopes = (*WRITE, "refunds:approve")
    for refund_id in ("rf_000000000000000000000000", "nope", "x" * 300, "%00"):
        resp = http.post(f"{REFUNDS}/{refund_id}/{action}", headers=auth(
            settings, sub=APPROVER, scopes=scopes))
        assert_error(resp, 404, "not_found")


BAD_BODIES = [
    ("not json", b"{note: 1}"),
    ("a list", b"[]"),
    ("a string", b'"ok"'),
    ("null", b"null"),
    ("a number", b"7"),
    ("an unknown field", b'{"note": "x", "approved": true}'),
    ("a note that is not a string", b'{"note": 12}'),
    ("a note over 500 characters", json.dumps({"note": "n" * 501}).encode()),
    ("a NUL in the note", b'{"note": "a\\u0000b"}'),
    ("a repeated key", b'{"note": "a", "note": "b"}'),
]


@pytest.mark.parametrize("action", ["approve", "reject", "cancel"])
def test_a_bad_body_is_422_and_changes_nothing(http, settings, db, action) -> None:
    refund_id = awaiting(http, settings, db)["refund_id"]
    before = snapshot(db, refund_id)
    scopes = WRITE if action == "cancel" else APPROVE
    for label, raw in BAD_BODIES:
        resp = decide(http, settings, refund_id, action, scopes=scopes, content=raw,
                      headers={"Content-Type": "application/json"})
        assert resp.status_code == 422, (label, resp.text)
        assert_error(resp, 422, "validation_error")
    assert snapshot(db, refund_id) == before
    # Exactly 500 characters is a note like any other.
    ok = decide(http, settings, refund_id, action, scopes=scopes, json={"note": "n" * 500})
    assert ok.status_code == 200, ok.text


# -- cancel (withdraw) ---------------------------------------------------------------


def test_cancel_withdraws_a_refund_awaiting_approval(http, settings, db, published) -> None:
    refund_id = awaiting(http, settings, db)["refund_id"]
    resp = cancel(http, settings, refund_id, json={"note": "typo in the amount"})
    assert resp.status_code == 200, resp.text
    published.check(resp, "POST", f"{ONE}/cancel")
    got = resp.json()
    assert got["status"] == "canceled"
    assert (got["decision"], got["decided_by"], got["decision_note"]) == (
        "withdrawn", INITIATOR, "typo in the amount")
    assert got["events"][-1]["from_status"] == "awaiting_approval"
    # and it can no longer be approved
    assert_error(decide(http, settings, refund_id, "approve"), 409, "not_awaiting_approval")


def test_cancel_withdraws_a_pending_refund_nothing_has_sent(http, settings, db) -> None:
    _, charge = seed_payment(db, amount=80_000)
    refund_id = create(http, settings, charge.id, 700)["refund_id"]
    resp = cancel(http, settings, refund_id, sub="someone.else@example.com")
    assert resp.status_code == 200, resp.text
    assert resp.json()["status"] == "canceled"
    assert resp.json()["decided_by"] == "someone.else@example.com"
    assert [(e.from_status, e.to_status) for e in trail(db, refund_id)] == [
        (None, "pending"), ("pending", "canceled")]
    # what it held is free again
    assert create(http, settings, charge.id, 80_000 - 1)["status"] == "awaiting_approval"


def _set(db: Session, refund_id: str, **values: Any) -> None:
    db.execute(update(Refund).where(Refund.id == refund_id).values(**values))
    db.commit()


@pytest.mark.parametrize(
    ("values", "why"),
    [
        ({"attempts": 1}, "already been sent to Stripe"),
        ({"stripe_refund_id": "re_cancel_test_{}"}, "already been sent to Stripe"),
        ({"status": RefundStatus.PROCESSING, "attempts": 1}, "Stripe already holds"),
        ({"status": RefundStatus.REQUIRES_ACTION, "attempts": 1}, "Stripe already holds"),
        ({"status": RefundStatus.SUCCEEDED, "attempts": 1}, "finished ('succeeded')"),
        ({"status": RefundStatus.FAILED, "attempts": 1}, "finished ('failed')"),
        ({"status": RefundStatus.CANCELED}, "already canceled"),
    ],
    ids=["attempted", "known-at-stripe", "processing", "requires-action", "succeeded",
         "failed", "canceled"],
)
def test_cancel_refuses_what_was_sent_or_finished_saying_why(
    http, settings, db, values, why
) -> None:
    _, charge = seed_payment(db, amount=80_000)
    refund_id = create(http, settings, charge.id, 900)["refund_id"]
    if "stripe_refund_id" in values:
        values = {"stripe_refund_id": values["stripe_refund_id"].format(refund_id)}
    _set(db, refund_id, **values)
    before = snapshot(db, refund_id)

    resp = cancel(http, settings, refund_id)

    assert why in assert_error(resp, 409, "cannot_cancel")["message"]
    assert snapshot(db, refund_id) == before


def test_cancel_twice_says_it_is_already_canceled_and_by_whom(http, settings, db) -> None:
    refund_id = awaiting(http, settings, db)["refund_id"]
    assert decide(http, settings, refund_id, "reject").status_code == 200
    resp = cancel(http, settings, refund_id)
    assert f"already canceled by {APPROVER}" in assert_error(resp, 409, "cannot_cancel")[
        "message"]


# -- races over HTTP -----------------------------------------------------------------


def test_two_approvers_at_once_make_exactly_one_decision(http, settings, db, broker) -> None:
    for _ in range(5):
        refund_id = awaiting(http, settings, db)["refund_id"]
        people = [(APPROVER, "approve"), (SECOND_APPROVER, "reject")]

        answers = at_once([partial(decide, http, settings, refund_id, action, sub=sub)
                           for sub, action in people])

        codes = sorted(a.status_code for a in answers)
        assert codes == [200, 409], [a.text for a in answers]
        (winner,) = [people[i] for i, a in enumerate(answers) if a.status_code == 200]
        row = refund_row(db, refund_id)
        assert (row.decided_by, row.decision) == (
            winner[0], "approved" if winner[1] == "approve" else "rejected")
        assert row.status == ("pending" if winner[1] == "approve" else "canceled")
        assert len(trail(db, refund_id)) == 2  # created, and one decision
        assert (refund_id in queued(broker)) == (winner[1] == "approve")


def test_two_approvals_at_once_approve_once(http, settings, db) -> None:
    refund_id = awaiting(http, settings, db)["refund_id"]
    subs = [f"approver{i}@example.com" for i in range(6)]
    answers = at_once([partial(decide, http, settings, refund_id, "approve", sub=sub)
                       for sub in subs])
    assert sorted(a.status_code for a in answers) == [200] + [409] * 5
    assert [e.to_status for e in trail(db, refund_id)] == ["awaiting_approval", "pending"]


def test_approve_against_cancel_has_one_outcome(http, settings, db, broker) -> None:
    """Serialized by the row lock, whichever comes first: a cancel first leaves nothing to
    approve (409); an approval first leaves a pending refund that nothing has sent yet
    (no worker runs here), which the cancel may still withdraw. Either way the refund
    ends in one state, and the trail holds exactly the decisions that were answered 200."""
    seen = set()
    for _ in range(6):
        refund_id = awaiting(http, settings, db)["refund_id"]
        approve_resp, cancel_resp = at_once([
            partial(decide, http, settings, refund_id, "approve"),
            partial(cancel, http, settings, refund_id),
        ])

        row = refund_row(db, refund_id)
        steps = [(e.from_status, e.to_status) for e in trail(db, refund_id)][1:]
        if cancel_resp.status_code == 200:
            assert row.status == "canceled" and row.decision == "withdrawn"
            if approve_resp.status_code == 200:
                assert steps == [("awaiting_approval", "pending"), ("pending", "canceled")]
                seen.add("approved, then withdrawn before any send")
            else:
                assert approve_resp.json()["error"] == "not_awaiting_approval"
                assert steps == [("awaiting_approval", "canceled")]
                assert refund_id not in queued(broker)
                seen.add("withdrawn first")
        else:
            assert approve_resp.status_code == 200, approve_resp.text
            assert cancel_resp.json()["error"] == "cannot_cancel"
            assert row.status == "pending" and row.decision == "approved"
            assert steps == [("awaiting_approval", "pending")]
            seen.add("approved only")
    print(f"approve against cancel: {sorted(seen)}")


def test_no_refund_awaits_approval_when_no_threshold_is_set(client, settings, db) -> None:
    """The run's shared server has no threshold: approvals are off."""
    _, charge = seed_payment(db, amount=10_000_000)
    resp = client.post(REFUNDS, json={"charge_id": charge.id, "amount_cents": 9_000_000},
                       headers=auth(settings, scopes=WRITE))
    assert resp.status_code == 201 and resp.json()["status"] == "pending"



def _gauge(text: str, name: str) -> float:
    (line,) = [line for line in text.splitlines() if line.startswith(f"{name} ")]
    return float(line.split()[1])


def test_metrics_count_refunds_awaiting_approval_and_the_oldest_age(
    http, settings, db
) -> None:
    refund_id = awaiting(http, settings, db)["refund_id"]
    _set(db, refund_id, created_at=func.now() - timedelta(hours=2))
    waiting = db.scalar(select(func.count()).where(Refund.status == "awaiting_approval"))

    text = http.get("/metrics").text

    assert _gauge(text, "refunds_awaiting_approval") == waiting
    assert _gauge(text, "refunds_oldest_awaiting_approval_age_seconds") >= 2 * 3600
    # Waiting for a person is not a pipeline that is open or stuck.
    assert 'status="awaiting_approval"' not in text
