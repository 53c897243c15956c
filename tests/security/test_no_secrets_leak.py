"""No secret or token in any log line or any answer (SPEC 3), checked on real processes.

A pipeline of its own (gunicorn, a Celery worker, beat, the Stripe emulator, a Redis and
a Postgres cluster of the module's own, with a password in DATABASE_URL) gets normal
traffic with real tokens, then traffic meant to make it talk: tokens and secrets in
query strings, request ids, bodies and webhook headers, forged and expired tokens,
forged webhooks, and a Postgres outage that fills the logs with tracebacks. Then
every log line every process wrote, and every answer, is searched for each token
issued, JWT_SECRET, STRIPE_API_KEY, STRIPE_WEBHOOK_SECRET, CONSOLE_SECRET_KEY and the
database password.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from tests.chaos.stack import Pipeline, PostgresCluster, running_pipeline
from tests.support import RedisServer, seed_emulator_payments

REFUNDS = "/v1/admin/refunds"
JWT_PATTERN = re.compile(r"eyJ[\w-]{10,}\.eyJ[\w-]{10,}\.")


@dataclass
class Secrets:
    jwt_secret: str = field(default_factory=lambda: f"leakcheck-jwt-{secrets.token_hex(20)}")
    stripe_api_key: str = field(default_factory=lambda: f"sk_test_leak{secrets.token_hex(12)}")
    webhook_secret: str = field(default_factory=lambda: f"whsec_leak{secrets.token_hex(12)}")
    console_secret: str = field(default_factory=lambda: f"leakcheck-ui-{secrets.token_hex(20)}")
    db_password: str = field(default_factory=lambda: f"leakcheck-db-{secrets.token_hex(12)}")
    tokens: list[str] = field(default_factory=list)

    def token(self, *, scope: str = "refunds:read refunds:write", ttl: int = 600,
              sub: str = "leak-check@example.com") -> str:
        now = int(time.time())
        issued = jwt.encode({"sub": sub, "scope": scope, "iat": now, "exp": now + ttl},
                            self.jwt_secret, algorithm="HS256")
        self.tokens.append(issued)
        return issued

    def named(self) -> dict[str, str]:
        return {
            "JWT_SECRET": self.jwt_secret, "STRIPE_API_KEY": self.stripe_api_key,
            "STRIPE_WEBHOOK_SECRET": self.webhook_secret,
            "CONSOLE_SECRET_KEY": self.console_secret, "database password": self.db_password,
            **{f"token #{i}": t for i, t in enumerate(self.tokens)},
        }


@dataclass
class Exchange:
    what: str
    status: int
    text: str
    planted: bool  # the request itself carried a secret, which the answer may echo


@pytest.fixture(scope="module")
def leak_secrets() -> Secrets:
    return Secrets()


@pytest.fixture(scope="module")
def cluster() -> Iterator[PostgresCluster]:
    cluster = PostgresCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture(scope="module")
def leaky_pipeline(
    service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory,
    leak_secrets: Secrets, cluster: PostgresCluster,
) -> Iterator[Pipeline]:
    cluster.create_database("refunds")
    # Trust authentication ignores the password, but the service must still keep it quiet.
    database_url = cluster.url("refunds").replace(
        "postgres@", f"postgres:{leak_secrets.db_password}@")
    redis_server = RedisServer(tmp_path_factory.mktemp("leak-redis"))
    env = {**service_env, "JWT_SECRET": leak_secrets.jwt_secret,
           "STRIPE_API_KEY": leak_secrets.stripe_api_key,
           "STRIPE_WEBHOOK_SECRET": leak_secrets.webhook_secret,
           "CONSOLE_SECRET_KEY": leak_secrets.console_secret, "LOG_LEVEL": "DEBUG"}
    try:
        with running_pipeline(env, database_url=database_url, redis_url=redis_server.url,
                              log_dir=tmp_path_factory.mktemp("leak-logs"), web_workers=1,
                              workers=1, beat=True) as pipeline:
            yield pipeline
    finally:
        redis_server.stop()


def webhook_signature(secret: str, payload: bytes, timestamp: int) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + payload, hashlib.sha256)
    return f"t={timestamp},v1={digest.hexdigest()}"


def drive(pipeline: Pipeline, cluster: PostgresCluster, s: Secrets) -> list[Exchange]:
    exchanges: list[Exchange] = []
    engine = create_engine(pipeline.env["DATABASE_URL"])
    with Session(engine) as db:
        charges = seed_emulator_payments(pipeline, db, 3, amount=10_000)
    engine.dispose()
    good = s.token()
    client = httpx.Client(base_url=pipeline.api_url, timeout=30)

    def send(what: str, method: str, path: str, *, planted: bool = False, **kwargs: Any) -> None:
        resp = client.request(method, path, **kwargs)
        text = "\n".join(f"{k}: {v}" for k, v in resp.headers.items()) + "\n" + resp.text
        exchanges.append(Exchange(what, resp.status_code, text, planted))

    bearer = {"Authorization": f"Bearer {good}"}
    # Normal work, end to end through the worker and Stripe's webhooks.
    send("create", "POST", REFUNDS, headers={**bearer, "Idempotency-Key": "leak-1"},
         json={"charge_id": charges[0], "amount_cents": 500, "reason": "requested_by_customer"})
    send("replay", "POST", REFUNDS, headers={**bearer, "Idempotency-Key": "leak-1"},
         json={"charge_id": charges[0], "amount_cents": 500, "reason": "requested_by_customer"})
    send("full", "POST", REFUNDS, headers=bearer, json={"charge_id": charges[1], "full": True})
    send("list", "GET", REFUNDS, headers=bearer)
    # Credentials that must not work, nor be repeated.
    send("expired", "GET", REFUNDS, headers={"Authorization": f"Bearer {s.token(ttl=-600)}"})
    send("read-only on write", "POST", REFUNDS,
         headers={"Authorization": f"Bearer {s.token(scope='refunds:read')}"},
         json={"charge_id": charges[2], "full": True})
    forged = jwt.encode({"sub": "x", "scope": "refunds:write", "exp": 2_000_000_000},
                        s.jwt_secret[::-1], algorithm="HS256")
    send("forged", "GET", REFUNDS, headers={"Authorization": f"Bearer {forged}"})
    send("basic with the secret", "GET", REFUNDS,
         headers={"Authorization": f"Basic {s.jwt_secret}"})
    # Secrets where a careless caller might put them (their answers may echo them).
    send("token in query", "GET", f"{REFUNDS}?access_token={good}", planted=True)
    send("secret as request id", "GET", REFUNDS, planted=True,
         headers={**bearer, "X-Request-Id": s.webhook_secret})
    send("secret as idempotency key", "POST", REFUNDS, planted=True,
         headers={**bearer, "Idempotency-Key": s.stripe_api_key},
         json={"charge_id": charges[2], "amount_cents": 100})
    send("secret as charge id", "POST", REFUNDS, planted=True, headers=bearer,
         json={"charge_id": s.console_secret, "full": True})
    send("token as refund id", "GET", f"{REFUNDS}/{good}", planted=True, headers=bearer)
    send("secret in a wrong field", "POST", REFUNDS, planted=True, headers=bearer,
         json={"charge_id": charges[2], "amount_cents": s.jwt_secret, s.db_password: 1})
    # Forged and stale webhooks, and one signed properly.
    payload = json.dumps({"id": "evt_leak", "object": "event", "type": "charge.refunded",
                          "data": {"object": {"id": charges[0]}}}).encode()
    now = int(time.time())
    send("webhook signed with the API key", "POST", "/v1/webhooks/stripe", content=payload,
         headers={"Stripe-Signature": webhook_signature(s.stripe_api_key, payload, now)})
    send("stale webhook", "POST", "/v1/webhooks/stripe", content=payload,
         headers={"Stripe-Signature": webhook_signature(s.webhook_secret, payload, now - 900)})
    send("webhook", "POST", "/v1/webhooks/stripe", content=payload,
         headers={"Stripe-Signature": webhook_signature(s.webhook_secret, payload, now)})
    # An outage: the database goes away under the web, worker and beat.
    cluster.stop("immediate")
    try:
        send("create while the database is down", "POST", REFUNDS, headers=bearer,
             json={"charge_id": charges[2], "amount_cents": 100})
        send("read while the database is down", "GET", REFUNDS, headers=bearer)
        send("readiness while the database is down", "GET", "/readyz")
        time.sleep(2.5)  # beat's reconcile passes fail meanwhile
    finally:
        cluster.start()
    time.sleep(3)  # the worker and webhooks settle; beat passes again
    client.close()
    return exchanges


def test_no_token_or_secret_in_any_log_line_or_answer(
    leaky_pipeline: Pipeline, cluster: PostgresCluster, leak_secrets: Secrets
) -> None:
    exchanges = drive(leaky_pipeline, cluster, leak_secrets)
    leaky_pipeline.stop()  # every process flushes its log
    logs = {path.name: path.read_text(errors="replace") for path in leaky_pipeline.log_paths()}
    everything = "\n".join(logs.values())

    # The scan sees real traffic and real failures, not empty files.
    statuses = {e.what: e.status for e in exchanges}
    assert statuses["create"] == 201 and statuses["create while the database is down"] >= 500
    assert "database unavailable" in everything and "Traceback" in everything
    assert "[REDACTED]" in everything  # planted secrets reached a log line, masked
    assert any(name.startswith("worker") and "refund sent" in text for name, text in logs.items())

    named = leak_secrets.named()
    in_logs = [f"{what} in {name}" for name, text in logs.items()
               for what, value in named.items() if value in text]
    assert not in_logs, in_logs
    assert not JWT_PATTERN.search(everything), JWT_PATTERN.search(everything)

    in_answers = [f"{what} in the answer to {e.what!r} ({e.status})" for e in exchanges
                  if not e.planted for what, value in named.items() if value in e.text]
    assert not in_answers, in_answers
    for exchange in exchanges:  # a planted secret may come back to its sender, nothing else
        assert not JWT_PATTERN.search(exchange.text) or exchange.planted, exchange
