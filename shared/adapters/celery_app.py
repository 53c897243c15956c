"""The one module that knows Celery: the app, its settings (SPEC 6) and ``enqueue_refund``.

The API enqueues by task name, so it never imports the worker's code."""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from queue import LifoQueue
from typing import Any
from urllib.parse import urlsplit

import redis
from celery import Celery
from kombu import Exchange, Queue, serialization
from redis.backoff import NoBackoff
from redis.retry import Retry

from shared.adapters import metrics
from shared.adapters.config import get_settings

log = logging.getLogger(__name__)

PROCESS_REFUND_TASK = "refunds.process"
RECONCILE_TASK = "refunds.reconcile"
APPLY_STRIPE_EVENT_TASK = "refunds.apply_stripe_event"
REFUNDS_QUEUE = "refunds"
#: Stripe events that need a call to Stripe to be applied (SPEC 3.3): a queue of their
#: own, so a burst of events and a backlog of refunds never wait behind each other.
STRIPE_EVENTS_QUEUE = "refunds.stripe_events"
#: Reconcile passes have a queue of their own, so that one never waits behind a
#: backlog of refunds (after an outage, exactly when it is needed). Every worker
#: consumes both; kombu takes from them in turn.
RECONCILE_QUEUE = "refunds.reconcile"
#: Refund events out (SPEC 13): deliveries to subscribers' endpoints have a queue of
#: their own, and the dispatcher bounds how many of them are in flight (see
#: ``shared.services.webhook_delivery``), so waiting events never stand in front of refunds.
DELIVER_WEBHOOK_TASK = "refunds.webhooks.deliver"
WEBHOOKS_QUEUE = "refunds.webhooks"

#: Longest retry countdown a task may schedule; visibility timeout must exceed it.
MAX_RETRY_COUNTDOWN_SECONDS = 300
TASK_TIME_LIMIT_SECONDS = 120


def make_celery() -> Celery:
    settings = get_settings()
    app = Celery("refunds", broker=settings.broker_url)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=REFUNDS_QUEUE,
        # What task_create_missing_queues would make of each name: a direct exchange
        # and a queue of that name.
        task_queues=[
            Queue(name, Exchange(name), routing_key=name)
            for name in (REFUNDS_QUEUE, RECONCILE_QUEUE, STRIPE_EVENTS_QUEUE, WEBHOOKS_QUEUE)
        ],
        task_routes={
            RECONCILE_TASK: {"queue": RECONCILE_QUEUE},
            APPLY_STRIPE_EVENT_TASK: {"queue": STRIPE_EVENTS_QUEUE},
            DELIVER_WEBHOOK_TASK: {"queue": WEBHOOKS_QUEUE},
        },
        task_soft_time_limit=TASK_TIME_LIMIT_SECONDS - 30,
        task_time_limit=TASK_TIME_LIMIT_SECONDS,
        # Workers send task events (received, started, succeeded...: what Flower shows);
        # the API sends no "task-sent" event, which would double the cost of each enqueue
        # (a second publish) and only tells Flower that a refund is queued, as the
        # console and the refunds table do.
        task_send_sent_event=False,
        worker_send_task_events=True,
        # Refund tasks wait on Stripe and Postgres, not the CPU: threads. Each task
        # opens its own DB connection and the Stripe client keeps one HTTP session per
        # thread, so nothing mutable is shared between them. (The threads pool cannot
        # enforce the time limits above; the Stripe HTTP timeout and Postgres'
        # statement_timeout bound every call instead.)
        worker_pool="threads",
        worker_concurrency=settings.worker_concurrency,
        # If the broker connection drops, running late-ack tasks will be redelivered:
        # stop them rather than finish them twice.
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            # Redis redelivers unacked messages after this; it must exceed the longest
            # countdown and time limit or one task could run twice at once.
            "visibility_timeout": 3 * (MAX_RETRY_COUNTDOWN_SECONDS + TASK_TIME_LIMIT_SECONDS),
            # No task is sent with a priority: one Redis list per queue, not four (the
            # worker's BRPOP names 4 keys instead of 16 each time it waits for a task).
            "priority_steps": [0],
        },
        beat_schedule={
            "reconcile-stuck-refunds": {
                "task": RECONCILE_TASK,
                "schedule": settings.reconcile_interval_seconds,
                "options": {"expires": settings.reconcile_interval_seconds},
            }
        },
        timezone="UTC",
        enable_utc=True,
    )
    return app


@functools.cache
def get_celery() -> Celery:
    return make_celery()


def enqueue_refund(refund_id: str) -> bool:
    """Ask a worker to process a refund. Call only after the refund's row is committed.

    A failure here loses nothing: the pending row is the outbox and the reconciler
    enqueues it again, so the error is logged and reported, not raised.
    """
    return _enqueue(PROCESS_REFUND_TASK, REFUNDS_QUEUE, refund_id, refund_id=refund_id)


#: How long a task for a Stripe event waits before it asks Stripe, so that the events
#: Stripe sends together about one refund (refund.created, refund.updated,
#: charge.refund.updated...) are answered by one request: see ``enqueue_stripe_event``.
STRIPE_EVENT_COALESCE_SECONDS = 1.0
#: A coalescing mark outlives its task's countdown by far, yet a mark whose task is lost
#: (a worker killed before the task began) holds later events back only this long.
STRIPE_EVENT_MARK_SECONDS = 30
_MARK_PREFIX = "refunds:stripe-event-task:"


def enqueue_stripe_event(event_id: str, *, coalesce: str | None = None) -> bool:
    """Ask a worker to apply a stored Stripe event. Call only after it is committed; a
    failure loses nothing (the reconciler sends unapplied events again).

    ``coalesce`` names what the event is about (``stripe_events.coalescing_key``): the
    first such event in a while gets a task, started ``STRIPE_EVENT_COALESCE_SECONDS``
    later; the ones arriving before that task begins get none, because its answer from
    Stripe applies every event about the object stored before it asked (the task drops
    the mark as it begins: ``begin_coalesced``). A burst of Stripe's events then spends
    one request of the Stripe budget a refund, not one an event."""
    kwargs: dict[str, Any] = {}
    countdown = None
    if coalesce is not None:
        try:
            with _marks() as marks:
                first = marks.set(_MARK_PREFIX + coalesce, event_id, nx=True,
                                  ex=STRIPE_EVENT_MARK_SECONDS)
        except redis.RedisError:
            log.warning("Stripe event coalescing unavailable; a task for this event alone",
                        extra={"stripe_event_id": event_id})
        else:
            if not first:
                return True  # the task already waiting applies this event too
            kwargs, countdown = {"coalesced": coalesce}, STRIPE_EVENT_COALESCE_SECONDS
    sent = _enqueue(APPLY_STRIPE_EVENT_TASK, STRIPE_EVENTS_QUEUE, event_id, kwargs=kwargs,
                    countdown=countdown, stripe_event_id=event_id)
    if not sent and kwargs:
        begin_coalesced(coalesce)  # no task holds the mark: later events must get one
    return sent


def begin_coalesced(coalesce: str | None) -> None:
    """A coalesced task begins: from here on, a new event about its object gets a task of
    its own. Call before reading the time Stripe is asked at (``apply_stored_event``)."""
    if coalesce is None:
        return
    try:
        with _marks() as marks:
            marks.delete(_MARK_PREFIX + coalesce)
    except redis.RedisError:
        # The mark runs out on its own; events it held back meanwhile are applied by
        # the reconciler's pass over unapplied events.
        log.warning("could not drop a Stripe event coalescing mark", exc_info=True)


def _marks() -> contextlib.AbstractContextManager[redis.Redis]:
    """A client on ``REDIS_URL``, bounded as an enqueue is (the webhook waits on it), from
    a few connections a process as the enqueue's are (``_Clients``): a pooled client's
    check of each connection it hands out was two thirds of the mark's cost, and the
    mark a seventh of a webhook's CPU in a refund burst (make bench, py-spy)."""
    return _marks_clients(os.getpid()).client()


@functools.cache
def _marks_clients(pid: int) -> _Clients:
    return _Clients(get_settings().redis_url)


def _enqueue(
    task: str, queue: str, object_id: str, *, kwargs: dict[str, Any] | None = None,
    countdown: float | None = None, **log_fields: str,
) -> bool:
    app = get_celery()
    try:
        # The message Celery's ``send_task`` would send (same protocol, headers and
        # routing: the default exchange delivers to the queue the key names), published
        # without its machinery: ``send_task`` spent about 0.6 ms of CPU per call on a
        # pooled producer, signals, a retry wrapper and a queue declaration, and kombu's
        # Redis transport builds a new Redis client for every message (make bench).
        args = [object_id]
        message = app.amqp.as_task_v2(
            str(uuid.uuid4()),
            task,
            args=args,
            kwargs=kwargs or {},
            countdown=countdown,
            # What Celery's saferepr would make of one short id, without its machinery
            # (a fifth of the enqueue's CPU); Flower shows these.
            argsrepr=repr(args),
            kwargsrepr=repr(kwargs or {}),
            # As send_task sends it: None leaves the task's setting (task_ignore_result) in
            # force; as_task_v2's default, False, would have workers store every result.
            ignore_result=None,
        )
        clients = _redis_list_clients(os.getpid())
        if clients is not None:
            with clients.client() as client:
                _push_to_redis_list(client, queue, message)
        else:
            _publisher(queue)(
                message.body,
                exchange="",
                routing_key=queue,
                serializer="json",
                delivery_mode="persistent",
                headers=message.headers,
                **message.properties,
            )
    except Exception:
        log.exception("enqueue failed; the reconciler will send it again", extra=log_fields)
        return False
    # Counted here: Celery's publish signals only fire for ``send_task``.
    metrics.observe_task_published(task)
    return True


#: Bounds of one enqueue on Redis, pinned rather than left to redis-py's defaults (which
#: have been "no timeout" and, lately, three retries with backoff): the API enqueues
#: after its commit, inside the request, and a broker that accepts connections but never
#: answers must not hold the answer: at most (retries + 1) x a timeout, 2 s here.
ENQUEUE_SOCKET_TIMEOUT_SECONDS = 1.0
ENQUEUE_CONNECT_TIMEOUT_SECONDS = 1.0
ENQUEUE_RETRIES = 1
#: How these connections (the enqueue's and the coalescing marks') show in Redis'
#: CLIENT LIST, followed by the process id.
ENQUEUE_CLIENT_NAME = "refunds-enqueue"


@functools.cache
def _redis_list_clients(pid: int) -> _Clients | None:
    """Clients for the broker when it is Redis with kombu's plain key layout, else None.

    A few connections per process (``pid``: a forked child builds its own), shared by
    its threads or greenlets (``_Clients``). A client reconnects after a lost connection
    and retries the command once (a repeated LPUSH is only a second delivery, which the
    task ignores)."""
    app = get_celery()
    options = app.conf.broker_transport_options or {}
    url = app.conf.broker_url
    if urlsplit(url).scheme not in ("redis", "rediss") or options.get("global_keyprefix"):
        return None
    return _Clients(url)


#: Redis connections a process keeps for enqueues (and as many for coalescing marks).
CLIENTS_PER_PROCESS = 4


class _Clients:
    """A few one-connection clients, each lent to one caller at a time: a command holds
    one for a round trip, and a caller finding all lent waits for the first back.

    Not redis-py's pool: it checks every connection it hands out for unread data, a
    poll() that under gevent is a trip through the hub (4 % of a POST's CPU, make
    bench). Not one connection a process either: under load the web's requests queued
    for it, and the enqueue's p99 was 58-81 ms at 32 connections against 8-13 ms with
    four (make bench, initiation, per-step times on the access line), the request's
    p99 61-75 ms against 86-100 in paired runs."""

    def __init__(self, url: str, size: int = CLIENTS_PER_PROCESS) -> None:
        self._url = url
        # Each slot's client is made, and connected, by the first caller to take it: a
        # client on one connection connects as it is made, and made here, under gevent,
        # every greenlet arriving during those connects made a set of its own (the
        # functools.cache above does not wait for a first call in progress). The first
        # refund events after a start queued behind some 60 connects: 50-130 ms (make
        # bench, the webhook burst's first 100 ms).
        self._idle: LifoQueue[redis.Redis | None] = LifoQueue()
        for _ in range(size):
            self._idle.put(None)

    @contextlib.contextmanager
    def client(self) -> Iterator[redis.Redis]:
        client = self._idle.get()
        try:
            if client is None:
                client = _one_connection_client(self._url)
            yield client
        finally:
            self._idle.put(client)


def _one_connection_client(url: str) -> redis.Redis:
    """A client on one connection, bounded in time as an enqueue must be (above)."""
    return redis.Redis.from_url(
        url,
        client_name=f"{ENQUEUE_CLIENT_NAME}-{os.getpid()}",
        socket_timeout=ENQUEUE_SOCKET_TIMEOUT_SECONDS,
        socket_connect_timeout=ENQUEUE_CONNECT_TIMEOUT_SECONDS,
        retry=Retry(NoBackoff(), ENQUEUE_RETRIES),
        # No health-check PING before a command: on a silent broker it waits out the
        # socket timeout and retries on its own, doubling the bound above.
        health_check_interval=0,
        single_connection_client=True,
    )


def _push_to_redis_list(client: redis.Redis, queue: str, message: Any) -> None:
    """What kombu's Redis transport does for a message to the default exchange: LPUSH
    its envelope onto the list named after the queue (priority 0 has no suffix).
    ``tests/test_enqueue.py`` checks the envelope against kombu's own."""
    content_type, content_encoding, body = serialization.dumps(message.body, serializer="json")
    envelope = {
        "body": base64.b64encode(body.encode() if isinstance(body, str) else body).decode(),
        "content-encoding": content_encoding,
        "content-type": content_type,
        "headers": message.headers,
        "properties": {
            **message.properties,
            "delivery_mode": 2,  # persistent
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    client.lpush(queue, json.dumps(envelope))


_thread_local = threading.local()


def _publisher(queue: str) -> Callable[..., Any]:
    """For other brokers (RabbitMQ): this thread's ``Producer.publish``, wrapped once by
    ``Connection.ensure``: on a lost broker connection it reconnects and publishes again
    (twice at most).

    Kombu producers and channels are not thread-safe, so each thread keeps its own for
    as long as it lives (a gunicorn or worker thread: the life of the process)."""
    publishers: dict[str, Callable[..., Any]] = _thread_local.__dict__.setdefault("publish", {})
    publish = publishers.get(queue)
    if publish is None:
        app = get_celery()
        connection = app.connection_for_write()
        producer = connection.Producer()
        # Declared once: a RabbitMQ queue must exist before the default exchange can
        # deliver to it (the worker declares it too, but may not have started yet).
        producer.maybe_declare(app.amqp.queues[queue])
        publish = connection.ensure(
            producer, producer.publish, max_retries=2, interval_start=0, interval_step=0.2
        )
        publishers[queue] = publish
    return publish


def _forget_producers() -> None:
    # A forked child must not share its parent's broker connection.
    global _thread_local
    _thread_local = threading.local()


os.register_at_fork(after_in_child=_forget_producers)


def enqueue_reconcile() -> bool:
    """Ask for a reconcile pass now (the console's "reconcile now" for an in-flight refund).

    Passes are locked against each other, so an extra one is harmless; beat's next one
    comes anyway, so a failure is logged and reported, not raised.
    """
    try:
        get_celery().send_task(RECONCILE_TASK, retry=True, retry_policy={"max_retries": 2})
    except Exception:
        log.exception("enqueue of a reconcile pass failed")
        return False
    metrics.observe_task_published(RECONCILE_TASK)
    return True


def enqueue_webhook_delivery(delivery_id: str) -> bool:
    """Ask a worker to attempt a webhook delivery. Call only after its lease is committed.

    A failure loses nothing: the lease runs out and the dispatcher enqueues it again."""
    return _enqueue(DELIVER_WEBHOOK_TASK, WEBHOOKS_QUEUE, delivery_id, delivery_id=delivery_id)
