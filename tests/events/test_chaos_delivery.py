"""Chaos for refund events out: while status changes keep coming, the receiver goes down
for a while, a worker is SIGKILLed in the middle of deliveries, and Redis (a server of
this test's own) is killed and restarted with its queue lost. Afterwards every event has
been delivered at least once, and every request the receiver got was signed right."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from shared.domain.models import RefundStatus, WebhookDelivery, WebhookEndpoint, WebhookOutboxEvent
from tests.events.conftest import Receiver, make_endpoint, make_refund, move, wait_for
from tests.support import RedisServer, ServiceProcess, worker_process

REFUNDS = 40


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    yield server
    server.stop()


def test_every_event_is_delivered_signed_through_receiver_worker_and_redis_failures(
    edb: Session, events_env: dict[str, str], own_redis: RedisServer, log_dir: Path
) -> None:
    env = {**events_env, "REDIS_URL": own_redis.url,
           # Enough retries, a second apart, to outlast the outages below.
           "WEBHOOK_RETRY_SCHEDULE": ",".join(["1"] * 30)}
    receiver = Receiver().start()
    port = receiver.port
    endpoint = make_endpoint(edb, receiver.url)
    hook = Webhook(endpoint.secret)
    forged: list[str] = []

    def check(got) -> int:  # every request, verified as a consumer would
        try:
            hook.verify(got.body, got.headers)
        except WebhookVerificationError as exc:
            forged.append(str(exc))
            return 400
        return receiver.status

    receiver.decide = check
    workers: list[ServiceProcess] = []

    def start_worker(name: str) -> ServiceProcess:
        proc = worker_process(env, log_dir, name=name, concurrency=4).start()
        workers.append(proc)
        return proc

    refund_ids: list[str] = []
    first = start_worker("chaos-events-1")
    try:
        time.sleep(2)  # the dispatcher is listening

        def traffic() -> None:
            from shared.adapters.db import get_engine

            with Session(get_engine(), expire_on_commit=False) as db:
                for _ in range(REFUNDS):
                    refund_id = make_refund(db)
                    refund_ids.append(refund_id)
                    move(db, refund_id, RefundStatus.SUCCEEDED)
                    time.sleep(0.25)

        producer = threading.Thread(target=traffic)
        producer.start()
        time.sleep(1.5)
        receiver.stop()  # the receiver is down: connections refused
        time.sleep(3)
        receiver.delay = 0.5  # slow: deliveries are in flight when the worker dies
        before = len(receiver.received)
        receiver.start(port=port)
        wait_for(lambda: len(receiver.received) > before, timeout=10, what="a delivery")
        first.kill()
        start_worker("chaos-events-2")
        time.sleep(1.5)
        receiver.delay = 0.0
        own_redis.kill()  # the broker crashes: queued deliveries are lost
        time.sleep(1)
        own_redis.start()
        producer.join(timeout=60)
        assert not producer.is_alive()

        events = set(edb.scalars(select(WebhookOutboxEvent.id)
                                 .where(WebhookOutboxEvent.refund_id.in_(refund_ids))))
        assert len(events) == 2 * REFUNDS

        def all_delivered() -> bool:
            edb.expire_all()
            done = edb.scalar(select(func.count()).select_from(WebhookDelivery).where(
                WebhookDelivery.endpoint_id == endpoint.id,
                WebhookDelivery.event_id.in_(events),
                WebhookDelivery.status == "delivered"))
            return done == len(events)

        try:
            wait_for(all_delivered, timeout=120, what="every event to be delivered")
        except AssertionError:
            rows = edb.execute(select(WebhookDelivery.status, WebhookDelivery.last_error,
                                      WebhookDelivery.attempts, WebhookDelivery.next_attempt_at,
                                      WebhookDelivery.scheduled_until,
                                      WebhookDelivery.attempting_until, func.now())
                               .where(WebhookDelivery.endpoint_id == endpoint.id,
                                      WebhookDelivery.status != "delivered")).all()
            print("undelivered:", rows[:10], len(rows))
            print("endpoint:", edb.execute(select(WebhookEndpoint.enabled,
                  WebhookEndpoint.failing_since)).all())
            print(workers[-1].log()[-3000:])
            raise
    finally:
        for proc in workers:
            proc.stop()
        receiver.stop()
    received = {r.headers.get("webhook-id") for r in receiver.received}
    assert events <= received, f"never received: {sorted(events - received)[:5]}"
    assert forged == []
    duplicates = len(receiver.received) - len(received)
    print(f"\nchaos: {len(events)} events, {len(receiver.received)} requests "
          f"({duplicates} repeats or retries), 0 wrongly signed")
