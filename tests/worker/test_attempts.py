"""What counts as an attempt, what is definite, and the lease (SPEC 6), for real.

The refunds here are sent by calling the use case in this process (beat stopped, no
task enqueued), against the real database and the emulator over HTTP, so each step's
state can be read between the calls; the lease tests use real worker processes."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from shared.adapters.celery_app import enqueue_refund
from shared.adapters.config import get_settings
from shared.adapters.rate_limit import RateLimited
from shared.adapters.stripe_gateway import StripeGateway
from shared.services.processing import Outcome, process_refund
from tests.worker.conftest import (
    Stack,
    initiate,
    refunds_of,
    seed_payments,
    stripe_refunds_per_id,
    trail,
    wait_for,
    wait_for_statuses,
)

REFUNDS_PATH = "/v1/refunds"


def _requests(stack: Stack, what: str) -> int:
    return int(stack.admin.stats()["requests"].get(what, 0))


@pytest.fixture
def by_hand(stack: Stack) -> Iterator[None]:
    """Nothing but the test sends these refunds: beat stopped, webhooks off."""
    stack.beat.stop()
    stack.admin.config(webhook_url=None)
    yield


def _refund(stack: Stack, db: Session) -> str:
    [charge_id] = seed_payments(stack, db, 1)
    return initiate(db, charge_id)


def test_a_limiter_refusal_is_not_an_attempt_and_causes_no_lookup(
    stack: Stack, db: Session, by_hand: None
) -> None:
    refund_id = _refund(stack, db)

    def refuse() -> None:
        raise RateLimited(retry_after=0.5)

    held_back = process_refund(refund_id, gateway=StripeGateway(get_settings(), throttle=refuse))

    assert held_back.outcome is Outcome.RETRY
    row = refunds_of(db, [refund_id])[refund_id]
    assert (row.status, row.attempts, row.lease_expires_at) == ("pending", 0, None)

    sent = process_refund(refund_id)

    assert sent.outcome is Outcome.SUCCEEDED
    assert refunds_of(db, [refund_id])[refund_id].attempts == 1
    assert _requests(stack, f"GET {REFUNDS_PATH}") == 0  # no lookup: nothing had been sent
    assert _requests(stack, f"POST {REFUNDS_PATH}") == 1


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        ({"fail_next": {"status": 408, "count": 1, "method": "POST"}}, "http_408"),
        ({"fail_next": {"status": 409, "count": 1, "method": "POST"}}, "lock_timeout"),
        ({"fail_next": {"status": 400, "count": 1, "method": "POST"}}, "http_400"),
        ({"garble_after_apply_next": {"count": 1, "method": "POST"}}, "http_200"),
        ({"fail_next": {"status": 502, "count": 1, "method": "POST"}}, "http_502"),
    ],
    ids=["408", "409-lock-timeout", "400-from-a-proxy", "200-broken-body", "502"],
)
def test_an_answer_that_is_not_a_stripe_no_leaves_the_refund_pending_then_sent_once(
    stack: Stack, db: Session, by_hand: None, fault: dict[str, object], error: str
) -> None:
    refund_id = _refund(stack, db)
    stack.admin.faults(**fault)

    first = process_refund(refund_id)

    assert first.outcome is Outcome.RETRY
    row = refunds_of(db, [refund_id])[refund_id]
    assert (row.status, row.attempts, row.lease_expires_at) == ("pending", 1, None)
    assert (row.last_error or "").startswith(f"{error}: ")
    assert row.failure_reason is None

    second = process_refund(refund_id, retries=1)

    assert second.outcome is Outcome.SUCCEEDED
    assert _requests(stack, f"GET {REFUNDS_PATH}") == 1  # the second attempt looked first
    assert stripe_refunds_per_id(stack, [refund_id]) == {refund_id: 1}
    # A garbled 200 had been applied: the lookup adopted it instead of creating again.
    assert _requests(stack, f"POST {REFUNDS_PATH}") == (1 if error == "http_200" else 2)
    assert trail(db, refund_id)[-1] == ("pending", "succeeded", "worker")


def test_a_stripe_no_fails_the_refund_with_stripes_reason(
    stack: Stack, db: Session, by_hand: None
) -> None:
    [charge_id] = seed_payments(stack, db, 1)
    refund_id = initiate(db, charge_id, amount=10**9)  # more than the charge: Stripe says no

    result = process_refund(refund_id)

    assert result.outcome is Outcome.FAILED
    row = refunds_of(db, [refund_id])[refund_id]
    assert row.status == "failed"
    assert (row.failure_reason or "").startswith("amount_too_large: ")
    assert row.lease_expires_at is None


def test_a_second_delivery_stands_down_while_the_lease_is_held(
    stack: Stack, db: Session, by_hand: None
) -> None:
    refund_id = _refund(stack, db)
    lease = "UPDATE refunds SET lease_expires_at = {} WHERE id = :id"
    db.execute(text(lease.format("now() + interval '1 minute'")), {"id": refund_id})
    db.commit()

    assert process_refund(refund_id).outcome is Outcome.SKIPPED
    assert _requests(stack, f"POST {REFUNDS_PATH}") == 0

    db.execute(text(lease.format("NULL")), {"id": refund_id})  # a lapsed lease: sent at once
    db.commit()
    assert process_refund(refund_id).outcome is Outcome.SUCCEEDED


def test_a_lease_that_lapses_mid_call_never_makes_a_second_stripe_refund(
    stack: Stack, db: Session
) -> None:
    """The first worker stalls (SIGSTOP) with its create at Stripe for longer than the
    lease; the reconciler hands the refund to a second worker, which looks it up and
    adopts what the first one made. Then the first wakes up past its call's time bound
    (STRIPE_TIMEOUT_SECONDS covers the whole request), so it holds no answer: an unknown
    outcome, on a refund no longer pending."""
    stack.admin.config(webhook_url=None)
    stack.admin.faults(latency_ms=1_000)
    lease = float(stack.env["CLAIM_LEASE_SECONDS"])
    stalled = stack.worker
    [charge_id] = seed_payments(stack, db, 1)
    refund_id = initiate(db, charge_id)
    assert enqueue_refund(refund_id)
    wait_for(lambda: _requests(stack, f"POST {REFUNDS_PATH}") == 1, timeout=10,
             what="the first worker's create to reach Stripe")
    assert stalled.proc is not None
    os.killpg(stalled.proc.pid, signal.SIGSTOP)
    try:
        second = stack.new_worker("worker-second")
        second.start()
        # Stripe applies the first create a second later; the lease lapses after `lease`.
        rows = wait_for_statuses(db, [refund_id], "succeeded", timeout=lease + 20)
        assert rows[refund_id].attempts == 2
        assert _requests(stack, f"GET {REFUNDS_PATH}") >= 1  # the second worker looked first
    finally:
        os.killpg(stalled.proc.pid, signal.SIGCONT)
    stack.admin.faults(latency_ms=0)
    assert any("adopted the Stripe refund" in line and refund_id in line
               for line in second.log().splitlines())
    # The first worker wakes up with its call timed out: that changes nothing.
    wait_for(lambda: any("Stripe outcome unknown" in line and refund_id in line
                         for line in stalled.log().splitlines()),
             timeout=10, what="the first worker to give up on its call")
    assert stripe_refunds_per_id(stack, [refund_id]) == {refund_id: 1}
    assert [t for t in trail(db, refund_id) if t[0] != t[1]] == [
        (None, "pending", "support@example.com"), ("pending", "succeeded", "worker")
    ]
