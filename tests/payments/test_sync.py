"""`refunds payments sync` as operators run it: a real process against the emulator.

Webhooks are switched off in this module so the sync is the only way in."""

from __future__ import annotations

import json
import subprocess

import pytest
import stripe
from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.domain.models import Charge, Payment, Refund
from tests.payments.conftest import Stack
from tests.support import BIN, ROOT, table_counts

SEEDED = 250  # more than two pages of 100


@pytest.fixture(scope="module")
def stripe_account(stack: Stack) -> dict[str, object]:
    """What Stripe holds before any sync: seeded payments, a declined one, a charge made
    without a PaymentIntent, and a refund made in Stripe's dashboard."""
    stack.admin.config(webhook_url=None)
    seeded = stack.admin.seed(SEEDED, amount=1500)
    client = stack.stripe()
    with pytest.raises(stripe.CardError) as declined:
        client.v1.payment_intents.create(
            {"amount": 900, "currency": "usd", "payment_method": "pm_card_chargeDeclined",
             "confirm": True}
        )
    legacy = client.v1.charges.create({"amount": 700, "currency": "usd", "source": "tok_visa"})
    dashboard_refund = client.v1.refunds.create({"charge": seeded["charges"][0], "amount": 400})
    stack.admin.reset_stats()
    return {
        "payment_intents": seeded["payment_intents"],
        "charges": seeded["charges"],
        "declined_pi": declined.value.json_body["error"]["payment_intent"]["id"],  # type: ignore[index]
        "legacy_charge": legacy.id,
        "dashboard_refund": dashboard_refund.id,
    }


def run_sync(stack: Stack) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(BIN / "refunds"), "payments", "sync"],
        env=stack.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def finish(proc: subprocess.Popen[str]) -> dict:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_sync_backfills_every_page_and_two_concurrent_runs_store_each_object_once(
    stack: Stack, stripe_account: dict, db: Session
) -> None:
    first, second = run_sync(stack), run_sync(stack)
    results = [finish(first), finish(second)]

    total_pis = SEEDED + 1  # and the declined one
    total_charges = SEEDED + 2  # and the declined one's failed charge, and the legacy charge
    assert sum(r["payment_intents"]["inserted"] for r in results) == total_pis
    assert sum(r["charges"]["inserted"] for r in results) == total_charges
    assert all(r["payment_intents"]["seen"] == total_pis for r in results)
    requests = stack.admin.stats()["requests"]
    # Two runs, each paging through three pages of PaymentIntents and of charges.
    assert requests["GET /v1/payment_intents"] == 2 * 3
    assert requests["GET /v1/charges"] == 2 * 3

    payments = {
        p.stripe_payment_intent_id: p
        for p in db.scalars(
            select(Payment).where(Payment.stripe_payment_intent_id.in_(stripe_account["payment_intents"]))
        )
    }
    assert len(payments) == SEEDED
    assert {(p.status, p.amount, p.currency) for p in payments.values()} == {
        ("succeeded", 1500, "usd")
    }
    charges = list(db.scalars(select(Charge).where(Charge.id.in_(stripe_account["charges"]))))
    assert len(charges) == SEEDED
    assert {c.payment_id for c in charges} == {p.id for p in payments.values()}
    assert {(c.status, c.amount, c.disputed) for c in charges} == {("succeeded", 1500, False)}

    declined = db.scalar(
        select(Payment).where(Payment.stripe_payment_intent_id == stripe_account["declined_pi"])
    )
    assert declined is not None and declined.status == "requires_payment_method"
    failed_charge = db.scalar(select(Charge).where(Charge.payment_id == declined.id))
    assert failed_charge is not None
    assert (failed_charge.status, failed_charge.amount) == ("failed", 0)

    legacy = db.get(Charge, stripe_account["legacy_charge"])
    assert legacy is not None and (legacy.status, legacy.amount) == ("succeeded", 700)
    legacy_payment = db.get(Payment, legacy.payment_id)
    assert legacy_payment is not None
    assert legacy_payment.stripe_payment_intent_id is None
    assert (legacy_payment.status, legacy_payment.amount) == ("succeeded", 700)

    by_stripe_id = Refund.stripe_refund_id == stripe_account["dashboard_refund"]
    recorded = list(db.scalars(select(Refund).where(by_stripe_id)))
    assert [(r.initiated_by, r.amount, r.status, r.charge_id) for r in recorded] == [
        ("stripe", 400, "succeeded", stripe_account["charges"][0])
    ]


def test_sync_run_again_changes_nothing(stack: Stack, stripe_account: dict, db: Session) -> None:
    finish(run_sync(stack))  # whatever ran before, this run brings everything in
    before = table_counts(db)
    again = finish(run_sync(stack))
    counts = {kind: {k: v for k, v in again[kind].items() if k != "seconds"}
              for kind in ("payment_intents", "charges", "refunds")}
    assert counts == {
        "payment_intents": {"seen": SEEDED + 1, "inserted": 0, "updated": 0},
        "charges": {"seen": SEEDED + 2, "inserted": 0, "updated": 0},
        "refunds": {"seen": 1, "unmatched": 0},
    }
    assert table_counts(db) == before


def test_sync_goes_on_where_it_was_when_stripe_rate_limits_it(
    stack: Stack, stripe_account: dict
) -> None:
    stack.admin.reset_stats()
    # One request a second, no burst: the page right after another is always refused.
    stack.admin.faults(rate_limit_rps=1)
    try:
        result = finish(run_sync(stack))
    finally:
        stack.admin.clear_faults()
    assert stack.admin.stats()["responses"].get("429", 0) > 0
    assert result["payment_intents"]["seen"] == SEEDED + 1
    assert result["charges"]["seen"] == SEEDED + 2
