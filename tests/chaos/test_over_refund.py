"""Over-refund under concurrency (SPEC 1, 3.1, 3.4): seeded-random mixes of partial and
full refunds from many concurrent callers over real HTTP, on a gunicorn with four
processes, with Idempotency-Keys repeated (the same request again, the same key for
another body, and storms of one key sent by every thread at once); then a Celery worker
drains everything against the Stripe emulator.

Afterwards, for every payment, the refunds that are not failed or canceled add up to at
most what was captured, and the emulator's refunds are the service's succeeded refunds
one for one, by ``metadata.refund_id`` and amount (see ``tests.chaos.oracle``).

The seed is random per run and printed with any failure; OVER_REFUND_SEED=n replays one,
OVER_REFUND_ROUNDS=n (default 10) makes the run longer.
"""

from __future__ import annotations

import os
import random
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, select
from sqlalchemy.orm import Session

from shared.domain.models import Charge, Payment, Refund
from tests.chaos.oracle import settle, verify
from tests.chaos.stack import Pipeline, PostgresCluster, running_pipeline
from tests.chaos.traffic import Ledger, RefundClient
from tests.support import RedisServer, seed_emulator_payments, token

SEED = int(os.environ.get("OVER_REFUND_SEED", random.randrange(2**32)))
SUBS = ("support-a@example.com", "support-b@example.com", "script@example.com")
THREADS_PER_SUB = 8
ROUNDS = int(os.environ.get("OVER_REFUND_ROUNDS", "10"))
#: (test card, how many payments) - pendingRefund: Stripe holds the refund ``pending``
#: a while; refundFail: it succeeds, then fails and gives the amount back.
CARDS = (("pm_card_visa", 6), ("pm_card_pendingRefund", 2), ("pm_card_refundFail", 2))
#: Longer runs get more payments, so they do not all end up fully refunded early on.
SCALE = max(1, ROUNDS // 10)


@dataclass(frozen=True)
class Target:
    payment_id: str
    payment_intent_id: str
    charge_id: str
    amount: int

    def name(self, rng: random.Random) -> str:
        """The same payment, named any of the three ways the API accepts."""
        return rng.choice((self.charge_id, self.payment_intent_id, self.payment_id))


@pytest.fixture(scope="module")
def busy_pipeline(
    service_env: dict[str, str], log_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pipeline]:
    # A cluster of its own: four web processes' pools must not meet the connection
    # limit of a Postgres that other test runs share.
    cluster = PostgresCluster()
    redis_server = RedisServer(tmp_path_factory.mktemp("over-refund-redis"))
    try:
        cluster.start()
        database_url = cluster.create_database("refunds")
        with running_pipeline(service_env, database_url=database_url, redis_url=redis_server.url,
                              log_dir=log_dir, web_workers=4, workers=1, beat=True,
                              card_delay=0.5) as pipeline:
            yield pipeline
    finally:
        redis_server.stop()
        cluster.destroy()


@pytest.fixture(scope="module")
def engine(busy_pipeline: Pipeline) -> Iterator[Engine]:
    engine = create_engine(busy_pipeline.env["DATABASE_URL"])
    yield engine
    engine.dispose()


def seed_targets(pipeline: Pipeline, engine: Engine, rng: random.Random) -> list[Target]:
    targets = []
    with Session(engine, expire_on_commit=False) as db:
        for card, count in CARDS:
            for _ in range(count * SCALE):
                amount = rng.randrange(5_000, 50_000)
                [charge_id] = seed_emulator_payments(pipeline, db, 1, amount=amount,
                                                     payment_method=card)
                payment = db.scalars(
                    select(Payment).join(Charge).where(Charge.id == charge_id)).one()
                targets.append(Target(payment.id, str(payment.stripe_payment_intent_id),
                                      charge_id, amount))
    return targets


class Caller:
    """One thread's requests, drawn from its own seeded generator."""

    def __init__(self, client: RefundClient, rng: random.Random, targets: list[Target]) -> None:
        self.client = client
        self.rng = rng
        self.targets = targets
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def pick(self) -> Target:
        # A few hot payments take most of the traffic: that is where races are.
        hot = self.targets[:3 * SCALE]
        return self.rng.choice(hot if self.rng.random() < 0.6 else self.targets)

    def new_body(self) -> dict[str, Any]:
        target = self.pick()
        if self.rng.random() < 0.04:
            return {"charge_id": target.name(self.rng), "full": True}
        return {"charge_id": target.name(self.rng),
                "amount_cents": self.rng.randint(1, target.amount // 30)}

    def one_request(self) -> None:
        roll = self.rng.random()
        if self.sent and roll < 0.2:
            key, body = self.rng.choice(self.sent)  # the same request again
        elif self.sent and roll < 0.3:
            key, _ = self.rng.choice(self.sent)  # the same key for another body
            body = self.new_body()
        else:
            key, body = f"k-{uuid.uuid4().hex[:12]}", self.new_body()
        self.sent.append((key, body))
        self.client.create(body, key)


def test_racing_partial_and_full_refunds_never_over_refund_and_match_stripe_one_for_one(
    busy_pipeline: Pipeline, engine: Engine, settings
) -> None:
    rng = random.Random(SEED)
    targets = seed_targets(busy_pipeline, engine, rng)
    ledger = Ledger()
    threads = len(SUBS) * THREADS_PER_SUB
    callers = [
        Caller(RefundClient(busy_pipeline.api_url, token(settings, sub=SUBS[i % len(SUBS)]),
                            SUBS[i % len(SUBS)], ledger, give_up_after=0),
               random.Random(rng.random()), targets)
        for i in range(threads)
    ]
    barrier = threading.Barrier(threads)
    # Storm rounds: every thread of a caller sends one shared key and body at once.
    storms = {r: {sub: (f"storm-{uuid.uuid4().hex[:8]}", {"charge_id": targets[0].name(rng),
                                                        "amount_cents": rng.randint(1, 300)})
                  for sub in SUBS}
              for r in range(ROUNDS) if rng.random() < 0.3}

    def run(index: int) -> None:
        caller = callers[index]
        for round_no in range(ROUNDS):
            barrier.wait(timeout=60)
            if round_no in storms:
                key, body = storms[round_no][caller.client.sub]
                caller.client.create(body, key)
            else:
                caller.one_request()

    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(run, range(threads)))
    finally:
        for caller in callers:
            caller.client.close()

    context = f"seed {SEED} (OVER_REFUND_SEED={SEED} replays it)"
    assert not ledger.unknown_outcomes, f"{context}: 5xx or no answer {ledger.unknown_outcomes}"
    answers = ledger.statuses()
    assert set(answers) <= {"201", "409 already_refunded", "422 amount_exceeds_refundable",
                            "422 idempotency_key_reused"}, f"{context}: {answers}"
    assert answers["201"] > 0 and len(ledger.answers) == threads * ROUNDS

    settled = settle(engine, busy_pipeline.admin, timeout=90)
    verdict = verify(engine, busy_pipeline.admin, ledger)
    assert settled, f"{context}: the service and Stripe did not agree within 90 s: {verdict}"
    assert verdict.ok and not verdict.stuck, f"{context}: {verdict}"

    ours = _succeeded_pairs(engine)
    theirs = {(sr["metadata"]["refund_id"], sr["amount"])
              for sr in busy_pipeline.admin.refunds() if sr["status"] == "succeeded"}
    assert ours == theirs, f"{context}: only ours {ours - theirs}, only Stripe's {theirs - ours}"
    print(f"\nover-refund: seed {SEED}, {len(ledger.answers)} requests from {threads} callers, "
          f"answers {dict(answers)}, refunds {verdict.by_status}, "
          f"Stripe refunds {verdict.stripe_refunds}, storms {len(storms)}, "
          f"duplicates {len(verdict.duplicates)}, lost {len(verdict.lost)}, "
          f"over-refunds {len(verdict.over_refunded)}")


def _succeeded_pairs(engine: Engine) -> set[tuple[str, int]]:
    with Session(engine) as db:
        return {(r.id, r.amount) for r in db.scalars(
            select(Refund).where(Refund.status == "succeeded"))}
