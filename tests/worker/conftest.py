"""The whole refund pipeline as real processes, for the worker's tests.

A Stripe emulator, a gunicorn (the API and the webhook endpoint), a Celery worker
(threads pool) and celery beat, on this run's Redis database number and a Postgres
database of this module's own: the reconciler sweeps every pending refund it can
see, and must not sweep up other modules' refunds (their charges are unknown to this
emulator). The emulator signs its webhooks with the service's secret and POSTs them
to the gunicorn. Retries, reconciliation and the Stripe client timeout are made short
through the same settings production uses, so every failure mode settles in seconds.

The test process itself gets the same settings (``db``, ``reconcile_once()`` and
``enqueue_refund`` called here behave as in the worker).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from sqlalchemy import select
from sqlalchemy.orm import Session

from emulator.testing import Admin, EmulatorProcess
from shared.adapters.celery_app import PROCESS_REFUND_TASK, REFUNDS_QUEUE
from shared.domain.models import Charge, Refund, RefundEvent, RefundStatus, new_id
from shared.services.refunds import stripe_idempotency_key
from shared.services.transitions import record_event
from tests.conftest import RUN_ID, _admin_execute
from tests.support import (
    ServiceProcess,
    beat_process,
    free_port,
    wait_for_http,
    web_process,
    worker_process,
)
from tests.support import create_database as _create_database
from tests.support import (  # noqa: F401 - the worker tests import it from here
    seed_emulator_payments as seed_payments,
)

#: Settings every process of the stack runs with (production defaults in brackets).
FAST_SETTINGS = {
    "RETRY_BASE_SECONDS": "0.2",  # [2]
    "RETRY_MAX_SECONDS": "1",  # [300]
    "MAX_ATTEMPTS": "4",  # [8]
    "STRIPE_TIMEOUT_SECONDS": "2",  # [10]
    "CLAIM_LEASE_SECONDS": "15",  # [90]: a killed worker's refund waits this long
    "RECONCILE_INTERVAL_SECONDS": "1",  # [60]
    "STUCK_AFTER_SECONDS": "2",  # [300]
    "STRIPE_MAX_RPS": "500",  # [25]
    "WORKER_CONCURRENCY": "4",  # [64]
}
#: How long the asynchronous test cards take at the emulator.
CARD_DELAY = 1.0
INITIATOR = "support@example.com"


@dataclass
class Stack:
    env: dict[str, str]
    api_url: str
    emulator: EmulatorProcess
    worker: ServiceProcess
    beat: ServiceProcess
    log_dir: Path
    _extra: list[ServiceProcess] = field(default_factory=list)

    @property
    def admin(self) -> Admin:
        return self.emulator.admin

    @property
    def webhook_url(self) -> str:
        return f"{self.api_url}/v1/webhooks/stripe"

    def process(
        self, name: str, argv: list[str], env: dict[str, str] | None = None
    ) -> ServiceProcess:
        proc = ServiceProcess(name, argv, env or self.env, self.log_dir)
        self._extra.append(proc)
        return proc

    def new_worker(self, name: str, env: dict[str, str] | None = None) -> ServiceProcess:
        proc = worker_process(env or self.env, self.log_dir, name=name, concurrency=4)
        self._extra.append(proc)
        return proc

    def own_redis(self) -> str:
        """Start a redis-server of the test's own (stopped with its other processes, after
        the workers using it); its URL."""
        port = free_port()
        self.process("redis", ["redis-server", "--port", str(port), "--save", "",
                               "--appendonly", "no", "--bind", "127.0.0.1"]).start()
        url = f"redis://127.0.0.1:{port}/0"
        wait_for(lambda: _pings(redis.Redis.from_url(url)), timeout=10,
                 what="redis-server to start")
        return url

    def stop_extra(self) -> None:
        # All at once, but workers are waited for before the redis-server they use.
        _stop_all(list(reversed(self._extra)))
        self._extra.clear()


@pytest.fixture(scope="package")
def stack(service_env: dict[str, str], log_dir: Path) -> Iterator[Stack]:
    database_url = _create_database(f"refunds_test_{RUN_ID}_worker")
    web_port = free_port()
    api_url = f"http://127.0.0.1:{web_port}"
    try:
        with EmulatorProcess(
            webhook_url=f"{api_url}/v1/webhooks/stripe",
            webhook_secret=service_env["STRIPE_WEBHOOK_SECRET"],
            pending_refund_delay=CARD_DELAY,
            failing_refund_delay=CARD_DELAY,
        ) as emulator:
            env = {**service_env, **FAST_SETTINGS, "STRIPE_API_BASE": emulator.url,
                   "DATABASE_URL": database_url}
            web, _ = web_process(env, log_dir, workers=2, port=web_port)
            worker = worker_process(env, log_dir, name="worker", concurrency=4)
            beat = beat_process(env, log_dir)
            with pytest.MonkeyPatch.context() as mp:
                for name, value in env.items():
                    mp.setenv(name, value)
                _clear_caches()
                stack = Stack(env=env, api_url=api_url, emulator=emulator, worker=worker,
                              beat=beat, log_dir=log_dir)
                try:
                    for proc in (web, worker, beat):
                        proc.start()
                    wait_for_http(f"{api_url}/healthz", proc=web.proc)
                    yield stack
                finally:
                    stack.stop_extra()
                    _stop_all([beat, worker, web])
                    _clear_caches()
    finally:
        _clear_caches()
        _admin_execute(f'DROP DATABASE IF EXISTS "refunds_test_{RUN_ID}_worker" WITH (FORCE)')


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def _stop_all(procs: list[ServiceProcess]) -> None:
    """SIGTERM them all at once, then wait for each: their shutdowns overlap."""
    for proc in procs:
        if proc.proc is not None and proc.proc.poll() is None:
            os.killpg(proc.proc.pid, signal.SIGTERM)
    for proc in procs:
        proc.stop()


@pytest.fixture(autouse=True)
def _fresh_faults(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each test that uses the stack starts with no faults, webhooks on, and the
    worker and beat running, whatever the test before it did."""
    if "stack" not in request.fixturenames:
        yield
        return
    stack: Stack = request.getfixturevalue("stack")
    stack.admin.clear_faults()
    stack.admin.reset_stats()
    yield
    stack.admin.clear_faults()
    stack.admin.config(webhook_url=stack.webhook_url)
    stack.stop_extra()
    for proc in (stack.worker, stack.beat):  # a test may have stopped or killed them
        if proc.proc is None or proc.proc.poll() is not None:
            proc.start()


def _clear_caches() -> None:
    """Forget clients built from the previous settings (the engine: another database)."""
    from shared.adapters.celery_app import get_celery
    from shared.adapters.config import get_settings
    from shared.adapters.db import _session_factory, get_engine, get_pool
    from shared.adapters.rate_limit import get_limiter
    from shared.adapters.stripe_gateway import get_gateway

    if get_engine.cache_info().currsize:
        get_engine().dispose()
    if get_pool.cache_info().currsize:
        get_pool().close()
    caches = (get_settings, get_engine, get_pool, _session_factory, get_gateway, get_limiter,
              get_celery)
    for cached in caches:
        cached.cache_clear()


# -- helpers used by the tests -------------------------------------------------------


def initiate(db: Session, charge_id: str, amount: int = 1_000) -> str:
    """A pending refund, committed, as the API records it (not enqueued). The API's own
    checks are the API tests' business; here the row may even ask for too much."""
    charge = db.get(Charge, charge_id)
    assert charge is not None
    refund_id = new_id("rf")
    db.add(Refund(id=refund_id, payment_id=charge.payment_id, charge_id=charge_id, amount=amount,
                  currency=charge.currency, status=RefundStatus.PENDING, initiated_by=INITIATOR,
                  stripe_idempotency_key=stripe_idempotency_key(refund_id)))
    db.flush()
    record_event(db, refund_id=refund_id, from_status=None, to_status=RefundStatus.PENDING,
                 actor=INITIATOR)
    db.commit()
    return refund_id


def send_task(broker_url: str, refund_id: str) -> None:
    """Publish ``refunds.process`` straight to a broker (several copies, other brokers)."""
    app = Celery("tests", broker=broker_url)
    app.conf.update(task_serializer="json", accept_content=["json"])
    try:
        app.send_task(PROCESS_REFUND_TASK, args=[refund_id], queue=REFUNDS_QUEUE)
    finally:
        app.close()


def refunds_of(db: Session, ids: list[str]) -> dict[str, Refund]:
    db.expire_all()
    return {r.id: r for r in db.scalars(select(Refund).where(Refund.id.in_(ids)))}


def wait_for(
    predicate: Callable[[], Any], *, timeout: float, interval: float = 0.1, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def wait_for_statuses(
    db: Session, ids: list[str], statuses: set[str] | str, *, timeout: float
) -> dict[str, Refund]:
    wanted = {statuses} if isinstance(statuses, str) else statuses

    def done() -> dict[str, Refund] | None:
        rows = refunds_of(db, ids)
        finished = len(rows) == len(ids) and all(r.status in wanted for r in rows.values())
        return rows if finished else None

    try:
        return wait_for(done, timeout=timeout, what=f"refunds to reach {sorted(wanted)}")
    except AssertionError:
        left = {i: r.status for i, r in refunds_of(db, ids).items() if r.status not in wanted}
        raise AssertionError(f"not {sorted(wanted)} after {timeout}s: {left}") from None


def stripe_refunds_per_id(stack: Stack, ids: list[str]) -> dict[str, int]:
    """How many Stripe refunds the emulator holds for each of our refund ids."""
    counts = stack.admin.stats()["refunds_by_metadata_refund_id"]
    return {i: counts.get(i, 0) for i in ids}


def trail(db: Session, refund_id: str) -> list[tuple[str | None, str, str]]:
    rows = db.scalars(
        select(RefundEvent).where(RefundEvent.refund_id == refund_id).order_by(RefundEvent.id)
    )
    return [(e.from_status, e.to_status, e.actor) for e in rows]
