"""What must hold at the end of any run, whatever broke during it (SPEC 1, 3.1, 5).

The oracle compares three independent records: what the clients were told (the
``Ledger``), what the service holds (Postgres), and what Stripe holds (the emulator's
admin API, which the service cannot touch):

- duplicate: one refund id with two Stripe refunds, or one Idempotency-Key that
  produced two refunds, or a replay that answered another body;
- lost: a refund a client was told about that the service does not hold, a Stripe
  refund the service does not know, a refund the service calls succeeded that
  Stripe does not hold as succeeded for that amount, or a refund no client was told
  about;
- over-refund: a payment whose refunds that are not failed or canceled add up to more
  than was captured, in the service or at Stripe;
- audit gap: a refund whose trail does not start at ``pending``, skips a step, or does
  not end at its current status;
- stuck: not terminal after the drain; allowed, but listed by id with its last error.
"""

from __future__ import annotations

import itertools
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from emulator.testing import Admin
from shared.domain.models import (
    RELEASED_STATUSES,
    TERMINAL_STATUSES,
    Charge,
    Payment,
    Refund,
    RefundEvent,
)
from tests.chaos.traffic import Ledger, fingerprint

#: Our status -> the Stripe statuses that agree with it.
AGREEING = {
    "succeeded": {"succeeded"},
    "failed": {"failed", None},  # refused before Stripe made one, or failed later
    "canceled": {"canceled", None},
    "processing": {"pending"},
    "requires_action": {"requires_action"},
    "pending": {None, "pending", "succeeded", "failed"},  # not sent yet, or answer not kept
}


@dataclass
class Verdict:
    refunds: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    stripe_refunds: int = 0
    acknowledged: int = 0
    disrupted: int = 0
    recovered: int = 0
    duplicates: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    over_refunded: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    audit_gaps: list[str] = field(default_factory=list)
    stuck: list[str] = field(default_factory=list)

    @property
    def violations(self) -> dict[str, list[str]]:
        return {
            "duplicates": self.duplicates,
            "lost": self.lost,
            "over-refunds": self.over_refunded,
            "status mismatches": self.mismatched,
            "audit gaps": self.audit_gaps,
        }

    @property
    def ok(self) -> bool:
        return not any(self.violations.values())


def settle(engine: Engine, admin: Admin, *, timeout: float, quiet: float = 3.0) -> bool:
    """Wait until every refund is terminal, Stripe has delivered its webhooks, and each
    Stripe refund's status agrees with ours, and all of that has held for ``quiet``
    seconds: a refund can still fail at Stripe a while after it succeeded (a test card
    does so after a delay), which no state visible now announces. False if that did not
    happen within ``timeout``."""
    deadline = time.monotonic() + timeout
    agreed_since: float | None = None
    while True:
        with Session(engine) as session:
            ours = {row.id: row.status for row in session.execute(
                select(Refund.id, Refund.status))}
        theirs = {(sr.get("metadata") or {}).get("refund_id"): sr.get("status")
                  for sr in admin.refunds()}
        agree = (
            all(status in TERMINAL_STATUSES for status in ours.values())
            and admin.webhook_deliveries()["pending"] == 0
            and all(theirs.get(refund_id) in AGREEING[status]
                    for refund_id, status in ours.items())
        )
        now = time.monotonic()
        agreed_since = (agreed_since or now) if agree else None
        if agreed_since is not None and now - agreed_since >= quiet:
            return True
        if now > deadline:
            return False
        time.sleep(0.25)


def verify(engine: Engine, admin: Admin, ledger: Ledger) -> Verdict:
    verdict = Verdict()
    with Session(engine) as session:
        refunds = {r.id: r for r in session.scalars(select(Refund))}
        payments = {p.id: p for p in session.scalars(select(Payment))}
        charges = {c.id: c for c in session.scalars(select(Charge))}
        events: dict[str, list[RefundEvent]] = defaultdict(list)
        for event in session.scalars(select(RefundEvent).order_by(RefundEvent.id)):
            events[event.refund_id].append(event)
    stripe_refunds = admin.refunds()
    verdict.refunds = len(refunds)
    verdict.stripe_refunds = len(stripe_refunds)
    statuses: dict[str, int] = defaultdict(int)
    for refund in refunds.values():
        statuses[refund.status] += 1
    verdict.by_status = dict(sorted(statuses.items()))

    _check_answers(verdict, ledger, refunds)
    by_refund_id = _check_stripe_side(verdict, stripe_refunds, refunds, charges)
    by_stripe_id = {sr["id"]: sr for sr in stripe_refunds}
    for refund in refunds.values():
        # A refund recorded from Stripe (made outside the service) has no metadata of ours.
        stripe_refund = by_refund_id.get(refund.id) or by_stripe_id.get(
            refund.stripe_refund_id or "")
        _check_refund(verdict, refund, stripe_refund, events[refund.id])
    _check_amounts(verdict, refunds, payments)
    return verdict


def _check_answers(verdict: Verdict, ledger: Ledger, refunds: dict[str, Refund]) -> None:
    acknowledged = ledger.acknowledged()
    verdict.acknowledged = len(acknowledged)
    per_key: dict[tuple[str, str], set[str]] = defaultdict(set)
    first_body: dict[tuple[str, str], str] = {}
    for answer in ledger.answers:
        if answer.status != 201:
            continue
        ident = (answer.sub, answer.key)
        per_key[ident].add(answer.refund_id or "")
        body = fingerprint(answer.body)
        if first_body.setdefault(ident, body) != body:
            verdict.duplicates.append(
                f"key {answer.key!r} of {answer.sub} answered 201 to two different bodies")
    for (sub, key), ids in per_key.items():
        if len(ids) > 1:
            verdict.duplicates.append(
                f"key {key!r} of {sub} made {len(ids)} refunds: {sorted(ids)}")
    for refund_id in acknowledged:
        if refund_id not in refunds:
            verdict.lost.append(f"{refund_id}: answered 201 but not in the database")
    for refund_id, refund in refunds.items():
        if refund_id not in acknowledged and refund.initiated_by != "stripe":
            verdict.lost.append(f"{refund_id}: in the database, but no caller was ever told")


def _check_stripe_side(
    verdict: Verdict, stripe_refunds: list[dict[str, Any]], refunds: dict[str, Refund],
    charges: dict[str, Charge],
) -> dict[str, dict[str, Any]]:
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    held_at_stripe: dict[str, int] = defaultdict(int)
    for sr in stripe_refunds:
        ours = (sr.get("metadata") or {}).get("refund_id")
        if sr.get("status") in ("pending", "succeeded", "requires_action"):
            held_at_stripe[str(sr.get("charge"))] += int(sr["amount"])
        if ours is None or ours not in refunds:
            by_stripe_id = [r for r in refunds.values() if r.stripe_refund_id == sr["id"]]
            if not by_stripe_id:
                verdict.lost.append(f"Stripe refund {sr['id']} ({ours}): unknown to the service")
            continue
        grouped[ours].append(sr)
    for refund_id, found in grouped.items():
        if len(found) > 1:
            verdict.duplicates.append(
                f"{refund_id}: {len(found)} Stripe refunds {[s['id'] for s in found]}")
    for charge_id, held in held_at_stripe.items():
        charge = charges.get(charge_id)
        if charge is not None and held > charge.amount:
            verdict.over_refunded.append(
                f"charge {charge_id}: Stripe holds {held} refunded of {charge.amount}")
    return {refund_id: found[0] for refund_id, found in grouped.items()}


def _check_refund(
    verdict: Verdict, refund: Refund, stripe_refund: dict[str, Any] | None,
    trail: list[RefundEvent],
) -> None:
    stripe_status = None if stripe_refund is None else stripe_refund.get("status")
    if stripe_status not in AGREEING.get(refund.status, set()):
        text = f"{refund.id}: ours {refund.status}, Stripe {stripe_status}"
        (verdict.lost if refund.status == "succeeded" else verdict.mismatched).append(text)
    if stripe_refund is not None and int(stripe_refund["amount"]) != refund.amount:
        verdict.mismatched.append(
            f"{refund.id}: ours {refund.amount}, Stripe {stripe_refund['amount']}")
    if refund.status not in TERMINAL_STATUSES:
        verdict.stuck.append(f"{refund.id} {refund.status} attempts={refund.attempts} "
                             f"last_error={refund.last_error!r}")
    disrupted = refund.attempts > 1 or refund.last_error is not None
    verdict.disrupted += disrupted
    verdict.recovered += disrupted and refund.status in TERMINAL_STATUSES
    _check_trail(verdict, refund, trail)


def _check_trail(verdict: Verdict, refund: Refund, trail: list[RefundEvent]) -> None:
    if not trail:
        verdict.audit_gaps.append(f"{refund.id}: no audit events")
        return
    first = trail[0]
    if refund.initiated_by != "stripe" and (
        first.from_status is not None or first.to_status != "pending"
        or first.actor != refund.initiated_by
    ):
        verdict.audit_gaps.append(
            f"{refund.id}: trail starts {first.from_status}->{first.to_status} by {first.actor}")
    for before, after in itertools.pairwise(trail):
        if after.from_status != before.to_status or not after.actor:
            verdict.audit_gaps.append(
                f"{refund.id}: {before.to_status} then {after.from_status}->{after.to_status}")
    if trail[-1].to_status != refund.status:
        verdict.audit_gaps.append(
            f"{refund.id}: trail ends at {trail[-1].to_status}, refund is {refund.status}")


def _check_amounts(
    verdict: Verdict, refunds: dict[str, Refund], payments: dict[str, Payment]
) -> None:
    held: dict[str, int] = defaultdict(int)
    for refund in refunds.values():
        if refund.status not in RELEASED_STATUSES:
            held[refund.payment_id] += refund.amount
    for payment_id, amount in held.items():
        captured = payments[payment_id].amount
        if amount > captured:
            verdict.over_refunded.append(f"payment {payment_id}: {amount} refunded of {captured}")
