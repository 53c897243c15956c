"""Refund events out through real processes: a Celery worker (threads pool) with its
dispatcher thread, the Stripe emulator, and HTTP receivers on loopback."""

from __future__ import annotations

import socket
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from standardwebhooks import Webhook

from emulator.testing import EmulatorProcess
from shared.adapters.celery_app import enqueue_refund
from shared.domain.models import Refund, RefundStatus, WebhookDelivery
from tests.events.conftest import (
    Receiver,
    backlog,
    make_endpoint,
    make_refund,
    move,
    start_worker,
    wait_for,
)
from tests.support import ServiceProcess, seed_emulator_payments

S = RefundStatus


@pytest.fixture(scope="module")
def emulator() -> Iterator[EmulatorProcess]:
    with EmulatorProcess() as emulator:
        yield emulator


@pytest.fixture(scope="module")
def worker_env(events_env: dict[str, str], emulator: EmulatorProcess) -> dict[str, str]:
    return {**events_env, "STRIPE_API_BASE": emulator.url, "STRIPE_MAX_RPS": "500"}


@pytest.fixture(scope="module")
def worker(worker_env: dict[str, str], log_dir: Path) -> Iterator[ServiceProcess]:
    proc = start_worker(worker_env, log_dir, concurrency=4)
    yield proc
    proc.stop()


def test_status_changes_reach_the_receiver_signed_within_milliseconds(
    edb: Session, receiver: Receiver, worker: ServiceProcess
) -> None:
    endpoint = make_endpoint(edb, receiver.url)
    make_refund(edb)  # the worker is up and delivering before anything is timed
    wait_for(lambda: receiver.received, timeout=30, what="a first delivery")
    receiver.received.clear()
    committed: dict[str, float] = {}
    refund_ids = []
    for _ in range(10):
        refund_id = make_refund(edb)
        committed[f"{refund_id}:1"] = time.monotonic()
        move(edb, refund_id, S.SUCCEEDED)
        committed[f"{refund_id}:2"] = time.monotonic()
        refund_ids.append(refund_id)
        time.sleep(0.05)
    wait_for(lambda: len(receiver.received) >= 20, timeout=30, what="20 deliveries")
    hook = Webhook(endpoint.secret)
    latencies = []
    for got in receiver.received:
        body = hook.verify(got.body, got.headers)
        refund = body["data"]["refund"]
        key = f"{refund['refund_id']}:{body['data']['sequence']}"
        latencies.append(got.at - committed[key])
    assert len({r.headers["webhook-id"] for r in receiver.received}) == 20
    p50 = statistics.median(latencies)
    print(f"\nstatus change -> receiver: p50 {p50 * 1000:.1f} ms, "
          f"max {max(latencies) * 1000:.1f} ms")
    assert p50 < 0.5  # about 10-30 ms on a quiet machine; generous under shared load


def _blackhole() -> socket.socket:
    """A port that accepts connections (the kernel's backlog) and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    return sock


def _drain(edb: Session, emulator: EmulatorProcess, count: int) -> tuple[float, list[str]]:
    """Seconds for the worker to make ``count`` refunds at the emulator, and their ids."""
    charges = seed_emulator_payments(emulator, edb, count)
    ids = [_pending_refund(edb, charge_id) for charge_id in charges]
    started = time.monotonic()
    for refund_id in ids:
        assert enqueue_refund(refund_id)

    def finished() -> bool:
        edb.expire_all()
        done = edb.scalar(select(func.count()).select_from(Refund)
                          .where(Refund.id.in_(ids), Refund.status == S.SUCCEEDED))
        return done == len(ids)

    wait_for(finished, timeout=120, what=f"{count} refunds to succeed")
    return time.monotonic() - started, ids


def _pending_refund(edb: Session, charge_id: str) -> str:
    from shared.domain.models import Charge, new_id
    from shared.services.refunds import stripe_idempotency_key
    from shared.services.transitions import record_event

    charge = edb.get(Charge, charge_id)
    refund_id = new_id("rf")
    edb.add(Refund(id=refund_id, payment_id=charge.payment_id, charge_id=charge_id,
                   amount=100, currency="usd", status=S.PENDING, initiated_by="ops",
                   stripe_idempotency_key=stripe_idempotency_key(refund_id)))
    edb.flush()
    record_event(edb, refund_id=refund_id, from_status=None, to_status=S.PENDING,
                 actor="ops")
    edb.commit()
    return refund_id


def test_a_dead_endpoint_with_thousands_waiting_slows_neither_refunds_nor_other_endpoints(
    edb: Session, receiver: Receiver, worker: ServiceProcess, emulator: EmulatorProcess
) -> None:
    baseline, _ = _drain(edb, emulator, 40)
    dead = _blackhole()
    try:
        dead_endpoint = make_endpoint(
            edb, f"http://127.0.0.1:{dead.getsockname()[1]}/hooks")
        backlog(edb, 2000)
        wait_for(lambda: edb.scalar(select(func.count()).select_from(WebhookDelivery)
                                    .where(WebhookDelivery.endpoint_id == dead_endpoint.id))
                 >= 2000, timeout=30, what="2000 deliveries to the dead endpoint")
        healthy = make_endpoint(edb, receiver.url)
        with_backlog, ids = _drain(edb, emulator, 40)
        # One endpoint never delays another: the healthy one gets the new refunds' events
        # while the dead one times out, one attempt at a time.
        wanted = {(refund_id, seq) for refund_id in ids for seq in (1, 2)}

        def healthy_has_them() -> bool:
            got = {(b["data"]["refund"]["refund_id"], b["data"]["sequence"])
                   for b in receiver.bodies()}
            return wanted <= got

        wait_for(healthy_has_them, timeout=30, what="the healthy endpoint's events")
        busy_samples: list[int] = []
        for _ in range(10):
            edb.expire_all()
            busy_samples.append(int(edb.scalar(
                select(func.count()).select_from(WebhookDelivery).where(
                    WebhookDelivery.endpoint_id == dead_endpoint.id,
                    WebhookDelivery.attempting_until > func.now())) or 0))
            time.sleep(0.1)
        dead_pending = edb.scalar(select(func.count()).select_from(WebhookDelivery).where(
            WebhookDelivery.endpoint_id == dead_endpoint.id,
            WebhookDelivery.status == "pending"))
    finally:
        dead.close()
    print(f"\n40 refunds: {baseline:.2f}s alone, {with_backlog:.2f}s with 2000 events waiting "
          f"for a dead endpoint; dead endpoint's attempts in flight {max(busy_samples)}, "
          f"{dead_pending} still pending")
    assert with_backlog <= 1.5 * baseline + 2.0
    assert max(busy_samples) <= 1
    assert dead_pending >= 1900  # still waiting: a second each, one at a time
    hook = Webhook(healthy.secret)
    for got in receiver.received:
        hook.verify(got.body, got.headers)
