"""``enqueue_refund`` writes to Redis exactly what kombu's Redis transport would.

The API pushes its task messages onto the broker's list itself (``shared.adapters.celery_app``);
if a kombu upgrade changed its envelope, this comparison fails before a worker
misreads a message. (That workers run what it pushes is shown by every worker test.)
"""

from __future__ import annotations

import base64
import json
import os
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
from kombu import Connection

from shared.adapters.celery_app import (
    APPLY_STRIPE_EVENT_TASK,
    CLIENTS_PER_PROCESS,
    DELIVER_WEBHOOK_TASK,
    ENQUEUE_CLIENT_NAME,
    PROCESS_REFUND_TASK,
    RECONCILE_QUEUE,
    RECONCILE_TASK,
    REFUNDS_QUEUE,
    STRIPE_EVENTS_QUEUE,
    WEBHOOKS_QUEUE,
    _one_connection_client,
    _push_to_redis_list,
    _redis_list_clients,
    enqueue_refund,
    get_celery,
)


@pytest.fixture
def broker(service_env: dict[str, str]) -> Iterator[tuple[redis.Redis, str]]:
    client = redis.Redis.from_url(service_env["REDIS_URL"])
    queue = f"test-enqueue-{uuid.uuid4().hex}"  # a list of this test's own
    yield client, queue
    client.delete(queue)


def _pop(client: redis.Redis, queue: str) -> dict[str, Any]:
    raw = client.rpop(queue)
    assert raw is not None, "nothing was pushed"
    return json.loads(raw)


def test_the_envelope_is_kombus_own(broker: tuple[redis.Redis, str]) -> None:
    client, queue = broker
    app = get_celery()
    message = app.amqp.as_task_v2(str(uuid.uuid4()), PROCESS_REFUND_TASK, args=["rf_test"])

    with Connection(app.conf.broker_url) as connection:
        connection.Producer().publish(
            message.body,
            exchange="",
            routing_key=queue,
            serializer="json",
            delivery_mode="persistent",
            headers=message.headers,
            **message.properties,
        )
    by_kombu = _pop(client, queue)
    _push_to_redis_list(client, queue, message)
    by_us = _pop(client, queue)

    assert by_us.keys() == by_kombu.keys()
    assert by_us["headers"] == by_kombu["headers"]
    assert by_us["headers"]["task"] == PROCESS_REFUND_TASK
    assert base64.b64decode(by_us["body"]) == base64.b64decode(by_kombu["body"])
    assert json.loads(base64.b64decode(by_us["body"]))[0] == ["rf_test"]
    for name in ("content-type", "content-encoding"):
        assert by_us[name] == by_kombu[name]
    ours, theirs = by_us["properties"], by_kombu["properties"]
    assert ours.keys() == theirs.keys()
    assert ours.pop("delivery_tag") != theirs.pop("delivery_tag")  # one per message
    assert ours == theirs


def test_the_message_is_the_one_send_task_sends(
    broker: tuple[redis.Redis, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Headers decide how a worker runs the task (e.g. ``ignore_result``: False would
    make workers store every result), so they must be what ``send_task`` sends."""
    client, queue = broker
    assert _redis_list_clients(os.getpid()) is not None  # the tests' broker is Redis
    get_celery().send_task(PROCESS_REFUND_TASK, args=["rf_test"], queue=queue)
    by_celery = _pop(client, queue)
    monkeypatch.setattr("shared.adapters.celery_app.REFUNDS_QUEUE", queue)
    assert enqueue_refund("rf_test")
    by_us = _pop(client, queue)

    ids = ("id", "root_id", "origin")
    assert {k: v for k, v in by_us["headers"].items() if k not in ids} == {
        k: v for k, v in by_celery["headers"].items() if k not in ids
    }
    assert by_us["headers"]["ignore_result"] is None
    assert base64.b64decode(by_us["body"]) == base64.b64decode(by_celery["body"])
    per_message = ("correlation_id", "reply_to", "delivery_tag")
    assert {k: v for k, v in by_us["properties"].items() if k not in per_message} == {
        k: v for k, v in by_celery["properties"].items() if k not in per_message
    }


def test_reconcile_passes_have_a_queue_of_their_own_that_every_worker_reads() -> None:
    app = get_celery()
    assert app.amqp.router.route({}, RECONCILE_TASK)["queue"].name == RECONCILE_QUEUE
    assert app.amqp.router.route({}, PROCESS_REFUND_TASK)["queue"].name == REFUNDS_QUEUE
    assert (app.amqp.router.route({}, APPLY_STRIPE_EVENT_TASK)["queue"].name
            == STRIPE_EVENTS_QUEUE)
    # A worker started without -Q consumes every queue in task_queues.
    assert {q.name for q in app.conf.task_queues} == {
        REFUNDS_QUEUE, RECONCILE_QUEUE, STRIPE_EVENTS_QUEUE, WEBHOOKS_QUEUE
    }
    assert app.amqp.router.route({}, DELIVER_WEBHOOK_TASK)["queue"].name == WEBHOOKS_QUEUE


def test_many_callers_at_once_share_a_few_connections(
    broker: tuple[redis.Redis, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A web process enqueues from as many requests as it serves at once: every message
    arrives whole, on at most ``CLIENTS_PER_PROCESS`` connections to the broker, made
    once, even when the first callers all arrive together (a process just started)."""
    client, queue = broker
    monkeypatch.setattr("shared.adapters.celery_app.REFUNDS_QUEUE", queue)
    made = []

    def counted(url: str) -> redis.Redis:
        made.append(url)
        return _one_connection_client(url)

    monkeypatch.setattr("shared.adapters.celery_app._one_connection_client", counted)
    _redis_list_clients.cache_clear()  # as a process that has not enqueued yet
    ids = [f"rf_many_{i}" for i in range(320)]
    with ThreadPoolExecutor(32) as pool:
        assert all(pool.map(enqueue_refund, ids))

    pushed = [json.loads(raw) for raw in client.lrange(queue, 0, -1)]
    assert sorted(json.loads(base64.b64decode(m["body"]))[0][0] for m in pushed) == sorted(ids)
    ours = [c for c in client.client_list()
            if c["name"] == f"{ENQUEUE_CLIENT_NAME}-{os.getpid()}"]
    assert 1 <= len(ours) <= CLIENTS_PER_PROCESS
    assert 1 <= len(made) <= CLIENTS_PER_PROCESS
