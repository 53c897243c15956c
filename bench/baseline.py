"""The raw baseline: ``python -m bench.baseline ...``.

The database work and the enqueue of one refund initiation, with nothing else: no web
framework, no ORM, no validation, no auth. Each of ``--threads`` threads has its own
psycopg connection and Redis client and, for each payment of its share, in one
transaction: locks the payment row, sums its refunds that still hold money, inserts
the refund and its audit event, commits; then LPUSHes a Celery-sized message (a copy
of a real ``refunds.process`` message) to a throwaway list. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import secrets
import sys
import threading
import time
from typing import Any

import psycopg
import redis

from bench.loadgen import latency_summary

THROWAWAY_LIST = "bench:baseline"
ACTOR = "bench-baseline"

LOCK = "SELECT amount, currency, status FROM payments WHERE id = %s FOR UPDATE"
HELD = (
    "SELECT coalesce(sum(amount), 0) FROM refunds "
    "WHERE payment_id = %s AND status NOT IN ('failed', 'canceled')"
)
INSERT_REFUND = (
    "INSERT INTO refunds (id, payment_id, charge_id, amount, currency, status, reason, "
    "stripe_idempotency_key, initiated_by) VALUES (%s, %s, %s, %s, %s, 'pending', %s, %s, %s)"
)
INSERT_EVENT = (
    "INSERT INTO refund_events (refund_id, from_status, to_status, actor, detail) "
    "VALUES (%s, NULL, 'pending', %s, %s::jsonb)"
)


def worker(
    args: argparse.Namespace,
    payments: list[tuple[str, str]],
    message: str,
    deadline: float,
    out: dict[str, Any],
) -> None:
    latencies: list[float] = []
    errors = 0
    client = redis.Redis.from_url(args.redis_url)
    with psycopg.connect(args.dsn) as conn:
        for payment_id, charge_id in itertools.cycle(payments):
            if time.perf_counter() >= deadline:
                break
            started = time.perf_counter()
            refund_id = f"rf_{secrets.token_hex(12)}"
            try:
                with conn.cursor() as cur:
                    row = cur.execute(LOCK, (payment_id,)).fetchone()
                    assert row is not None and row[2] == "succeeded"
                    held = cur.execute(HELD, (payment_id,)).fetchone()
                    assert held is not None
                    if row[0] - held[0] < args.amount:
                        raise ValueError("nothing left")
                    cur.execute(INSERT_REFUND, (
                        refund_id, payment_id, charge_id, args.amount, row[1],
                        "requested_by_customer", f"refund-{refund_id}", ACTOR,
                    ))
                    detail = json.dumps(
                        {"amount": args.amount, "reason": "requested_by_customer", "full": False}
                    )
                    cur.execute(INSERT_EVENT, (refund_id, ACTOR, detail))
                conn.commit()
                client.lpush(THROWAWAY_LIST, message.replace("{refund_id}", refund_id))
            except (psycopg.Error, redis.RedisError, ValueError):
                conn.rollback()
                errors += 1
                continue
            latencies.append(time.perf_counter() - started)
    out["latencies"] = latencies
    out["errors"] = errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline", description=__doc__)
    parser.add_argument("--dsn", required=True, help="libpq URL of the service's database")
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--payments", required=True, help="file: 'payment_id charge_id' lines")
    parser.add_argument("--message", required=True,
                        help="file: a Celery message, '{refund_id}' where the id goes")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--amount", type=int, default=100)
    args = parser.parse_args(argv)
    with open(args.payments) as f:
        payments = [tuple(line.split()[:2]) for line in f if line.strip()]
    with open(args.message) as f:
        message = f.read()

    results: list[dict[str, Any]] = [{} for _ in range(args.threads)]
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    deadline = started + args.duration
    threads = [
        threading.Thread(
            target=worker,
            args=(args, payments[i :: args.threads] or payments, message, deadline, results[i]),
        )
        for i in range(args.threads)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    latencies = [x for r in results for x in r.get("latencies", [])]
    redis.Redis.from_url(args.redis_url).delete(THROWAWAY_LIST)
    cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    json.dump(
        {
            "threads": args.threads,
            "seconds": round(wall, 3),
            "ops": len(latencies),
            "errors": sum(r.get("errors", 0) for r in results),
            "ops_per_s": round(len(latencies) / wall, 1),
            "latency_ms": latency_summary(latencies),
            "message_bytes": len(message),
            "script_cpu_cores": round(cpu / wall, 3),
        },
        sys.stdout,
    )
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
