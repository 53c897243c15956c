"""Four eyes against the real pipeline (SPEC 12): the worker, beat, the API over HTTP and
the Stripe emulator, which says what really reached Stripe.

- an approved refund is sent once; one awaiting approval is never sent, whatever asks;
- a cancel racing the worker's claim: canceled and never at Stripe, or sent and 409;
- approve racing cancel with a worker taking approved refunds at once;
- beat cancels approvals past APPROVAL_EXPIRES_SECONDS, as the reconciler;
- a refund awaiting approval waits for a person, and is never counted as stuck.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

import httpx
from sqlalchemy import func, update
from sqlalchemy.orm import Session

from shared.adapters.celery_app import enqueue_refund
from shared.adapters.db import unit_of_work
from shared.domain.models import Charge, Refund, RefundStatus, new_id
from shared.services.reconcile import reconcile_once, stuck_refund_ids
from shared.services.refunds import stripe_idempotency_key
from shared.services.transitions import record_event
from tests.api.helpers import all_at_once
from tests.support import auth
from tests.worker.conftest import (
    INITIATOR,
    Stack,
    initiate,
    refunds_of,
    seed_payments,
    send_task,
    stripe_refunds_per_id,
    trail,
    wait_for,
    wait_for_statuses,
)

APPROVER = "controller@example.com"
EXPIRES_SECONDS = 72 * 3600  # the default APPROVAL_EXPIRES_SECONDS the stack runs with


def awaiting(db: Session, charge_id: str, amount: int = 1_000) -> str:
    """A refund awaiting approval, committed as the API records one."""
    charge = db.get(Charge, charge_id)
    assert charge is not None
    refund_id = new_id("rf")
    db.add(Refund(id=refund_id, payment_id=charge.payment_id, charge_id=charge_id, amount=amount,
                  currency=charge.currency, status=RefundStatus.AWAITING_APPROVAL,
                  initiated_by=INITIATOR, approval_threshold=amount,
                  stripe_idempotency_key=stripe_idempotency_key(refund_id)))
    db.flush()
    record_event(db, refund_id=refund_id, from_status=None,
                 to_status=RefundStatus.AWAITING_APPROVAL, actor=INITIATOR)
    db.commit()
    return refund_id


def post(stack: Stack, refund_id: str, action: str, *, sub: str, scopes: tuple[str, ...],
         settings) -> httpx.Response:
    return httpx.post(f"{stack.api_url}/v1/admin/refunds/{refund_id}/{action}",
                      headers=auth(settings, sub=sub, scopes=scopes), timeout=30)


def approve(stack: Stack, settings, refund_id: str) -> httpx.Response:
    return post(stack, refund_id, "approve", sub=APPROVER, scopes=("refunds:approve",),
                settings=settings)


def cancel(stack: Stack, settings, refund_id: str) -> httpx.Response:
    return post(stack, refund_id, "cancel", sub=INITIATOR, scopes=("refunds:write",),
                settings=settings)


def worker_saw_nothing_to_send(stack: Stack, refund_id: str) -> bool:
    return any("nothing to send" in line and refund_id in line
               for line in stack.worker.log().splitlines())


def at_once(calls: list[Callable[[], object]]) -> list[object]:
    return all_at_once(len(calls), lambda i: calls[i]())


def test_an_approved_refund_is_sent_to_stripe_once_and_succeeds(
    stack: Stack, db: Session, settings
) -> None:
    [charge_id] = seed_payments(stack, db, 1)
    refund_id = awaiting(db, charge_id)

    resp = approve(stack, settings, refund_id)

    assert resp.status_code == 200, resp.text
    assert resp.json()["status"] == "pending"
    wait_for_statuses(db, [refund_id], "succeeded", timeout=15)
    assert stripe_refunds_per_id(stack, [refund_id]) == {refund_id: 1}
    steps = trail(db, refund_id)
    assert steps[:2] == [
        (None, "awaiting_approval", INITIATOR),
        ("awaiting_approval", "pending", APPROVER),
    ]
    # The worker records Stripe's answer, unless Stripe's webhook got there first.
    assert steps[2:] in ([("pending", "succeeded", "worker")],
                         [("pending", "succeeded", "webhook")]), steps


def test_a_refund_awaiting_approval_is_never_sent_whatever_names_it(
    stack: Stack, db: Session
) -> None:
    [charge_id] = seed_payments(stack, db, 1)
    refund_id = awaiting(db, charge_id)

    # A task that names it (a stray message, a person's mistake), twice, and a reconcile pass.
    assert enqueue_refund(refund_id)
    send_task(stack.env["REDIS_URL"], refund_id)
    reconcile_once()
    wait_for(lambda: worker_saw_nothing_to_send(stack, refund_id), timeout=15,
             what="the worker to take the task and find nothing to send")

    row = refunds_of(db, [refund_id])[refund_id]
    assert (row.status, row.attempts) == ("awaiting_approval", 0)
    assert stripe_refunds_per_id(stack, [refund_id]) == {refund_id: 0}


def test_cancel_against_the_workers_claim_is_one_or_the_other_never_both(
    stack: Stack, db: Session, settings
) -> None:
    """Each refund is enqueued and canceled at the same moment. Either the cancel wins:
    200, canceled, nothing at Stripe; or the claim wins: 409 cannot_cancel, and the
    refund is sent once and succeeds."""
    charge_ids = seed_payments(stack, db, 16)
    ids = [initiate(db, charge_id) for charge_id in charge_ids]
    calls: list[Callable[[], object]] = []
    for refund_id in ids:
        calls += [partial(enqueue_refund, refund_id),
                  partial(cancel, stack, settings, refund_id)]

    answers = at_once(calls)

    canceled = {ids[i // 2] for i, a in enumerate(answers)
                if isinstance(a, httpx.Response) and a.status_code == 200}
    refused = {ids[i // 2]: a for i, a in enumerate(answers) if isinstance(a, httpx.Response)
               and a.status_code != 200}
    for response in refused.values():
        assert response.status_code == 409, response.text
        assert response.json()["error"] == "cannot_cancel"
        message = response.json()["message"]
        assert any(why in message for why in ("already been sent", "Stripe already holds",
                                              "is finished")), message
    assert canceled | set(refused) == set(ids)

    if refused:
        wait_for_statuses(db, list(refused), "succeeded", timeout=20)
    wait_for(lambda: all(worker_saw_nothing_to_send(stack, i) for i in canceled), timeout=20,
             what="the worker to take every canceled refund's task and send nothing")
    rows = refunds_of(db, ids)
    at_stripe = stripe_refunds_per_id(stack, ids)
    for refund_id in canceled:
        assert rows[refund_id].status == "canceled" and rows[refund_id].attempts == 0
        assert at_stripe[refund_id] == 0, refund_id
        assert trail(db, refund_id)[1:] == [("pending", "canceled", INITIATOR)]
    for refund_id in refused:
        assert at_stripe[refund_id] == 1, refund_id
    print(f"\ncancel against claim: {len(canceled)} canceled first, {len(refused)} sent first")


def test_approve_against_cancel_with_a_worker_ends_one_way(
    stack: Stack, db: Session, settings
) -> None:
    """Canceled: never at Stripe. Not canceled: approved, sent once, cancel refused."""
    charge_ids = seed_payments(stack, db, 8)
    ids = [awaiting(db, charge_id) for charge_id in charge_ids]
    results = {}
    for refund_id in ids:
        results[refund_id] = at_once([partial(approve, stack, settings, refund_id),
                                      partial(cancel, stack, settings, refund_id)])

    for refund_id, (approved, canceled) in results.items():
        assert isinstance(approved, httpx.Response) and isinstance(canceled, httpx.Response)
        if canceled.status_code == 200:
            rows = wait_for_statuses(db, [refund_id], "canceled", timeout=5)
            assert rows[refund_id].attempts == 0
        else:
            assert canceled.status_code == 409 and approved.status_code == 200, (
                approved.text, canceled.text)
            wait_for_statuses(db, [refund_id], "succeeded", timeout=20)
    time.sleep(1)  # any task an approval enqueued has been taken by now
    rows = refunds_of(db, ids)
    at_stripe = stripe_refunds_per_id(stack, ids)
    for refund_id in ids:
        assert at_stripe[refund_id] == (0 if rows[refund_id].status == "canceled" else 1)


def test_beat_cancels_approvals_past_their_expiry_as_the_reconciler(
    stack: Stack, db: Session
) -> None:
    charge_ids = seed_payments(stack, db, 2)
    old, fresh = awaiting(db, charge_ids[0]), awaiting(db, charge_ids[1])
    db.execute(update(Refund).where(Refund.id == old).values(
        created_at=func.now() - func.make_interval(0, 0, 0, 0, 0, 0, EXPIRES_SECONDS + 60)))
    db.commit()

    rows = wait_for_statuses(db, [old], "canceled", timeout=15)

    assert (rows[old].decision, rows[old].decided_by) == ("expired", "reconciler")
    assert rows[old].decided_at is not None
    assert trail(db, old)[-1] == ("awaiting_approval", "canceled", "reconciler")
    assert refunds_of(db, [fresh])[fresh].status == "awaiting_approval"
    assert stripe_refunds_per_id(stack, [old, fresh]) == {old: 0, fresh: 0}


def test_a_refund_awaiting_approval_for_hours_is_not_stuck(stack: Stack, db: Session) -> None:
    [charge_id] = seed_payments(stack, db, 1)
    refund_id = awaiting(db, charge_id)
    db.execute(update(Refund).where(Refund.id == refund_id).values(
        created_at=func.now() - func.make_interval(0, 0, 0, 0, 5)))  # 5 hours
    db.commit()
    with unit_of_work() as session:
        assert refund_id not in stuck_refund_ids(session, limit=10_000)
    reconcile_once()
    assert refunds_of(db, [refund_id])[refund_id].status == "awaiting_approval"
