"""CPU per step of ``POST /v1/admin/refunds`` and of a Stripe refund event's
``POST /v1/webhooks/stripe``: ``python -m bench.steps``.

What ``make bench``'s ``cpu_ms_per_request.web`` is made of, step by step, measured in
one process and one thread (no HTTP server, no other request competing for the GIL):
each step is run ``--requests`` times on a database and a redis-server of its own and
its CPU time (``time.process_time``) divided by the count. The whole request through
Flask's test client is measured too; what ``make bench`` reports beyond it is the HTTP
server's share (and the cost of threads sharing a GIL). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from bench.stack import BIN, ROOT, Database, redis_server
from emulator.webhooks import sign


def per_call_us(step: Callable[[int], object], count: int) -> float:
    step(0)  # warm: imports, prepared statements, pools
    started = time.process_time()
    for i in range(count):
        step(i)
    return round((time.process_time() - started) / count * 1e6, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.steps", description=__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--pg-admin-url", default=os.environ.get(
        "BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    args = parser.parse_args(argv)
    (ROOT / ".bench").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="steps-", dir=ROOT / ".bench"))
    db = Database(args.pg_admin_url)
    db.create()
    redis_proc, redis_url = redis_server(work)
    try:
        return measure(args.requests, db, redis_url, work)
    finally:
        redis_proc.stop()
        db.drop()
        shutil.rmtree(work, ignore_errors=True)


def measure(count: int, db: Database, redis_url: str, work: Path) -> int:
    os.environ.update({
        "DATABASE_URL": db.url, "REDIS_URL": redis_url, "JWT_SECRET": secrets.token_hex(32),
        "STRIPE_API_KEY": "sk_test_steps", "STRIPE_WEBHOOK_SECRET": "whsec_steps",
        "PROMETHEUS_MULTIPROC_DIR": str(work), "LOG_LEVEL": "INFO",
    })
    subprocess.run([str(BIN / "alembic"), "upgrade", "head"], cwd=ROOT, check=True,  # noqa: S603
                   capture_output=True)
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        for i in range(2 * count + 2):
            conn.execute("INSERT INTO payments (id, stripe_payment_intent_id, amount, currency,"
                         " status) VALUES (%s, %s, 1000000, 'usd', 'succeeded')",
                         (f"pay_{i}", f"pi_{i}"))
            conn.execute("INSERT INTO charges (id, payment_id, amount, currency, status,"
                         " disputed) VALUES (%s, %s, 1000000, 'usd', 'succeeded', false)",
                         (f"ch_{i}", f"pay_{i}"))

    # The app's own logging, written where a container's stdout would go, minus the I/O.
    from shared.adapters.logging import configure
    configure("web")
    sink = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    for handler in logging.getLogger().handlers:
        handler.setStream(sink)  # type: ignore[attr-defined]

    from api.auth import authenticate
    from api.refunds import _repeated_keys
    from api.schemas import RefundCreate
    from api.wsgi import app
    from shared.adapters import metrics
    from shared.adapters.celery_app import enqueue_refund, enqueue_stripe_event
    from shared.adapters.config import get_settings
    from shared.adapters.db import get_web_pool, get_webhook_pool
    from shared.adapters.tokens import issue_token
    from shared.services import refunds, stripe_events
    from shared.services.idempotency import request_fingerprint

    settings = get_settings()
    token = issue_token(settings, subject="steps@example.com", scopes=["refunds:write"])
    client = app.test_client()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    body = json.dumps({"charge_id": "ch_0", "amount_cents": 100}).encode()
    access = logging.getLogger("api.access")
    # Each step refunds payments of its own, so none sums a growing list of refunds.
    post_payments, record_payments = 0, count + 1

    def post(i: int) -> None:
        sent = json.dumps({"charge_id": f"ch_{post_payments + i}", "amount_cents": 100})
        answer = client.post("/v1/admin/refunds", data=sent, headers=headers)
        assert answer.status_code == 201, answer.data

    def record(i: int) -> None:
        with get_web_pool().connection() as connection:
            refunds.initiate_refund(
                connection,
                request=refunds.RefundRequest(f"ch_{record_payments + i}", 100, None),
                initiated_by="steps@example.com", idempotency_key=None, fingerprint="")

    # Stripe's refund events as a burst brings them: four about each refund, each
    # signed; every step gets events of its own (a stored event is not stored again).
    types = ("refund.created", "refund.updated", "charge.refund.updated", "refund.updated")

    def signed_event(step: str, i: int) -> tuple[bytes, str, dict[str, Any]]:
        event = {"id": f"evt_{step}_{i:08d}", "object": "event", "type": types[i % 4],
                 "created": int(time.time()),
                 "data": {"object": {"id": f"re_{step}_{i // 4:08d}", "object": "refund"}}}
        payload = json.dumps(event).encode()
        return payload, sign(payload, settings.stripe_webhook_secret), event

    def webhook(i: int) -> None:
        payload, signature, _ = signed_event("whole", i)
        answer = client.post("/v1/webhooks/stripe", data=payload,
                             headers={"Stripe-Signature": signature,
                                      "Content-Type": "application/json"})
        assert answer.status_code == 200, answer.data

    # Made beforehand: signing is the sender's work, not a step of the webhook's.
    verify_samples = [signed_event("verify", i)[:2] for i in range(count + 1)]
    store_samples = [signed_event("store", i)[2] for i in range(count + 1)]
    mark_samples = [signed_event("mark", i)[2] for i in range(count + 1)]
    secret = settings.stripe_webhook_secret

    def store(i: int) -> None:
        with get_webhook_pool().connection() as connection:
            stripe_events.store_event(connection, store_samples[i])

    def mark_and_enqueue(i: int) -> None:
        event = mark_samples[i]
        enqueue_stripe_event(event["id"], coalesce=stripe_events.coalescing_key(event))

    steps: dict[str, Callable[[int], object]] = {
        "whole POST through Flask's test client": post,
        "GET /healthz through Flask's test client": lambda i: client.get("/healthz"),
        "record: pool checkout + initiate_refund() (one statement)": record,
        "enqueue: refunds.process message, LPUSH": lambda i: enqueue_refund(f"rf_{i:024d}"),
        "access log line (JSON, redaction)": lambda i: access.info(
            "%s %s %s", "POST", "/v1/admin/refunds", 201, extra={
                "method": "POST", "route": "/v1/admin/refunds", "path": "/v1/admin/refunds",
                "status": 201, "duration_ms": 3.2, "caller": "steps@example.com",
                "outcome": "created", "refund_id": f"rf_{i:024d}"}),
        "body: pydantic, repeated keys, fingerprint": lambda i: (
            request_fingerprint(RefundCreate.model_validate_json(body).model_dump()),
            _repeated_keys(body)),
        "token check (a verified token, cached)": lambda i: authenticate(
            f"Bearer {token}", settings),
        "Prometheus: request and outcome": lambda i: (
            metrics.observe_http_request(method="POST", route="/v1/admin/refunds",
                                         status=201, seconds=0.003),
            metrics.observe_refund_initiation("created")),
        "webhook: whole refund event through Flask's test client": webhook,
        "webhook: signature and JSON (verify_event)": lambda i: stripe_events.verify_event(
            *verify_samples[i], secret),
        "webhook: pool checkout + store_event() (one statement)": store,
        "webhook: coalescing mark (SET NX), a task for 1 event in 4": mark_and_enqueue,
        "webhook: access log line": lambda i: access.info(
            "%s %s %s", "POST", "/v1/webhooks/stripe", 200, extra={
                "method": "POST", "route": "/v1/webhooks/stripe", "path": "/v1/webhooks/stripe",
                "status": 200, "duration_ms": 3.2, "caller": None,
                "stripe_event": f"evt_log_{i:08d}", "event_type": "refund.updated",
                "outcome": "deferred"}),
    }
    result: dict[str, Any] = {
        "requests": count,
        "how": "one process, one thread, time.process_time per call (python -m bench.steps)",
        "cpu_us": {name: per_call_us(step, count) for name, step in steps.items()},
    }
    get_web_pool().close()
    get_webhook_pool().close()
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
