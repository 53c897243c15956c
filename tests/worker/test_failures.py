"""Every failure mode of SPEC 5-7, caused for real, against real processes.

Each test breaks something (Stripe answers 5xx or 429, a request times out, the
connection drops after Stripe applied the refund, the worker is SIGKILLed, Redis
loses the queue, a message is delivered twice, Stripe forgets idempotency keys) and
checks the end state: every refund reaches the right status, and the emulator holds
exactly one Stripe refund per refund id.

Where a test must prove that the worker or the reconciler (not a webhook) did the
work, the emulator's webhooks are switched off for it.
"""

from __future__ import annotations

import subprocess
import time

import redis
from sqlalchemy.orm import Session

from shared.adapters.celery_app import REFUNDS_QUEUE, enqueue_refund
from shared.domain.models import RefundStatus
from shared.services.processing import Outcome, process_refund
from shared.services.refunds import stripe_idempotency_key
from shared.services.transitions import transition
from tests.support import BIN
from tests.worker.conftest import (
    FAST_SETTINGS,
    Stack,
    beat_process,
    initiate,
    refunds_of,
    seed_payments,
    send_task,
    stripe_refunds_per_id,
    trail,
    wait_for,
    wait_for_statuses,
)

STUCK_AFTER = float(FAST_SETTINGS["STUCK_AFTER_SECONDS"])
INTERVAL = float(FAST_SETTINGS["RECONCILE_INTERVAL_SECONDS"])
MAX_ATTEMPTS = int(FAST_SETTINGS["MAX_ATTEMPTS"])
REFUNDS_PATH = "/v1/refunds"


def _refunds(stack: Stack, db: Session, count: int, *, enqueue: bool = True) -> list[str]:
    ids = [initiate(db, charge_id) for charge_id in seed_payments(stack, db, count)]
    if enqueue:
        for refund_id in ids:
            assert enqueue_refund(refund_id)
    return ids


def _creates(stack: Stack) -> int:
    """POST /v1/refunds requests the emulator received since the test began."""
    return int(stack.admin.stats()["requests"].get(f"POST {REFUNDS_PATH}", 0))


def _webhooks_off(stack: Stack) -> None:
    stack.admin.config(webhook_url=None)


def test_stripe_5xx_for_a_while_then_recovering_sends_each_refund_once(
    stack: Stack, db: Session
) -> None:
    stack.admin.faults(fail_next={"status": 503, "count": 6, "path_prefix": REFUNDS_PATH})
    ids = _refunds(stack, db, 4)

    rows = wait_for_statuses(db, ids, "succeeded", timeout=20)

    assert stack.admin.stats()["faults_fired"]["fail_next"] == 6
    assert stripe_refunds_per_id(stack, ids) == {i: 1 for i in ids}
    assert sum(r.attempts for r in rows.values()) > len(ids)  # the 503s were retried


def test_stripe_429s_are_backed_off_never_failed(stack: Stack, db: Session) -> None:
    stack.admin.faults(rate_limit_rps=4)
    ids = _refunds(stack, db, 8)

    rows = wait_for_statuses(db, ids, {"succeeded", "failed"}, timeout=30)

    assert stack.admin.stats()["rate_limited"] > 0
    assert {r.status for r in rows.values()} == {"succeeded"}
    assert stripe_refunds_per_id(stack, ids) == {i: 1 for i in ids}


def test_request_that_times_out_is_retried_and_sent_once(stack: Stack, db: Session) -> None:
    # The emulator hangs past the client's STRIPE_TIMEOUT_SECONDS and applies nothing.
    stack.admin.faults(timeout_next={"count": 1, "seconds": 3, "method": "POST",
                                     "path_prefix": REFUNDS_PATH})
    _webhooks_off(stack)
    [refund_id] = _refunds(stack, db, 1)

    rows = wait_for_statuses(db, [refund_id], "succeeded", timeout=20)

    assert stack.admin.stats()["faults_fired"]["timeout_next"] == 1
    assert rows[refund_id].attempts == 2
    assert "connection_error" in (rows[refund_id].last_error or "")
    assert stripe_refunds_per_id(stack, [refund_id]) == {refund_id: 1}


def test_connection_dropped_after_stripe_applied_the_refund_is_adopted_not_resent(
    stack: Stack, db: Session
) -> None:
    stack.admin.faults(drop_after_apply_next={"count": 1, "method": "POST",
                                              "path_prefix": REFUNDS_PATH})
    _webhooks_off(stack)
    [refund_id] = _refunds(stack, db, 1)

    rows = wait_for_statuses(db, [refund_id], "succeeded", timeout=20)

    assert stack.admin.stats()["faults_fired"]["drop_after_apply_next"] == 1
    assert stripe_refunds_per_id(stack, [refund_id]) == {refund_id: 1}
    # The second attempt found the refund by metadata.refund_id instead of creating again.
    assert _creates(stack) == 1
    assert rows[refund_id].attempts == 2
    assert rows[refund_id].stripe_refund_id == stack.admin.refunds(refund_id)[0]["id"]


def test_refund_is_not_duplicated_after_stripe_forgets_the_idempotency_key(
    stack: Stack, db: Session
) -> None:
    # Stripe applies the create but the answer is lost; every lookup then fails, so the
    # worker gives up and leaves the refund pending for the reconciler...
    stack.admin.faults(
        drop_after_apply_next={"count": 1, "method": "POST", "path_prefix": REFUNDS_PATH},
        fail_next={"status": 500, "count": 10_000, "method": "GET", "path_prefix": REFUNDS_PATH},
    )
    _webhooks_off(stack)
    [refund_id] = _refunds(stack, db, 1)
    wait_for(lambda: any(e[1] == "pending" and e[0] == "pending" for e in trail(db, refund_id)),
             timeout=20, what="the worker to leave the refund to the reconciler")
    assert refunds_of(db, [refund_id])[refund_id].attempts >= MAX_ATTEMPTS
    # ...and meanwhile Stripe forgets the key (24 h pass), so a new create would succeed.
    assert stack.admin.forget_idempotency_keys() >= 1
    stack.admin.clear_faults()

    # The killed worker's lease keeps the refund from everyone until it lapses.
    lease = float(stack.env["CLAIM_LEASE_SECONDS"])
    rows = wait_for_statuses(db, [refund_id], "succeeded", timeout=lease + STUCK_AFTER + 15)

    assert stripe_refunds_per_id(stack, [refund_id]) == {refund_id: 1}
    assert _creates(stack) == 1
    assert rows[refund_id].attempts > MAX_ATTEMPTS


def test_worker_sigkilled_mid_stripe_call_is_recovered_and_refund_sent_once(
    stack: Stack, db: Session
) -> None:
    _webhooks_off(stack)
    stack.admin.faults(latency_ms=2_000)
    [refund_id] = _refunds(stack, db, 1)
    wait_for(lambda: _creates(stack) == 1, timeout=10, what="the create to reach Stripe")

    stack.worker.kill()  # mid-call: Stripe will apply the refund, nobody hears the answer
    stack.admin.faults(latency_ms=0)
    wait_for(lambda: stripe_refunds_per_id(stack, [refund_id])[refund_id] == 1, timeout=10,
             what="Stripe to apply the refund")
    assert refunds_of(db, [refund_id])[refund_id].status == "pending"
    stack.worker.start()

    # The killed worker's lease keeps the refund from everyone until it lapses.
    lease = float(stack.env["CLAIM_LEASE_SECONDS"])
    rows = wait_for_statuses(db, [refund_id], "succeeded", timeout=lease + STUCK_AFTER + 15)

    assert stripe_refunds_per_id(stack, [refund_id]) == {refund_id: 1}
    assert _creates(stack) == 1
    assert rows[refund_id].attempts == 2
    assert trail(db, refund_id)[-1] == ("pending", "succeeded", "worker")


def test_refunds_queued_in_a_flushed_redis_are_recovered_by_beat(
    stack: Stack, db: Session
) -> None:
    broker = stack.own_redis()
    own = redis.Redis.from_url(broker)
    env = {**stack.env, "REDIS_URL": broker}
    ids = _refunds(stack, db, 5, enqueue=False)
    for refund_id in ids:
        send_task(broker, refund_id)
    assert own.llen(REFUNDS_QUEUE) == len(ids)

    own.flushall()  # the queue is gone; the pending rows are all that is left
    lost_at = time.monotonic()
    assert own.llen(REFUNDS_QUEUE) == 0
    stack.new_worker("worker-own-redis", env).start()
    stack.process("beat-own-redis", beat_process(env, stack.log_dir).argv, env).start()

    wait_for_statuses(db, ids, "succeeded", timeout=STUCK_AFTER + 2 * INTERVAL + 10)
    recovered_in = time.monotonic() - lost_at

    assert stripe_refunds_per_id(stack, ids) == {i: 1 for i in ids}
    # Stuck after STUCK_AFTER, re-enqueued by one of the next two passes (plus start-up).
    assert recovered_in < STUCK_AFTER + 2 * INTERVAL + 6, recovered_in


def test_same_task_delivered_twice_at_once_sends_one_refund(stack: Stack, db: Session) -> None:
    second = stack.new_worker("worker-second").start()
    _webhooks_off(stack)
    stack.admin.faults(latency_ms=1_000)  # both deliveries are in flight together
    [refund_id] = _refunds(stack, db, 1, enqueue=False)
    broker = stack.env["REDIS_URL"]
    for _ in range(3):
        send_task(broker, refund_id)

    rows = wait_for_statuses(db, [refund_id], "succeeded", timeout=15)

    assert stripe_refunds_per_id(stack, [refund_id]) == {refund_id: 1}
    assert _creates(stack) == 1
    assert rows[refund_id].attempts == 1  # the copies stood down before claiming
    assert [e for e in trail(db, refund_id) if e[2] == "worker"] == [
        ("pending", "succeeded", "worker")
    ]
    # They overlapped the first one's Stripe call and stood down at its lease.
    wait_for(lambda: (stack.worker.log() + second.log()).count("nothing to send") >= 2,
             timeout=5, what="the extra deliveries to finish")


def test_definite_4xx_fails_the_refund_with_stripes_code_and_message(
    stack: Stack, db: Session
) -> None:
    [charge_id] = seed_payments(stack, db, 1, amount=5_000)
    too_large = initiate(db, charge_id, amount=6_000)  # more than the charge
    assert enqueue_refund(too_large)

    rows = wait_for_statuses(db, [too_large], "failed", timeout=15)

    reason = rows[too_large].failure_reason or ""
    assert reason.startswith("amount_too_large: ")
    assert "greater than" in reason or "exceed" in reason
    assert stripe_refunds_per_id(stack, [too_large]) == {too_large: 0}
    assert trail(db, too_large)[-1] == ("pending", "failed", "worker")


def test_charge_already_refunded_elsewhere_is_looked_up_then_failed(
    stack: Stack, db: Session
) -> None:
    _webhooks_off(stack)  # our service does not hear of the dashboard refund
    [charge_id] = seed_payments(stack, db, 1, amount=5_000)
    stack.emulator.client(stack.env["STRIPE_API_KEY"]).v1.refunds.create({"charge": charge_id})
    [refund_id] = [initiate(db, charge_id, amount=1_000)]
    stack.admin.reset_stats()
    assert enqueue_refund(refund_id)

    rows = wait_for_statuses(db, [refund_id], "failed", timeout=15)

    assert (rows[refund_id].failure_reason or "").startswith("charge_already_refunded: ")
    assert stack.admin.stats()["requests"].get(f"GET {REFUNDS_PATH}", 0) >= 1  # looked up
    assert stripe_refunds_per_id(stack, [refund_id]) == {refund_id: 0}


def test_reconcile_once_from_the_command_line_reports_its_pass(stack: Stack, db: Session) -> None:
    result = subprocess.run(
        [str(BIN / "refunds"), "reconcile", "--once"], env=stack.env, capture_output=True,
        text=True, timeout=30, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert '"skipped"' in result.stdout


def test_idempotency_key_used_with_other_parameters_holds_the_refund_never_fails_it(
    stack: Stack, db: Session
) -> None:
    stack.beat.stop()  # this refund is driven by hand below
    [charge_id] = seed_payments(stack, db, 1)
    refund_id = initiate(db, charge_id)
    # Something else spent our refund's key at Stripe: a bug, and nobody knows what
    # that request did, so the refund must not be called failed.
    stack.emulator.client(stack.env["STRIPE_API_KEY"]).v1.payment_intents.create(
        {"amount": 100, "currency": "usd"},
        {"idempotency_key": stripe_idempotency_key(refund_id)},
    )
    try:
        result = process_refund(refund_id)

        assert result.outcome is Outcome.HELD
        refund = refunds_of(db, [refund_id])[refund_id]
        assert refund.status == "pending"
        assert (refund.last_error or "").startswith("idempotency_error: ")
        assert stripe_refunds_per_id(stack, [refund_id]) == {refund_id: 0}
    finally:
        transition(db, refund_id, RefundStatus.CANCELED, actor="tests")
        db.commit()
