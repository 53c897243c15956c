"""Refund events out: a database of this package's own, a real HTTP receiver on loopback,
and, for the tests that need them, a gunicorn and a Celery worker on that database.

A database of its own because every status change anywhere becomes an event, and the
dispatcher fans each one out to every endpoint: other packages' refunds must not turn
up at these receivers. Retries and timeouts are made short through the settings
production uses.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from shared.domain.models import Refund, RefundStatus, WebhookEndpoint, new_id
from shared.services.refunds import stripe_idempotency_key
from shared.services.transitions import record_event, transition
from tests.conftest import RUN_ID, _admin_execute
from tests.support import ServiceProcess, create_database, free_port, seed_payment

#: Settings of every process in this package (production defaults in brackets).
FAST_SETTINGS = {
    "WEBHOOK_RETRY_SCHEDULE": "1,1,1",  # [5,300,1800,7200,18000,36000,36000]
    "WEBHOOK_TIMEOUT_SECONDS": "1",  # [10]
    "WEBHOOK_DISPATCH_INTERVAL_SECONDS": "0.2",  # [1]
    "RECONCILE_INTERVAL_SECONDS": "1",  # [60]
    "STUCK_AFTER_SECONDS": "2",  # [300]
}
DB_NAME = f"refunds_test_{RUN_ID}_events"


@pytest.fixture(scope="package")
def events_env(service_env: dict[str, str]) -> Iterator[dict[str, str]]:
    """The environment of this package: its own database, short retries. The test
    process itself runs with it too."""
    url = create_database(DB_NAME)
    env = {**service_env, **FAST_SETTINGS, "DATABASE_URL": url}
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        _clear_caches()
        try:
            yield env
        finally:
            _clear_caches()
    _clear_caches()
    _admin_execute(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')


def _clear_caches() -> None:
    from shared.adapters.celery_app import get_celery
    from shared.adapters.config import get_settings
    from shared.adapters.db import _session_factory, get_engine

    if get_engine.cache_info().currsize:
        get_engine().dispose()
    for cached in (get_settings, get_engine, _session_factory, get_celery):
        cached.cache_clear()


@pytest.fixture
def edb(events_env: dict[str, str]) -> Iterator[Session]:
    """A session on this package's database; endpoints left by the test before are gone."""
    from shared.adapters.db import get_engine

    with Session(get_engine(), expire_on_commit=False) as session:
        session.execute(text("DELETE FROM webhook_endpoints"))
        session.execute(text("UPDATE webhook_outbox SET fanned_out_at = now() "
                             "WHERE fanned_out_at IS NULL"))
        session.commit()
        yield session


# -- a receiver ------------------------------------------------------------------------


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    at: float
    #: The sender's address and port: one per connection.
    peer: tuple[str, int] = ("", 0)

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """A real HTTP server on loopback that records what it is sent and answers as told."""

    status: int = 200
    delay: float = 0.0
    answer: bytes = b'{"ok": true}'
    headers: dict[str, str] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    decide: Callable[[Received], int] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    port: int = 0
    server: ThreadingHTTPServer | None = None
    #: Answer over HTTP/1.1, keeping connections open (else HTTP/1.0: one request each).
    keep_alive: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/refund-events"

    def start(self, port: int | None = None) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1" if receiver.keep_alive else "HTTP/1.0"
            disable_nagle_algorithm = True  # it writes the headers and the body apart

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                got = Received({k.lower(): v for k, v in self.headers.items()},
                               self.rfile.read(length), time.monotonic(),
                               tuple(self.client_address[:2]))
                with receiver.lock:
                    receiver.received.append(got)
                if receiver.delay:
                    time.sleep(receiver.delay)
                status = receiver.decide(got) if receiver.decide else receiver.status
                try:
                    self.send_response(status)
                    for name, value in receiver.headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(receiver.answer)))
                    self.end_headers()
                    self.wfile.write(receiver.answer)
                except OSError:
                    pass  # the sender gave up (its timeout)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port or 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def bodies(self) -> list[Any]:
        with self.lock:
            return [r.json for r in self.received]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


# -- refunds and endpoints -------------------------------------------------------------


def make_refund(db: Session, *, amount: int = 1_000, actor: str = "ops@example.com") -> str:
    """A pending refund and its first audit event, committed as the API records them."""
    payment, charge = seed_payment(db, amount=max(amount, 10_000))
    refund_id = new_id("rf")
    db.add(Refund(id=refund_id, payment_id=payment.id, charge_id=charge.id if charge else None,
                  amount=amount, currency="usd", status=RefundStatus.PENDING,
                  initiated_by=actor, stripe_idempotency_key=stripe_idempotency_key(refund_id)))
    db.flush()
    record_event(db, refund_id=refund_id, from_status=None, to_status=RefundStatus.PENDING,
                 actor=actor)
    db.commit()
    return refund_id


def move(db: Session, refund_id: str, to_status: RefundStatus, **fields: Any) -> None:
    assert transition(db, refund_id, to_status, actor="worker", **fields) is not None
    db.commit()


def backlog(edb: Session, count: int) -> str:
    """``count`` refunds and their first events in one statement (each an event out);
    the tag their ids carry (``rf_bl<n>_<tag>``)."""
    refund_id = make_refund(edb)
    payment_id = edb.scalar(select(Refund.payment_id).where(Refund.id == refund_id))
    tag = str(time.monotonic_ns())[-8:]
    edb.execute(text("""
        WITH made AS (
            INSERT INTO refunds (id, payment_id, amount, currency, status,
                                 stripe_idempotency_key, initiated_by)
            SELECT 'rf_bl' || n || '_' || :tag, :payment_id, 1, 'usd', 'canceled',
                   'bl-' || n || '-' || :tag, 'ops'
            FROM generate_series(1, :count) AS n RETURNING id
        )
        INSERT INTO refund_events (refund_id, from_status, to_status, actor)
        SELECT id, NULL, 'canceled', 'ops' FROM made
    """), {"payment_id": payment_id, "count": count, "tag": tag})
    edb.commit()
    return tag


def make_endpoint(db: Session, url: str, *, events: list[str] | None = None) -> WebhookEndpoint:
    from shared.services.webhook_delivery import create_endpoint

    created = create_endpoint(session=db, url=url, events=events, description="test",
                              production=False)
    endpoint = db.scalar(select(WebhookEndpoint).where(WebhookEndpoint.id == created["id"]))
    assert endpoint is not None
    return endpoint


def wait_for(predicate: Callable[[], Any], *, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


# -- processes -------------------------------------------------------------------------


@pytest.fixture(scope="package")
def events_web(events_env: dict[str, str], log_dir: Path) -> Iterator[str]:
    from tests.support import wait_for_http, web_process

    web, url = web_process(events_env, log_dir, workers=2)
    with web:
        wait_for_http(f"{url}/healthz", proc=web.proc)
        yield url


def start_worker(env: dict[str, str], log_dir: Path, *, name: str = "events-worker",
                 concurrency: int = 4) -> ServiceProcess:
    from tests.support import worker_process

    return worker_process(env, log_dir, name=name, concurrency=concurrency).start()


__all__ = ["free_port"]
