"""Beat reconciliation, Stripe's asynchronous refund test cards and refund webhooks,
against the real stack (worker, beat, gunicorn, emulator)."""

from __future__ import annotations

import json
import logging
import re
import subprocess
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from emulator.webhooks import sign
from shared.adapters.celery_app import enqueue_refund
from shared.adapters.config import get_settings
from shared.adapters.db import get_engine
from shared.adapters.stripe_gateway import StripeGateway
from shared.domain.models import Refund, RefundEvent, RefundStatus
from shared.services.processing import Outcome, process_refund
from shared.services.reconcile import RECONCILE_LOCK, reconcile_once, stuck_counts
from tests.support import BIN
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


def _one_refund(stack: Stack, db: Session, payment_method: str) -> str:
    [charge_id] = seed_payments(stack, db, 1, payment_method=payment_method)
    refund_id = initiate(db, charge_id)
    assert enqueue_refund(refund_id)
    return refund_id


def test_refund_stripe_keeps_pending_is_finished_by_beat_polling(stack: Stack, db: Session) -> None:
    stack.admin.config(webhook_url=None)  # only polling can tell us
    refund_id = _one_refund(stack, db, "pm_card_pendingRefund")

    wait_for_statuses(db, [refund_id], {"processing", "succeeded"}, timeout=10)
    wait_for_statuses(db, [refund_id], "succeeded", timeout=10)

    assert trail(db, refund_id)[1:] == [
        ("pending", "processing", "worker"), ("processing", "succeeded", "reconciler")
    ]
    assert stripe_refunds_per_id(stack, [refund_id]) == {refund_id: 1}


def test_refund_failing_after_success_is_failed_by_webhook_and_replays_change_nothing(
    stack: Stack, db: Session
) -> None:
    refund_id = _one_refund(stack, db, "pm_card_refundFail")

    rows = wait_for_statuses(db, [refund_id], "failed", timeout=15)

    stripe_refund_id = rows[refund_id].stripe_refund_id
    assert (rows[refund_id].failure_reason or "").startswith("refund_failed: ")
    [_, succeeded, failed] = trail(db, refund_id)
    assert succeeded[:2] == ("pending", "succeeded")  # by the worker or the webhook
    assert failed == ("succeeded", "failed", "webhook")
    events = [
        e for e in _events(stack)
        if e["data"]["object"].get("id") == stripe_refund_id
        or e["data"]["object"].get("refund") == stripe_refund_id
    ]
    assert {e["type"] for e in events} >= {"refund.created", "refund.failed"}
    # Every event again, newest first, twice; plus a never-seen event whose snapshot
    # still says "succeeded" (a late delivery from before the failure).
    stale = next(e for e in events if e["type"] == "refund.created")
    stale = {**stale, "id": stale["id"] + "_late", "type": "refund.updated"}
    for event in [*reversed(events), *reversed(events), stale]:
        response = _deliver(stack, event)
        assert response.status_code == 200, response.text

    assert refunds_of(db, [refund_id])[refund_id].status == "failed"
    assert len(trail(db, refund_id)) == 3
    assert stripe_refunds_per_id(stack, [refund_id]) == {refund_id: 1}


def _events(stack: Stack) -> list[dict]:
    client = stack.emulator.client(stack.env["STRIPE_API_KEY"])
    return [e.to_dict() for e in client.v1.events.list({"limit": 100}).auto_paging_iter()]


def _deliver(stack: Stack, event: dict) -> httpx.Response:
    payload = json.dumps(event).encode()
    signature = sign(payload, stack.env["STRIPE_WEBHOOK_SECRET"])
    return httpx.post(stack.webhook_url, content=payload, timeout=10,
                      headers={"Stripe-Signature": signature, "Content-Type": "application/json"})


def test_two_reconcile_passes_never_overlap(stack: Stack) -> None:
    stack.beat.stop()
    with get_engine().connect() as other_pass:
        assert other_pass.scalar(select(func.pg_try_advisory_lock(*RECONCILE_LOCK)))
        try:
            assert reconcile_once() == {"skipped": True}
        finally:
            other_pass.scalar(select(func.pg_advisory_unlock(*RECONCILE_LOCK)))
            other_pass.commit()
    # A pass beat queued before it stopped may still be running in the worker.
    summary = wait_for(lambda: (s := reconcile_once())["skipped"] is False and s, timeout=10,
                       what="a reconcile pass of our own")
    assert {"reenqueued", "polled", "moved", "stuck"} <= summary.keys()


def test_refunds_unfinished_past_the_alert_threshold_are_reported_at_error_level(
    stack: Stack, db: Session, caplog: pytest.LogCaptureFixture
) -> None:
    stack.beat.stop()
    [charge_id] = seed_payments(stack, db, 1)
    refund_id = initiate(db, charge_id)
    alert = timedelta(seconds=get_settings().stuck_alert_seconds)
    # Stripe holds it as pending for hours (it never heard of this id: polling fails too).
    db.execute(update(Refund).where(Refund.id == refund_id).values(
        status=RefundStatus.PROCESSING, stripe_refund_id=f"re_lost_{refund_id}",
        created_at=datetime.now(UTC) - alert - timedelta(minutes=5)))
    db.commit()
    try:
        with caplog.at_level(logging.ERROR, logger="shared.services.reconcile"):
            summary = wait_for(lambda: (s := reconcile_once())["skipped"] is False and s,
                               timeout=10, what="a reconcile pass of our own")

        assert summary["stuck"] == 1 and summary["stuck_refund_ids"] == [refund_id]
        assert summary["poll_errors"] == 1
        assert stuck_counts(db) == {"processing": 1}
        assert any("unfinished" in r.getMessage() for r in caplog.records
                   if r.levelno == logging.ERROR)
    finally:
        db.execute(update(Refund).where(Refund.id == refund_id).values(
            status=RefundStatus.CANCELED))
        db.commit()


def test_stripe_refusing_our_key_holds_the_refund_pending_until_the_key_works(
    stack: Stack, db: Session, caplog: pytest.LogCaptureFixture
) -> None:
    [charge_id] = seed_payments(stack, db, 1)
    refund_id = initiate(db, charge_id)
    bad_key = get_settings().model_copy(update={"stripe_api_key": "sk_live_revoked"})

    with caplog.at_level(logging.ERROR, logger="shared.services.processing"):
        result = process_refund(refund_id, gateway=StripeGateway(bad_key))

    assert result.outcome is Outcome.HELD
    refund = refunds_of(db, [refund_id])[refund_id]
    assert (refund.status, refund.attempts) == ("pending", 1)
    assert (refund.last_error or "").startswith("authentication_error: ")
    assert any(r.levelno == logging.ERROR for r in caplog.records)
    assert "sk_live_revoked" not in caplog.text and "sk_live_revoked" not in refund.last_error
    held = db.scalar(select(RefundEvent.detail).where(RefundEvent.refund_id == refund_id,
                                                      RefundEvent.from_status == "pending",
                                                      RefundEvent.to_status == "pending"))
    assert held is not None and held["kind"] == "auth"
    # With a working key (the stack's), the reconciler picks it up again.
    wait_for_statuses(db, [refund_id], "succeeded", timeout=15)
    assert stripe_refunds_per_id(stack, [refund_id]) == {refund_id: 1}


def _console_overview(stack: Stack) -> str:
    from tests.support import token

    with httpx.Client(base_url=stack.api_url, timeout=10) as client:
        form = client.get("/console/login")
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
        assert csrf
        signed_in = client.post("/console/login", data={
            "csrf_token": csrf.group(1), "token": token(get_settings(), sub="oncall@example.com")})
        assert signed_in.status_code == 303, signed_in.text
        return client.get("/console/?refresh=off").text


def test_a_refund_pending_for_an_hour_is_stuck_in_the_gauge_console_and_alert_with_beat_running(
    stack: Stack, db: Session, caplog: pytest.LogCaptureFixture
) -> None:
    """One meaning of stuck (shared/domain/stuck.py). Failed before: beat's re-enqueue touches
    updated_at every STUCK_AFTER_SECONDS, and the gauge counted from updated_at, so it
    read 0 for this refund for as long as beat ran."""
    alert = timedelta(seconds=get_settings().stuck_alert_seconds)
    # Stripe answers 503 to every refund call: the refund stays pending, and beat keeps
    # re-enqueueing it (touching it) while the worker keeps trying.
    stack.admin.faults(fail_next={"status": 503, "count": 100_000, "path_prefix": "/v1/refunds"})
    [charge_id] = seed_payments(stack, db, 1)
    refund_id = initiate(db, charge_id)
    db.execute(update(Refund).where(Refund.id == refund_id).values(
        created_at=func.now() - alert - timedelta(minutes=1)))
    db.commit()
    assert enqueue_refund(refund_id)
    touched = wait_for(
        lambda: (r := refunds_of(db, [refund_id])[refund_id]).attempts >= 2
        and r.updated_at > datetime.now(UTC) - timedelta(seconds=5) and r,
        timeout=30, what="beat and the worker to keep touching the refund",
    )
    assert touched.status == "pending"

    scrape = httpx.get(f"{stack.api_url}/metrics", timeout=15).text
    stuck_pending = re.search(r'^refunds_stuck\{status="pending"\} (\S+)$', scrape, re.MULTILINE)
    assert stuck_pending and float(stuck_pending.group(1)) >= 1, scrape[-2000:]

    overview = _console_overview(stack)
    assert f"data-refund-id=\"{refund_id}\"" in overview

    with caplog.at_level(logging.ERROR, logger="shared.services.reconcile"):
        summary = wait_for(lambda: (s := reconcile_once())["skipped"] is False and s,
                           timeout=10, what="a reconcile pass of our own")
    assert refund_id in summary["stuck_refund_ids"]
    assert stuck_counts(db).get("pending", 0) >= 1
    alerts = [r for r in caplog.records
              if r.levelno == logging.ERROR and "unfinished" in r.getMessage()]
    assert alerts and refund_id in alerts[-1].refund_ids  # type: ignore[attr-defined]
    stack.admin.clear_faults()


def test_a_pass_does_not_add_the_stuck_level_to_the_actions_counter() -> None:
    """Failed before: every pass added its stuck count to
    refunds_reconcile_actions_total{action="stuck"}, a counter of what passes did."""
    from prometheus_client import REGISTRY

    from shared.adapters.metrics import observe_reconcile

    def value(action: str) -> float:
        return REGISTRY.get_sample_value(
            "refunds_reconcile_actions_total", {"action": action}
        ) or 0.0

    stuck_before, reenqueued_before = value("stuck"), value("reenqueued")
    observe_reconcile({"stuck": 3, "reenqueued": 2, "skipped": False})
    observe_reconcile({"stuck": 3, "reenqueued": 0, "skipped": False})
    assert value("stuck") == stuck_before
    assert value("reenqueued") == reenqueued_before + 2


def test_a_refund_held_max_attempts_times_waits_for_a_person_who_releases_it(
    stack: Stack, db: Session
) -> None:
    """SPEC 7. Failed before: a refund Stripe refused for credentials was re-enqueued
    every STUCK_AFTER_SECONDS for ever (an attempt, a Stripe call and an audit event
    each time), nothing counted or showed it, and `refunds reconcile --refund` did not
    exist."""
    stack.beat.stop()  # this test plays the reconciler itself
    settings = get_settings()
    bad_key = StripeGateway(settings.model_copy(update={"stripe_api_key": "sk_live_revoked"}))
    [charge_id] = seed_payments(stack, db, 1)
    refund_id = initiate(db, charge_id)
    for attempt in range(1, settings.max_attempts + 1):
        assert process_refund(refund_id, gateway=bad_key).outcome is Outcome.HELD
        refund = refunds_of(db, [refund_id])[refund_id]
        assert refund.attempts == attempt
        assert (refund.needs_attention_since is not None) == (attempt == settings.max_attempts)
    assert (refund.needs_attention_reason or "").startswith("authentication_error: ")
    events_when_marked = len(trail(db, refund_id))

    # However long it waits, the reconciler no longer sends it to the workers.
    db.execute(update(Refund).where(Refund.id == refund_id)
               .values(updated_at=func.now() - timedelta(hours=2)))
    db.commit()
    enqueued: list[str] = []
    wait_for(lambda: reconcile_once(gateway=bad_key, enqueue=lambda i: enqueued.append(i) or True)
             ["skipped"] is False, timeout=10, what="a reconcile pass of our own")
    assert refund_id not in enqueued
    assert len(trail(db, refund_id)) == events_when_marked

    # Counted in its own metric, and shown in the console.
    scrape = httpx.get(f"{stack.api_url}/metrics", timeout=15).text
    held = re.search(r"^refunds_needs_attention (\S+)$", scrape, re.MULTILINE)
    assert held and float(held.group(1)) >= 1
    overview = _console_overview(stack)
    section = overview[overview.index('id="needs-attention"'):]
    assert f'data-refund-id="{refund_id}"' in section.split("</section>")[0]

    # A person asks (the key is fixed: the stack's worker has a good one).
    asked = subprocess.run(
        [str(BIN / "refunds"), "reconcile", "--refund", refund_id, "--as", "oncall@example.com"],
        env=stack.env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert asked.returncode == 0, asked.stderr
    assert json.loads(asked.stdout) == {"refund_id": refund_id, "status": "pending",
                                        "task": "refunds.process", "enqueued": True}
    rows = wait_for_statuses(db, [refund_id], "succeeded", timeout=15)
    assert rows[refund_id].needs_attention_since is None
    asked_event = db.scalar(select(RefundEvent.detail).where(
        RefundEvent.refund_id == refund_id, RefundEvent.actor == "oncall@example.com"))
    assert asked_event == {"action": "reconcile_now", "task": "refunds.process",
                           "cleared": "needs attention"}
    assert stripe_refunds_per_id(stack, [refund_id]) == {refund_id: 1}


def test_refunds_reconcile_refund_names_what_it_cannot_find(stack: Stack) -> None:
    asked = subprocess.run(
        [str(BIN / "refunds"), "reconcile", "--refund", "rf_nosuchrefund"],
        env=stack.env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert asked.returncode == 1 and "rf_nosuchrefund" in asked.stderr
