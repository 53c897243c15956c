"""The short chaos run (``python -m tests.chaos.runner --short``), as a test: every kind
of fault once while refunds flow; nothing doubled, lost, over-refunded or unaudited,
and nothing left stuck once the faults stop. ``make chaos`` runs the long one.

The oracle is then shown to catch each kind of violation, planted for real in the
still-running pipeline: a second Stripe refund for one refund, an answer for a refund
the service does not hold, a refund beyond the captured amount, a refund without its
audit trail.
"""

from __future__ import annotations

import random
from dataclasses import replace

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from shared.domain.models import Refund, RefundStatus, new_id
from tests.chaos.oracle import verify
from tests.chaos.runner import FAULT_KINDS, Scenario, run
from tests.chaos.stack import Pipeline
from tests.chaos.traffic import Answer, Ledger

SEED = random.randrange(2**31)


def plant_violations(found: dict, pipeline: Pipeline, engine: Engine, ledger: Ledger) -> None:
    with Session(engine, expire_on_commit=False) as db:
        victim = db.scalars(select(Refund).where(Refund.status == "succeeded").limit(1)).one()
        # Money out twice: a second Stripe refund carrying the same refund id (on a charge
        # of its own: the victim's may have nothing left).
        [charge_id] = pipeline.admin.seed(1, amount=100)["charges"]
        pipeline.emulator.client(pipeline.env["STRIPE_API_KEY"]).v1.refunds.create(
            {"charge": charge_id, "amount": 1, "metadata": {"refund_id": victim.id}})
        # A refund beyond the payment, and with no audit trail.
        db.add(Refund(id=new_id("rf"), payment_id=victim.payment_id, charge_id=victim.charge_id,
                      amount=10**9, currency="usd", status=RefundStatus.PENDING,
                      initiated_by="planted@example.com",
                      stripe_idempotency_key=f"refund-planted-{victim.id}"))
        db.commit()
    # A caller told about a refund the service does not hold.
    told = Ledger(answers=[*ledger.answers, Answer("planted@example.com", "planted-key",
                                                   {"charge_id": "ch_x", "full": True}, 201,
                                                   refund_id="rf_never_stored", amount=1)])
    found["verdict"] = verify(engine, pipeline.admin, told)


def test_short_chaos_run_loses_nothing_doubles_nothing_over_refunds_nothing(tmp_path) -> None:
    found: dict = {}
    scenario = Scenario.short(SEED)
    report = run(scenario, log_dir=tmp_path, out=print,
                 inspect=lambda *args: plant_violations(found, *args))
    print(report.table())

    assert report.ok, report.table()
    assert not report.verdict.stuck, report.table()
    assert {i.fault.kind for i in report.injected} == set(FAULT_KINDS)
    assert all(i.recovered for i in report.injected), report.table()
    fired = report.emulator_stats["faults_fired"]
    assert fired.get("fail_next") and fired.get("timeout_next") and fired.get(
        "drop_after_apply_next"), fired
    assert report.verdict.acknowledged >= 50 and report.verdict.by_status.get("succeeded")
    assert report.verdict.disrupted > 0 and report.verdict.recovered == report.verdict.disrupted

    planted = found["verdict"]
    assert not planted.ok
    assert any("2 Stripe refunds" in d for d in planted.duplicates), planted.duplicates
    assert any("rf_never_stored" in item for item in planted.lost), planted.lost
    assert planted.over_refunded, planted
    assert any("no audit events" in g for g in planted.audit_gaps), planted.audit_gaps
    assert replace(planted, duplicates=[], lost=[], over_refunded=[], audit_gaps=[],
                   mismatched=[]).ok
