"""POST /v1/webhooks/stripe on a real gunicorn, fed by the emulator's signed webhooks
and by events crafted and signed here with the service's webhook secret."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import httpx
import pytest
import stripe
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from shared.adapters.config import Settings
from shared.adapters.db import unit_of_work
from shared.adapters.stripe_gateway import StripeGateway
from shared.domain.models import Charge, Payment, Refund, StripeEvent
from shared.services import stripe_events
from tests.payments.conftest import Stack
from tests.support import BIN, ROOT, auth, table_counts

T = TypeVar("T")


def wait_for(probe: Callable[[], T], *, timeout: float = 15.0, what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def settle(stack: Stack) -> None:
    """Wait until the emulator has delivered every webhook it has queued."""
    wait_for(lambda: stack.admin.webhook_deliveries()["pending"] == 0, what="webhooks delivered")


def payment_state(db: Session, pi_id: str) -> tuple[str, int] | None:
    row = db.execute(
        select(Payment.status, Payment.amount).where(Payment.stripe_payment_intent_id == pi_id)
    ).first()
    return (row.status, row.amount) if row else None


def charge_state(db: Session, charge_id: str) -> tuple[str, int, bool] | None:
    row = db.execute(
        select(Charge.status, Charge.amount, Charge.disputed).where(Charge.id == charge_id)
    ).first()
    return (row.status, row.amount, row.disputed) if row else None


def event(event_type: str, obj: dict[str, Any], event_id: str | None = None) -> dict[str, Any]:
    return {
        "id": event_id or f"evt_test_{uuid.uuid4().hex[:20]}",
        "object": "event",
        "api_version": "2024-06-20",
        "created": int(time.time()),
        "livemode": False,
        "type": event_type,
        "data": {"object": obj},
    }


def deliver(
    stack: Stack, body: dict[str, Any] | bytes, *, secret: str | None = None,
    timestamp: int | None = None, signature: str | None = None,
) -> httpx.Response:
    """POST an event as Stripe would: the raw body and its Stripe-Signature header."""
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    if signature is None:
        signature = stripe.WebhookSignature.generate_signature_header(
            payload.decode(), secret or stack.webhook_secret, timestamp
        )
    headers = {"Content-Type": "application/json", "Stripe-Signature": signature}
    if not signature:
        del headers["Stripe-Signature"]
    return httpx.post(f"{stack.api_url}/v1/webhooks/stripe", content=payload, headers=headers)


def pi_snapshot(pi_id: str, status: str, amount: int = 1000, **extra: Any) -> dict[str, Any]:
    return {"id": pi_id, "object": "payment_intent", "amount": amount, "currency": "usd",
            "status": status, "amount_received": amount if status == "succeeded" else 0, **extra}


def paid(stack: Stack, db: Session, *, amount: int, card: str = "pm_card_visa") -> tuple[str, str]:
    """A payment made at Stripe, once its webhooks have brought it in: (pi id, charge id)."""
    pi = stack.stripe().v1.payment_intents.create(
        {"amount": amount, "currency": "usd", "payment_method": card, "confirm": True}
    )
    charge_id = str(pi.latest_charge)
    wait_for(lambda: payment_state(db, pi.id) == ("succeeded", amount), what="payment via webhook")
    wait_for(lambda: charge_state(db, charge_id), what="charge via webhook")
    return pi.id, charge_id


def test_payments_made_at_stripe_arrive_through_signed_webhooks(stack: Stack, db: Session) -> None:
    pi_id, charge_id = paid(stack, db, amount=2500)
    assert charge_state(db, charge_id) == ("succeeded", 2500, False)

    with pytest.raises(stripe.CardError) as declined:
        stack.stripe().v1.payment_intents.create(
            {"amount": 900, "currency": "usd", "payment_method": "pm_card_chargeDeclined",
             "confirm": True}
        )
    failed_pi = declined.value.json_body["error"]["payment_intent"]  # type: ignore[index]
    wait_for(lambda: charge_state(db, failed_pi["latest_charge"]), what="failed charge")
    settle(stack)
    # Events Stripe must settle (a status that does not move forward) are applied by the
    # worker, a moment after the webhook was answered.
    wait_for(lambda: payment_state(db, failed_pi["id"]) == ("requires_payment_method", 900),
             what="the failed payment's status")
    assert charge_state(db, failed_pi["latest_charge"]) == ("failed", 0, False)

    sent = [
        e.id for e in stack.stripe().v1.events.list({"limit": 100}).auto_paging_iter()
        if e.data.object.to_dict().get("id") in (pi_id, charge_id)
    ]
    assert len(sent) >= 3  # payment_intent.created, charge.succeeded, payment_intent.succeeded
    stored = set(db.scalars(select(StripeEvent.id).where(StripeEvent.id.in_(sent))))
    assert stored == set(sent)


@pytest.mark.parametrize(
    "tamper",
    ["wrong_secret", "missing_header", "garbled_header", "body_changed_after_signing"],
)
def test_bad_signature_is_400_and_nothing_is_stored(stack: Stack, db: Session, tamper: str) -> None:
    body = event("payment_intent.succeeded", pi_snapshot(f"pi_forged_{uuid.uuid4().hex[:12]}",
                                                         "succeeded"))
    settle(stack)
    before = table_counts(db)
    if tamper == "wrong_secret":
        response = deliver(stack, body, secret="whsec_not_the_service_secret")
    elif tamper == "missing_header":
        response = deliver(stack, body, signature="")
    elif tamper == "garbled_header":
        response = deliver(stack, body, signature="t=yesterday,v1=")
    else:
        good = stripe.WebhookSignature.generate_signature_header(
            json.dumps(body), stack.webhook_secret
        )
        body["data"]["object"]["amount"] = 999_999
        response = deliver(stack, body, signature=good)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_signature"
    assert stack.webhook_secret not in response.text and "v1=" not in response.text
    assert table_counts(db) == before


def test_signature_older_than_five_minutes_is_rejected_as_a_replay(
    stack: Stack, db: Session
) -> None:
    body = event("payment_intent.succeeded", pi_snapshot(f"pi_replay_{uuid.uuid4().hex[:12]}",
                                                         "succeeded"))
    settle(stack)
    before = table_counts(db)
    old = deliver(stack, body, timestamp=int(time.time()) - 301)
    assert old.status_code == 400 and old.json()["error"] == "invalid_signature"
    assert table_counts(db) == before
    # The same body signed now is accepted: only the age was wrong.
    assert deliver(stack, body).json() == {"received": True, "outcome": "processed"}


@pytest.mark.parametrize("payload", [b"{not json", b"[]", b'{"id": "evt_1"}', b"\xff\xfe{}"])
def test_body_that_is_not_an_event_is_400(stack: Stack, db: Session, payload: bytes) -> None:
    settle(stack)
    before = table_counts(db)
    try:  # signed correctly whenever it can be signed at all (the SDK signs text)
        signature = stripe.WebhookSignature.generate_signature_header(
            payload.decode(), stack.webhook_secret
        )
    except UnicodeDecodeError:
        signature = "t=1,v1=00"
    response = deliver(stack, payload, signature=signature)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_payload"
    assert table_counts(db) == before


def test_redelivered_event_is_acknowledged_and_applied_once(stack: Stack, db: Session) -> None:
    pi_id = f"pi_dup_{uuid.uuid4().hex[:12]}"
    body = event("payment_intent.succeeded", pi_snapshot(pi_id, "succeeded", amount=4200))
    settle(stack)
    before = table_counts(db)
    # Ten deliveries at once: one applies it, the others wait on its event id and see it taken.
    with ThreadPoolExecutor(10) as pool:
        outcomes = sorted(pool.map(lambda _: deliver(stack, body).json()["outcome"], range(10)))
    assert outcomes == ["duplicate"] * 9 + ["processed"]
    assert deliver(stack, body).json() == {"received": True, "outcome": "duplicate"}
    after = table_counts(db)
    assert after["stripe_events"] == before["stripe_events"] + 1
    assert after["payments"] == before["payments"] + 1
    assert payment_state(db, pi_id) == ("succeeded", 4200)


def test_unknown_event_type_is_acknowledged_and_remembered(stack: Stack, db: Session) -> None:
    body = event("customer.created", {"id": "cus_test_1", "object": "customer"})
    assert deliver(stack, body).json() == {"received": True, "outcome": "ignored"}
    assert db.get(StripeEvent, body["id"]) is not None


def test_late_events_never_move_a_payment_or_charge_backwards(stack: Stack, db: Session) -> None:
    pi_id, charge_id = paid(stack, db, amount=3100)
    settle(stack)
    late = [
        event("payment_intent.processing", pi_snapshot(pi_id, "processing", amount=3100)),
        event("payment_intent.payment_failed",
              pi_snapshot(pi_id, "requires_payment_method", amount=3100)),
        event("payment_intent.canceled", pi_snapshot(pi_id, "canceled", amount=3100)),
        event("charge.failed", {"id": charge_id, "object": "charge", "amount": 3100,
                                "amount_captured": 0, "currency": "usd", "status": "failed",
                                "payment_intent": pi_id, "disputed": False}),
        event("charge.pending", {"id": charge_id, "object": "charge", "amount": 3100,
                                 "amount_captured": 0, "currency": "usd", "status": "pending",
                                 "payment_intent": pi_id, "disputed": False}),
    ]
    for body in late:
        assert deliver(stack, body).json() == {"received": True, "outcome": "processed"}
    assert payment_state(db, pi_id) == ("succeeded", 3100)
    assert charge_state(db, charge_id) == ("succeeded", 3100, False)


def test_backward_move_of_an_unfinished_payment_follows_what_stripe_says_now(
    stack: Stack, db: Session
) -> None:
    pi = stack.stripe().v1.payment_intents.create(
        {"amount": 1800, "currency": "usd", "payment_method": "pm_card_visa"}
    )
    wait_for(lambda: payment_state(db, pi.id), what="payment_intent.created")
    assert payment_state(db, pi.id) == ("requires_confirmation", 1800)
    deliver(stack, event("payment_intent.processing", pi_snapshot(pi.id, "processing", 1800)))
    assert payment_state(db, pi.id) == ("processing", 1800)
    # An older status in an event is either late or real; the service asks Stripe, which
    # still says requires_confirmation (not the event's requires_payment_method).
    # Asking Stripe is a worker's job: the webhook stores the event and answers at once.
    late = event("payment_intent.payment_failed",
                 pi_snapshot(pi.id, "requires_payment_method", 1800))
    assert deliver(stack, late).json() == {"received": True, "outcome": "deferred"}
    wait_for(lambda: applied(db, late["id"]), what="the worker to apply the event")
    assert payment_state(db, pi.id) == ("requires_confirmation", 1800)


def test_dispute_marks_the_charge_and_the_refund_api_answers_409(
    stack: Stack, db: Session, settings: Settings
) -> None:
    _, charge_id = paid(stack, db, amount=2000, card="pm_card_createDispute")
    wait_for(lambda: (charge_state(db, charge_id) or (0, 0, False))[2], what="dispute webhook")
    before = table_counts(db)
    response = httpx.post(
        f"{stack.api_url}/v1/admin/refunds", json={"charge_id": charge_id, "full": True},
        headers=auth(settings),
    )
    assert response.status_code == 409, response.text
    assert response.json()["error"] == "charge_disputed"
    assert table_counts(db)["refunds"] == before["refunds"]


def refunds_of(db: Session, charge_id: str) -> list[tuple[str, str, int, str]]:
    rows = db.execute(
        select(Refund.stripe_refund_id, Refund.initiated_by, Refund.amount, Refund.status)
        .where(Refund.charge_id == charge_id)
        .order_by(Refund.created_at)
    )
    return [tuple(r) for r in rows]  # type: ignore[misc]


def test_refund_made_at_stripe_is_recorded_and_the_api_refuses_to_over_refund(
    stack: Stack, db: Session, settings: Settings
) -> None:
    _, charge_id = paid(stack, db, amount=5000)
    client = stack.stripe()
    outside = client.v1.refunds.create({"charge": charge_id, "amount": 3000})
    wait_for(lambda: refunds_of(db, charge_id), what="refund webhook")
    settle(stack)  # refund.created and charge.refunded both name it: still one row
    assert refunds_of(db, charge_id) == [(outside.id, "stripe", 3000, "succeeded")]

    def ask(body: dict[str, Any]) -> httpx.Response:
        return httpx.post(
            f"{stack.api_url}/v1/admin/refunds", json={"charge_id": charge_id, **body},
            headers=auth(settings),
        )

    too_much = ask({"amount_cents": 2500})
    assert too_much.status_code == 422 and too_much.json()["error"] == "amount_exceeds_refundable"
    assert "2000" in too_much.json()["message"]

    rest = client.v1.refunds.create({"charge": charge_id})
    wait_for(lambda: len(refunds_of(db, charge_id)) == 2, what="second refund webhook")
    nothing_left = ask({"full": True})
    assert nothing_left.status_code == 409 and nothing_left.json()["error"] == "already_refunded"
    settle(stack)
    assert [r[0] for r in refunds_of(db, charge_id)] == [outside.id, rest.id]


def test_refund_event_while_stripe_is_down_is_stored_then_applied_by_the_worker(
    stack: Stack, db: Session
) -> None:
    _, charge_id = paid(stack, db, amount=1200)
    stack.admin.config(webhook_url=None)  # only our own delivery below
    try:
        refund = stack.stripe().v1.refunds.create({"charge": charge_id, "amount": 200})
        body = event("refund.created", {"id": refund.id, "object": "refund"})
        stack.admin.faults(fail_next={"count": 2, "status": 503, "path_prefix": "/v1/refunds"})
        # The endpoint never waits for Stripe: it stores the event and answers.
        stored = deliver(stack, body)
        assert stored.json() == {"received": True, "outcome": "deferred"}
        assert db.get(StripeEvent, body["id"]) is not None
        # The worker's fetch fails twice (Stripe down), then succeeds on a retry.
        wait_for(lambda: applied(db, body["id"]), what="the worker to apply the event")
        assert stack.admin.stats()["faults_fired"]["fail_next"] == 2
        assert refunds_of(db, charge_id) == [(refund.id, "stripe", 200, "succeeded")]
        assert deliver(stack, body).json() == {"received": True, "outcome": "duplicate"}
    finally:
        stack.admin.clear_faults()
        stack.admin.config(webhook_url=stack.webhook_url)


def test_webhook_answers_while_stripe_hangs(stack: Stack, db: Session) -> None:
    """A refund event with Stripe taking 5 s per call is answered at once: the endpoint
    neither calls Stripe nor holds a lock while it waits."""
    _, charge_id = paid(stack, db, amount=900)
    stack.admin.config(webhook_url=None)
    try:
        refund = stack.stripe().v1.refunds.create({"charge": charge_id, "amount": 100})
        stack.admin.faults(latency_ms=5_000)
        bodies = [event("refund.updated", {"id": refund.id, "object": "refund"}),
                  event("charge.refunded", {"id": charge_id, "object": "charge"})]
        started = time.monotonic()
        outcomes = [deliver(stack, body).json()["outcome"] for body in bodies]
        assert time.monotonic() - started < 2.0
        assert outcomes == ["deferred", "deferred"]
        stack.admin.faults(latency_ms=0)
        wait_for(lambda: all(applied(db, b["id"]) for b in bodies), timeout=30,
                 what="the worker to apply both events")
        assert refunds_of(db, charge_id) == [(refund.id, "stripe", 100, "succeeded")]
    finally:
        stack.admin.clear_faults()
        stack.admin.config(webhook_url=stack.webhook_url)


def applied(db: Session, event_id: str) -> bool:
    db.expire_all()
    stored = db.get(StripeEvent, event_id)
    return stored is not None and stored.applied_at is not None


def test_refund_events_waiting_when_stripe_is_asked_are_all_applied_by_its_answer(
    stack: Stack, db: Session, settings: Settings
) -> None:
    """Stripe sends several events about one refund: the worker that fetches it applies
    every one stored before it asked, so a burst costs one Stripe request per refund,
    not one per event. Another refund's event waits for its own fetch."""
    _, charge_id = paid(stack, db, amount=900)
    stack.admin.config(webhook_url=None)
    try:
        client = stack.stripe()
        refund = client.v1.refunds.create({"charge": charge_id, "amount": 300})
        other = client.v1.refunds.create({"charge": charge_id, "amount": 100})
        about_refund = [event(kind, {"id": refund.id, "object": "refund"})
                        for kind in ("refund.created", "refund.updated", "charge.refund.updated")]
        about_other = event("refund.created", {"id": other.id, "object": "refund"})
        for body in [*about_refund, about_other]:  # stored as the endpoint stores them
            with unit_of_work() as session:
                assert stripe_events.receive_event(session=session, event=body) == "deferred"
        gateway = StripeGateway(settings.model_copy(
            update={"stripe_api_base": stack.emulator.url}), throttle=lambda: None)
        stack.admin.reset_stats()

        applied_by = stripe_events.apply_stored_event(about_refund[1]["id"], gateway=gateway)

        assert applied_by == "processed"
        assert [applied(db, b["id"]) for b in [*about_refund, about_other]] == [
            True, True, True, False]
        assert sum(stack.admin.stats()["requests"].values()) == 1
        for body in about_refund:  # their own tasks, when they come, find nothing to do
            assert stripe_events.apply_stored_event(body["id"], gateway=gateway) == (
                "already_applied")
        assert sum(stack.admin.stats()["requests"].values()) == 1
        assert stripe_events.apply_stored_event(about_other["id"], gateway=gateway) == (
            "processed")
        assert refunds_of(db, charge_id) == [(refund.id, "stripe", 300, "succeeded"),
                                             (other.id, "stripe", 100, "succeeded")]
    finally:
        stack.admin.config(webhook_url=stack.webhook_url)


def test_events_arriving_together_about_one_refund_share_one_task_and_one_stripe_request(
    stack: Stack, db: Session
) -> None:
    """Through the endpoint: the first event about a refund gets a task that waits a
    moment; those arriving meanwhile get none, and its one answer from Stripe applies
    them all. An event arriving after that task began gets a task of its own."""
    _, charge_id = paid(stack, db, amount=900)
    stack.admin.config(webhook_url=None)
    try:
        client = stack.stripe()
        refund = client.v1.refunds.create({"charge": charge_id, "amount": 300})
        other = client.v1.refunds.create({"charge": charge_id, "amount": 100})
        stack.admin.reset_stats()
        together = [event(kind, {"id": refund.id, "object": "refund"})
                    for kind in ("refund.created", "refund.updated", "charge.refund.updated")]
        together.append(event("refund.created", {"id": other.id, "object": "refund"}))
        assert [deliver(stack, body).json()["outcome"] for body in together] == [
            "deferred"] * 4
        wait_for(lambda: all(applied(db, b["id"]) for b in together), timeout=30,
                 what="the worker to apply the four events")
        assert sum(stack.admin.stats()["requests"].values()) == 2  # one a refund

        later = event("refund.updated", {"id": refund.id, "object": "refund"})
        assert deliver(stack, later).json()["outcome"] == "deferred"
        wait_for(lambda: applied(db, later["id"]), timeout=30, what="the later event")
        assert sum(stack.admin.stats()["requests"].values()) == 3
        assert refunds_of(db, charge_id) == [(refund.id, "stripe", 300, "succeeded"),
                                             (other.id, "stripe", 100, "succeeded")]
    finally:
        stack.admin.config(webhook_url=stack.webhook_url)


def test_a_coalesced_task_whose_event_was_applied_applies_the_ones_it_stands_for(
    stack: Stack, db: Session, settings: Settings
) -> None:
    """Its own event applied meanwhile (by the reconciler's resend, say), the task still
    answers for the events that arrived while it waited: they got no task of their own."""
    _, charge_id = paid(stack, db, amount=900)
    stack.admin.config(webhook_url=None)
    try:
        refund = stack.stripe().v1.refunds.create({"charge": charge_id, "amount": 300})
        first, waiting = [event(kind, {"id": refund.id, "object": "refund"})
                          for kind in ("refund.created", "refund.updated")]
        for body in (first, waiting):
            with unit_of_work() as session:
                assert stripe_events.receive_event(session=session, event=body) == "deferred"
        db.execute(update(StripeEvent).where(StripeEvent.id == first["id"])
                   .values(applied_at=func.now()))
        db.commit()
        gateway = StripeGateway(settings.model_copy(
            update={"stripe_api_base": stack.emulator.url}), throttle=lambda: None)

        assert stripe_events.apply_stored_event(first["id"], gateway=gateway) == (
            "already_applied")  # a task for this event alone has nothing to do
        assert not applied(db, waiting["id"])
        assert stripe_events.apply_stored_event(
            first["id"], gateway=gateway, coalesced=True) == "processed"
        assert applied(db, waiting["id"])
        assert refunds_of(db, charge_id) == [(refund.id, "stripe", 300, "succeeded")]
    finally:
        stack.admin.config(webhook_url=stack.webhook_url)


def test_events_about_payments_never_seen_bring_the_payment_in_from_stripe(
    stack: Stack, db: Session
) -> None:
    client = stack.stripe()
    stack.admin.config(webhook_url=None)  # only the events delivered below
    try:
        refunded = client.v1.payment_intents.create(
            {"amount": 2600, "currency": "usd", "payment_method": "pm_card_visa", "confirm": True}
        )
        refund = client.v1.refunds.create({"charge": refunded.latest_charge, "amount": 600})
        disputed = client.v1.payment_intents.create(
            {"amount": 1900, "currency": "usd", "payment_method": "pm_card_createDispute",
             "confirm": True}
        )
        dispute = client.v1.disputes.list({"charge": disputed.latest_charge}).data[0]
        bodies = (
            event("refund.created", {"id": refund.id, "object": "refund"}),
            event("charge.dispute.created", dispute.to_dict()),
        )
        for body in bodies:  # each needs Stripe: applied by the worker
            assert deliver(stack, body).json() == {"received": True, "outcome": "deferred"}
        wait_for(lambda: all(applied(db, b["id"]) for b in bodies), what="the worker")
    finally:
        stack.admin.config(webhook_url=stack.webhook_url)
    assert payment_state(db, refunded.id) == ("succeeded", 2600)
    assert charge_state(db, str(refunded.latest_charge)) == ("succeeded", 2600, False)
    assert refunds_of(db, str(refunded.latest_charge)) == [(refund.id, "stripe", 600, "succeeded")]
    assert payment_state(db, disputed.id) == ("succeeded", 1900)
    assert charge_state(db, str(disputed.latest_charge)) == ("succeeded", 1900, True)


def test_body_larger_than_the_limit_is_413(stack: Stack, settings: Settings) -> None:
    payload = b'{"pad": "' + b"x" * (settings.max_request_bytes + 1) + b'"}'
    response = deliver(stack, payload, signature="t=1,v1=00")
    assert response.status_code == 413
    assert response.json()["error"] == "request_too_large"



def test_sync_running_alongside_live_webhooks_stores_each_payment_once(
    stack: Stack, db: Session
) -> None:
    client = stack.stripe()
    sync = subprocess.Popen(
        [str(BIN / "refunds"), "payments", "sync"], env=stack.env, cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    made = [
        client.v1.payment_intents.create(
            {"amount": 1000 + i, "currency": "usd", "payment_method": "pm_card_visa",
             "confirm": True}
        )
        for i in range(15)
    ]
    _, err = sync.communicate(timeout=60)
    assert sync.returncode == 0, err
    settle(stack)
    rows = db.execute(
        select(Payment.stripe_payment_intent_id, Payment.status, Payment.amount, Charge.id)
        .join(Charge, Charge.payment_id == Payment.id)
        .where(Payment.stripe_payment_intent_id.in_([pi.id for pi in made]))
    ).all()
    assert sorted(tuple(r) for r in rows) == sorted(
        (pi.id, "succeeded", pi.amount, pi.latest_charge) for pi in made
    )


@pytest.mark.parametrize(
    "obj",
    [{"refunds": [[{}]]}, {"refunds": [{"data": [{"id": "re_x"}]}]}, {"note": "nul\x00here"}],
    ids=["objects-in-nested-lists", "objects-in-a-list", "a-nul-in-a-string"],
)
def test_an_event_whose_object_jsonb_cannot_take_as_it_came_is_stored_not_a_500(
    stack: Stack, db: Session, obj: dict[str, Any]
) -> None:
    """Found by the webhook fuzzing: the event's object is stored for the worker, and a
    signed body may carry shapes Stripe never sends."""
    body = event("charge.captured", {"id": f"ch_odd_{uuid.uuid4().hex[:12]}", **obj})
    answer = deliver(stack, body)
    assert answer.status_code == 200, answer.text
    assert db.get(StripeEvent, body["id"]) is not None
