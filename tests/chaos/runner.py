"""Chaos runner: a steady stream of refunds while the pipeline is broken on purpose.

    python -m tests.chaos.runner                 # the long run (make chaos)
    python -m tests.chaos.runner --short         # what make test runs, about a minute
    python -m tests.chaos.runner --duration 600 --rate 10 --seed 7 --logs ./chaos-logs

Everything runs as real processes on infrastructure of the run's own: a Postgres
cluster (``initdb`` in a temporary directory, on a free port), a redis-server, the
Stripe emulator, gunicorn, Celery workers and beat. Callers POST refunds over HTTP at
a steady rate, retrying unknown outcomes with the same Idempotency-Key, while the
runner, on a seeded schedule:

- SIGKILLs a worker (and starts a replacement, as a supervisor would);
- kills and restarts Redis: the queue and every unacknowledged task are lost;
- crashes and restarts Postgres: every open connection breaks;
- makes Stripe answer 5xx, 429 (a rate limit), hang past the client's timeout, or
  apply a refund and drop the connection before answering.

Then faults stop, the pipeline drains, and ``tests.chaos.oracle`` holds what the
callers were told against Postgres and against Stripe. It prints a summary table and
exits 1 on any duplicate, lost refund, over-refund, status mismatch or audit gap.
Refunds still unfinished after the drain are listed as stuck (reported, not hidden).
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
from sqlalchemy import Engine, create_engine, select
from sqlalchemy.orm import Session

from shared.domain.models import TERMINAL_STATUSES, Charge, Payment, Refund, new_id
from tests.chaos.oracle import Verdict, settle, verify
from tests.chaos.stack import Pipeline, PostgresCluster, running_pipeline
from tests.chaos.traffic import Ledger, RefundClient
from tests.support import RedisServer

FAULT_KINDS = (
    "worker_kill", "redis_restart", "postgres_restart",
    "stripe_5xx", "stripe_429", "stripe_timeout", "stripe_drop_after_apply",
)
SUBS = ("chaos-support@example.com", "chaos-console@example.com", "chaos-script@example.com")
#: Test cards and their share of payments: most refunds succeed at once, some stay
#: pending at Stripe a while, a few succeed and then fail.
CARDS = (("pm_card_visa", 0.85), ("pm_card_pendingRefund", 0.10), ("pm_card_refundFail", 0.05))
PAYMENT_AMOUNT = 50_000


@dataclass(frozen=True)
class Fault:
    at: float  # seconds into the stream
    kind: str


@dataclass
class Scenario:
    duration: float
    rate: float  # refunds offered per second
    seed: int
    faults: list[Fault]
    clients: int = 6
    payments: int = 60
    workers: int = 2
    web_workers: int = 2
    drain_timeout: float = 120.0

    @classmethod
    def short(cls, seed: int) -> Scenario:
        """Every kind of fault once, about three seconds apart, in a seeded order."""
        kinds = list(FAULT_KINDS)
        random.Random(seed).shuffle(kinds)
        faults = [Fault(3.0 + 3.0 * i, kind) for i, kind in enumerate(kinds)]
        return cls(duration=faults[-1].at + 4.0, rate=5.0, seed=seed, faults=faults,
                   payments=40, drain_timeout=60.0)

    @classmethod
    def long(cls, seed: int, duration: float, rate: float) -> Scenario:
        """A fault every 4-8 s; each kind comes round once per cycle, in a new order."""
        rng = random.Random(seed)
        faults: list[Fault] = []
        at = 3.0
        while at < duration - 5.0:
            kinds = list(FAULT_KINDS)
            rng.shuffle(kinds)
            for kind in kinds:
                if at >= duration - 5.0:
                    break
                faults.append(Fault(round(at, 1), kind))
                at += rng.uniform(4.0, 8.0)
        payments = max(60, int(duration * rate / 25))
        return cls(duration=duration, rate=rate, seed=seed, faults=faults, payments=payments)


@dataclass
class Injected:
    fault: Fault
    wall_time: float
    detail: str
    recovered: bool = False


@dataclass
class Report:
    scenario: Scenario
    verdict: Verdict
    ledger: Ledger
    injected: list[Injected]
    emulator_stats: dict[str, Any]
    dead_processes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    log_dir: Path | None = None

    @property
    def ok(self) -> bool:
        return self.verdict.ok and not self.dead_processes

    def table(self) -> str:
        v, stats = self.verdict, self.emulator_stats
        fired = stats.get("faults_fired", {})
        fired_by_kind = {
            "stripe_5xx": fired.get("fail_next", 0),
            "stripe_429": stats.get("rate_limited", 0),
            "stripe_timeout": fired.get("timeout_next", 0),
            "stripe_drop_after_apply": fired.get("drop_after_apply_next", 0),
        }
        injected = Counter(i.fault.kind for i in self.injected)
        recovered = Counter(i.fault.kind for i in self.injected if i.recovered)
        statuses = self.ledger.statuses()
        retried = sum(self.ledger.unknown_outcomes.values())
        rows = [
            f"chaos run: seed {self.scenario.seed}, {self.scenario.duration:.0f} s of traffic at "
            f"{self.scenario.rate:g}/s, {self.scenario.workers} workers, "
            f"{self.seconds:.0f} s in all",
            "",
            f"{'fault':<28}{'injected':>9}{'fired':>8}{'recovered':>11}",
        ]
        for kind in FAULT_KINDS:
            shown = fired_by_kind.get(kind, "-")
            rows.append(f"{kind:<28}{injected[kind]:>9}{shown!s:>8}{recovered[kind]:>11}")
        rows += [
            f"{'all faults':<28}{sum(injected.values()):>9}{'':>8}{sum(recovered.values()):>11}",
            "",
            f"{'requests sent (POST)':<36}{len(self.ledger.answers):>8}",
            f"{'  answered 201 (new + replayed)':<36}{statuses['201']:>8}",
            f"{'  refused (4xx)':<36}"
            f"{sum(n for s, n in statuses.items() if s[0] == '4'):>8}",
            f"{'  retried after 5xx / no answer':<36}{retried:>8}",
            f"{'  never answered':<36}{statuses['no answer']:>8}",
            f"{'refunds sent (distinct, acknowledged)':<36}{v.acknowledged:>8}",
            f"{'refunds in the service':<36}{v.refunds:>8}  {v.by_status}",
            f"{'refunds at Stripe':<36}{v.stripe_refunds:>8}",
            f"{'refunds disrupted by a fault':<36}{v.disrupted:>8}",
            f"{'  of which recovered (terminal)':<36}{v.recovered:>8}",
            f"{'stuck (reported below)':<36}{len(v.stuck):>8}",
            f"{'duplicates':<36}{len(v.duplicates):>8}",
            f"{'lost':<36}{len(v.lost):>8}",
            f"{'over-refunds':<36}{len(v.over_refunded):>8}",
            f"{'status mismatches':<36}{len(v.mismatched):>8}",
            f"{'audit gaps':<36}{len(v.audit_gaps):>8}",
            f"{'processes that died by themselves':<36}{len(self.dead_processes):>8}",
        ]
        for name, items in [*v.violations.items(), ("stuck", v.stuck),
                            ("dead processes", self.dead_processes)]:
            for item in items[:20]:
                rows.append(f"  {name}: {item}")
        rows += ["", f"result: {'OK' if self.ok else 'VIOLATIONS'}"]
        if self.log_dir is not None:
            rows.append(f"logs: {self.log_dir}")
        return "\n".join(rows)


def base_env() -> dict[str, str]:
    """Secrets of the run's own; the processes read nothing else from the caller."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "REDIS_",
                                                                   "CELERY_", "STRIPE_", "JWT_"))}
    env |= {
        "JWT_SECRET": f"chaos-{secrets.token_hex(24)}",
        "STRIPE_API_KEY": f"sk_test_chaos_{secrets.token_hex(12)}",
        "STRIPE_WEBHOOK_SECRET": f"whsec_chaos_{secrets.token_hex(12)}",
        "PYTHONUNBUFFERED": "1",
    }
    return env


def bearer(env: dict[str, str], sub: str) -> str:
    now = int(time.time())
    claims = {"sub": sub, "scope": "refunds:read refunds:write", "iat": now, "exp": now + 86_400}
    return jwt.encode(claims, env["JWT_SECRET"], algorithm="HS256")


# -- the run ------------------------------------------------------------------------


def run(
    scenario: Scenario,
    *,
    log_dir: Path,
    out: Callable[[str], None] = print,
    inspect: Callable[[Pipeline, Engine, Ledger], None] | None = None,
) -> Report:
    """Run one scenario end to end and return what the oracle found. ``inspect`` is
    called with everything still running, after the verdict (tests use it)."""
    started = time.monotonic()
    env = base_env()
    cluster = PostgresCluster()
    redis_server = RedisServer(log_dir)
    engine: Engine | None = None
    try:
        cluster.start()
        database_url = cluster.create_database("refunds")
        engine = create_engine(database_url, pool_pre_ping=True)
        out(f"chaos: postgres :{cluster.port}, redis :{redis_server.port}, logs {log_dir}")
        with running_pipeline(env, database_url=database_url, redis_url=redis_server.url,
                              log_dir=log_dir, web_workers=scenario.web_workers,
                              workers=scenario.workers, beat=True) as pipeline:
            # Stripe's webhooks keep trying through a Postgres restart.
            pipeline.admin.config(webhook_max_attempts=8, webhook_retry_base=0.5)
            payments = _seed(pipeline, engine, scenario)
            ledger = Ledger()
            injector = Injector(pipeline, redis_server, cluster, random.Random(scenario.seed), out)
            _stream(pipeline, env, scenario, payments, ledger, injector)
            out("chaos: traffic stopped; faults cleared; draining")
            dead = _restore(pipeline, scenario)
            _answer_the_unanswered(pipeline, env, ledger)
            settle(engine, pipeline.admin, timeout=scenario.drain_timeout)
            verdict = verify(engine, pipeline.admin, ledger)
            _mark_recovered(engine, injector.injected)
            report = Report(scenario=scenario, verdict=verdict, ledger=ledger,
                            injected=injector.injected, emulator_stats=pipeline.admin.stats(),
                            dead_processes=dead, log_dir=log_dir)
            if inspect is not None:
                inspect(pipeline, engine, ledger)
    finally:
        if engine is not None:
            engine.dispose()
        redis_server.stop()
        cluster.destroy()
    report.seconds = time.monotonic() - started
    return report


def _seed(pipeline: Pipeline, engine: Engine, scenario: Scenario) -> list[str]:
    """Payments made at Stripe and stored as payments sync would; their charge ids."""
    rng = random.Random(scenario.seed)
    charges: list[str] = []
    with Session(engine) as db:
        for card, share in CARDS:
            count = max(1, round(scenario.payments * share))
            seeded = pipeline.admin.seed(count, amount=PAYMENT_AMOUNT, payment_method=card)
            for pi_id, charge_id in zip(seeded["payment_intents"], seeded["charges"],
                                        strict=True):
                payment = Payment(id=new_id("pay"), stripe_payment_intent_id=pi_id,
                                  amount=PAYMENT_AMOUNT, currency="usd", status="succeeded")
                db.add(payment)
                db.flush()
                db.add(Charge(id=charge_id, payment_id=payment.id, amount=PAYMENT_AMOUNT,
                              currency="usd", status="succeeded"))
                charges.append(charge_id)
        db.commit()
    rng.shuffle(charges)
    return charges


def _stream(
    pipeline: Pipeline, env: dict[str, str], scenario: Scenario, charges: list[str],
    ledger: Ledger, injector: Injector,
) -> None:
    stop = threading.Event()
    start = time.monotonic()
    interval = scenario.clients / scenario.rate

    def caller(index: int) -> None:
        sub = SUBS[index % len(SUBS)]
        rng = random.Random(f"{scenario.seed}-{index}")
        client = RefundClient(pipeline.api_url, bearer(env, sub), sub, ledger,
                              give_up_after=45.0)
        sent: list[tuple[str, dict[str, Any]]] = []
        next_at = time.monotonic() + rng.uniform(0, interval)
        try:
            while not stop.is_set():
                time.sleep(max(0.0, next_at - time.monotonic()))
                next_at += interval
                if sent and rng.random() < 0.1:
                    key, body = rng.choice(sent)  # a caller sending the same request again
                else:
                    charge_id = rng.choice(charges)
                    body = ({"charge_id": charge_id, "full": True} if rng.random() < 0.05 else
                            {"charge_id": charge_id, "amount_cents": rng.randint(50, 2_000)})
                    key = f"chaos-{uuid.uuid4().hex[:16]}"
                sent.append((key, body))
                client.create(body, key)
        finally:
            client.close()

    threads = [threading.Thread(target=caller, args=(i,), name=f"caller-{i}", daemon=True)
               for i in range(scenario.clients)]
    for thread in threads:
        thread.start()
    try:
        for fault in scenario.faults:
            time.sleep(max(0.0, start + fault.at - time.monotonic()))
            injector.inject(fault)
        time.sleep(max(0.0, start + scenario.duration - time.monotonic()))
    finally:
        stop.set()
        pipeline.admin.clear_faults()
        for thread in threads:
            thread.join(120)


class Injector:
    def __init__(self, pipeline: Pipeline, redis_server: RedisServer, cluster: PostgresCluster,
                 rng: random.Random, out: Callable[[str], None]) -> None:
        self.pipeline = pipeline
        self.redis = redis_server
        self.cluster = cluster
        self.rng = rng
        self.out = out
        self.injected: list[Injected] = []

    def inject(self, fault: Fault) -> None:
        wall = time.time()
        detail = getattr(self, f"_{fault.kind}")()
        self.injected.append(Injected(fault, wall, detail))
        self.out(f"chaos: t={fault.at:5.1f}s {fault.kind}: {detail}")

    def _worker_kill(self) -> str:
        index = self.rng.randrange(len(self.pipeline.workers))
        killed = self.pipeline.kill_worker(index)
        replacement = self.pipeline.start_worker()
        return f"SIGKILL {killed.name} (pid {killed.proc.pid}); started {replacement.name}"

    def _redis_restart(self) -> str:
        self.redis.kill()
        time.sleep(1.0)
        self.redis.start()
        return "redis-server SIGKILLed, down 1 s, started empty"

    def _postgres_restart(self) -> str:
        self.cluster.restart(down_seconds=1.5)
        return "postgres crashed (immediate stop), down 1.5 s, restarted"

    def _stripe_5xx(self) -> str:
        status = self.rng.choice((500, 502, 503))
        self.pipeline.admin.faults(fail_next={"status": status, "count": 6,
                                              "path_prefix": "/v1/refunds"})
        return f"next 6 refund calls answer {status}"

    def _stripe_429(self) -> str:
        self.pipeline.admin.faults(rate_limit_rps=2)
        time.sleep(3.0)
        self.pipeline.admin.faults(rate_limit_rps=None)
        return "Stripe rate limit of 2 requests/s for 3 s"

    def _stripe_timeout(self) -> str:
        self.pipeline.admin.faults(timeout_next={"count": 3, "seconds": 3,
                                                 "path_prefix": "/v1/refunds", "method": "POST"})
        return "next 3 refund creates hang 3 s (client timeout 2 s), not applied"

    def _stripe_drop_after_apply(self) -> str:
        self.pipeline.admin.faults(drop_after_apply_next={
            "count": 4, "path_prefix": "/v1/refunds", "method": "POST"})
        return "next 4 refund creates applied, connection dropped before the answer"


def _restore(pipeline: Pipeline, scenario: Scenario) -> list[str]:
    """Faults are over: report processes that died by themselves, replace dead workers."""
    dead = []
    for proc in [pipeline.web, pipeline.beat, *pipeline.workers]:
        if proc is not None and proc.proc is not None and proc.proc.poll() is not None:
            dead.append(f"{proc.name} exited {proc.proc.returncode} ({proc.log_path.name})")
    for index in reversed(range(len(pipeline.workers))):
        worker = pipeline.workers[index].proc
        if worker is not None and worker.poll() is not None:
            pipeline.workers.pop(index)
    while len(pipeline.workers) < scenario.workers:
        pipeline.start_worker()
    return dead


def _answer_the_unanswered(pipeline: Pipeline, env: dict[str, str], ledger: Ledger) -> None:
    """A careful caller asks again, with the same key, about anything left unanswered."""
    for answer in ledger.unanswered():
        client = RefundClient(pipeline.api_url, bearer(env, answer.sub), answer.sub, ledger,
                              give_up_after=30.0)
        try:
            client.create(answer.body, answer.key)
        finally:
            client.close()


def _mark_recovered(engine: Engine, injected: list[Injected]) -> None:
    """A fault is recovered from when a refund asked for after it has finished."""
    with Session(engine) as db:
        rows = db.execute(select(Refund.created_at, Refund.status)).all()
    finished = sorted(created.timestamp() for created, status in rows
                      if status in TERMINAL_STATUSES)
    for item in injected:
        item.recovered = any(t > item.wall_time for t in finished)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.runner", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", action="store_true",
                        help="every fault once, about a minute (what make test runs)")
    parser.add_argument("--duration", type=float, default=240.0,
                        help="seconds of traffic (default 240)")
    parser.add_argument("--rate", type=float, default=8.0, help="refunds per second (default 8)")
    parser.add_argument("--seed", type=int, default=None, help="replay a run's schedule")
    parser.add_argument("--logs", type=Path, default=None,
                        help="keep the processes' logs here (default: a temporary directory, "
                             "kept only when the run finds a violation)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    scenario = (Scenario.short(seed) if args.short
                else Scenario.long(seed, args.duration, args.rate))
    log_dir = args.logs or Path(tempfile.mkdtemp(prefix="refunds-chaos-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"chaos: {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC, seed {seed}, "
          f"{len(scenario.faults)} faults over {scenario.duration:.0f} s", flush=True)
    report = run(scenario, log_dir=log_dir, out=lambda line: print(line, flush=True))
    print(report.table(), flush=True)
    if report.ok and args.logs is None:
        shutil.rmtree(log_dir, ignore_errors=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
