"""The Stripe request budget is one budget for all processes (SPEC 6)."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest
import redis
from prometheus_client import REGISTRY
from sqlalchemy.orm import Session

from shared.adapters.rate_limit import RateLimited, StripeRateLimiter
from tests.support import ROOT
from tests.worker.conftest import (
    Stack,
    initiate,
    seed_payments,
    send_task,
    stripe_refunds_per_id,
    wait_for,
    wait_for_statuses,
)

_HAMMER = """
import json, sys, time
import redis
from shared.adapters.rate_limit import StripeRateLimiter
url, key, rate, count = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
limiter = StripeRateLimiter(redis.Redis.from_url(url), rate=rate, key=key, max_wait=30)
stamps = []
for _ in range(count):
    limiter.acquire()
    stamps.append(time.time())
print(json.dumps(stamps))
"""


def test_processes_sharing_the_bucket_together_stay_under_the_rate(
    service_env: dict[str, str],
) -> None:
    rate, per_process, processes = 40.0, 40, 3
    key = f"tests:rate-limit:{uuid.uuid4().hex}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _HAMMER, service_env["REDIS_URL"], key, str(rate),
             str(per_process)],
            env=service_env, cwd=ROOT, stdout=subprocess.PIPE, text=True,
        )
        for _ in range(processes)
    ]
    stamps = sorted(t for p in procs for t in json.loads(p.communicate(timeout=30)[0]))

    # `rate` a second for everyone together, paced: 120 requests take at least
    # 119 / 40 s, where three private buckets would need a third of that.
    span = stamps[-1] - stamps[0]
    assert len(stamps) == per_process * processes
    assert span >= (len(stamps) - 1) / rate - 0.1, span
    # No burst: no second holds more than a second's worth (and one for the edge).
    assert max(sum(1 for t in stamps if s <= t < s + 1) for s in stamps) <= rate + 1


def test_waits_and_refusals_are_counted(service_env: dict[str, str]) -> None:
    """An operator tells a spent budget from a slow Stripe by these two series."""

    def sample(name: str) -> float:
        return REGISTRY.get_sample_value(name) or 0.0

    waits, refusals = (sample("refunds_stripe_budget_wait_seconds_count"),
                       sample("refunds_stripe_budget_refusals_total"))
    key = f"tests:rate-limit:{uuid.uuid4().hex}"
    one_a_minute = StripeRateLimiter(
        redis.Redis.from_url(service_env["REDIS_URL"]), rate=1 / 60, key=key, max_wait=1
    )
    one_a_minute.acquire()  # the bucket's one token
    with pytest.raises(RateLimited):
        one_a_minute.acquire()  # the next is a minute away: past max_wait

    assert sample("refunds_stripe_budget_wait_seconds_count") == waits + 1
    assert sample("refunds_stripe_budget_refusals_total") == refusals + 1


def test_two_workers_sharing_the_limit_never_meet_stripes_429(stack: Stack, db: Session) -> None:
    broker = stack.own_redis()
    env = {**stack.env, "REDIS_URL": broker, "STRIPE_MAX_RPS": "5"}
    stack.beat.stop()  # its re-enqueues would go to the stack's own, unthrottled worker
    stack.admin.config(webhook_url=None)
    stack.admin.faults(rate_limit_rps=6)  # Stripe allows a little more than our budget
    workers = [stack.new_worker(f"worker-limited-{n}", env).start() for n in "ab"]
    wait_for(lambda: all(" ready." in w.log() for w in workers), timeout=15, what="workers")
    ids = [initiate(db, c) for c in seed_payments(stack, db, 12)]
    for refund_id in ids:
        send_task(broker, refund_id)

    wait_for_statuses(db, ids, "succeeded", timeout=20)

    # Eight threads at once would have met 429s; the shared bucket spaced them out.
    assert stack.admin.stats()["rate_limited"] == 0
    assert stripe_refunds_per_id(stack, ids) == {i: 1 for i in ids}

