"""Refund events out (SPEC 13), the use cases: endpoints, fan-out, delivery, replay.

How an event travels:
1. A status change commits with its audit event; the outbox trigger (migration 0014)
   adds a ``webhook_outbox`` row in that transaction and NOTIFYs ``webhook_outbox``.
2. ``dispatch_once`` (run by workers on that NOTIFY, every
   ``WEBHOOK_DISPATCH_INTERVAL_SECONDS``, and by each reconcile pass) creates one
   ``webhook_deliveries`` row per enabled, subscribed endpoint and marks the event
   fanned out, in one transaction; then it leases the deliveries that are due and
   enqueues ``refunds.webhooks.deliver(id)`` on the ``refunds.webhooks`` queue, one
   message per ``DELIVERY_BATCH`` of an endpoint's leased deliveries. A lease that runs
   out (the message was lost with Redis, the worker was killed) makes the delivery due
   again: nothing is lost between a commit and an enqueue.
3. ``deliver`` claims the delivery it was given (exclusive for longer than the task can
   take), lets go of its database connection, signs and POSTs it; once delivered, it
   claims the endpoint's next due ones, ``DELIVERY_BATCH`` at a time, and sends each
   (its own request and ``webhook-id``) over the same keep-alive connection, recording
   every attempt of a batch in one statement: a 2xx is delivered; anything else is
   retried after the next delay of ``WEBHOOK_RETRY_SCHEDULE``, and failed after the last.

One endpoint never holds up another, nor refunds: the dispatcher gives each endpoint
at most ``ENDPOINT_IN_FLIGHT`` deliveries in flight (one while it is failing; a task
holds one until its first success, and a failure ends a batch), so a dead endpoint with
thousands of events waiting occupies one worker thread, for at most
``WEBHOOK_TIMEOUT_SECONDS`` per attempt, whatever its backlog; a task starts no attempt
after ``TASK_SECONDS``.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select, text, tuple_
from sqlalchemy.orm import Session
from standardwebhooks import Webhook

from shared.adapters import outbound_http
from shared.adapters.config import Settings, get_settings
from shared.adapters.db import driver_cursor, unit_of_work
from shared.domain.errors import NotFound, RefundServiceError
from shared.domain.models import (
    WebhookDelivery,
    WebhookDeliveryAttempt,
    WebhookEndpoint,
    WebhookOutboxEvent,
    new_id,
)
from shared.domain.outbound_events import ALL_EVENTS, check_endpoint_url, event_body, new_secret

log = logging.getLogger(__name__)

#: Deliveries one task sends, each its own signed request, over one keep-alive
#: connection to their endpoint, and records in one statement: the per-event cost of a
#: task, a connection and a transaction was most of a delivery's (make bench).
DELIVERY_BATCH = 50
#: Deliveries of one healthy endpoint leased or being attempted at once (so at most four
#: tasks of DELIVERY_BATCH); one while it is failing.
ENDPOINT_IN_FLIGHT = 4 * DELIVERY_BATCH
#: Events fanned out and deliveries leased per dispatch; the rest next time.
DISPATCH_BATCH = 1000
#: Advisory lock key of "a dispatch is running" (one at a time across processes).
DISPATCH_LOCK = (7_310_014, 0)
#: A task starts no new attempt after this long: it goes on with the endpoint's next due
#: batch after a success until then (throughput to a fast endpoint), then hands the next
#: one to the queue. Its longest run is this plus one attempt's WEBHOOK_TIMEOUT_SECONDS.
TASK_SECONDS = 2.0
ATTEMPT_LOG_SHOWN = 20
ID_MAX = 40


class EndpointDisabled(RefundServiceError):
    code = "endpoint_disabled"


# -- endpoints -------------------------------------------------------------------------


def endpoint_body(endpoint: WebhookEndpoint, *, secret: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": endpoint.id,
        "url": endpoint.url,
        "events": list(endpoint.events),
        "description": endpoint.description,
        "enabled": endpoint.enabled,
        "disabled_reason": endpoint.disabled_reason,
        "failing_since": _iso(endpoint.failing_since),
        "previous_secret_expires_at": _iso(endpoint.previous_secret_expires_at)
        if endpoint.previous_secret else None,
        "created_at": _iso(endpoint.created_at),
        "updated_at": _iso(endpoint.updated_at),
    }
    if secret:
        body["secret"] = endpoint.secret
    return body


def create_endpoint(
    *, session: Session, url: str, events: list[str] | None, description: str | None,
    production: bool,
) -> dict[str, Any]:
    endpoint = WebhookEndpoint(
        id=new_id("we"),
        url=check_endpoint_url(url, production=production),
        events=_normalized_events(events),
        description=description,
        enabled=True,
        secret=new_secret(),
    )
    session.add(endpoint)
    session.flush()
    session.refresh(endpoint)
    body = endpoint_body(endpoint, secret=True)
    session.commit()
    return body


def list_endpoints(*, session: Session) -> dict[str, Any]:
    rows = session.scalars(
        select(WebhookEndpoint).order_by(WebhookEndpoint.created_at.desc(), WebhookEndpoint.id)
    )
    return {"data": [endpoint_body(e) for e in rows]}


def get_endpoint(*, session: Session, endpoint_id: str) -> dict[str, Any]:
    return endpoint_body(_endpoint(session, endpoint_id))


def update_endpoint(
    *, session: Session, endpoint_id: str, changes: dict[str, Any], production: bool
) -> dict[str, Any]:
    """Apply the given fields (url, events, description, enabled). Enabling an endpoint
    clears why it was disabled and its failure clock; its waiting deliveries resume."""
    endpoint = _endpoint(session, endpoint_id, lock=True)
    if "url" in changes:
        endpoint.url = check_endpoint_url(changes["url"], production=production)
    if "events" in changes:
        endpoint.events = _normalized_events(changes["events"])
    if "description" in changes:
        endpoint.description = changes["description"]
    if "enabled" in changes:
        if changes["enabled"] and not endpoint.enabled:
            endpoint.disabled_reason = None
            endpoint.failing_since = None
        elif not changes["enabled"] and endpoint.enabled:
            endpoint.disabled_reason = "disabled by an operator"
        endpoint.enabled = changes["enabled"]
    endpoint.updated_at = func.now()
    session.flush()
    session.refresh(endpoint)
    body = endpoint_body(endpoint)
    session.commit()
    return body


#: How long events are signed with the old secret too after a rotation, by default.
ROTATION_OVERLAP_SECONDS = 24 * 3600


def rotate_secret(
    *, session: Session, endpoint_id: str, overlap_seconds: int = ROTATION_OVERLAP_SECONDS
) -> dict[str, Any]:
    """A new secret, shown once; the old one keeps signing too for ``overlap_seconds``
    (0: it stops at once, for a secret that leaked)."""
    endpoint = _endpoint(session, endpoint_id, lock=True)
    endpoint.previous_secret = endpoint.secret if overlap_seconds > 0 else None
    endpoint.previous_secret_expires_at = (
        func.now() + timedelta(seconds=overlap_seconds) if overlap_seconds > 0 else None
    )
    endpoint.secret = new_secret()
    endpoint.updated_at = func.now()
    session.flush()
    session.refresh(endpoint)
    body = endpoint_body(endpoint, secret=True)
    session.commit()
    log.info("webhook endpoint secret rotated",
             extra={"endpoint_id": endpoint_id, "overlap_seconds": overlap_seconds})
    return body


def delete_endpoint(*, session: Session, endpoint_id: str) -> None:
    """The endpoint and its delivery log go; the events themselves stay in the outbox."""
    endpoint = _endpoint(session, endpoint_id, lock=True)
    session.delete(endpoint)
    session.commit()


def _endpoint(session: Session, endpoint_id: str, *, lock: bool = False) -> WebhookEndpoint:
    if not _could_be_id(endpoint_id):
        raise NotFound("No webhook endpoint has that id.")
    query = select(WebhookEndpoint).where(WebhookEndpoint.id == endpoint_id)
    endpoint = session.scalar(query.with_for_update() if lock else query)
    if endpoint is None:
        raise NotFound(f"No webhook endpoint has the id '{endpoint_id}'.")
    return endpoint


def _normalized_events(events: list[str] | None) -> list[str]:
    if not events or ALL_EVENTS in events:
        return [ALL_EVENTS]
    return sorted(set(events))


def _could_be_id(value: str) -> bool:
    return 0 < len(value) <= ID_MAX and value.isascii() and value.isprintable()


# -- fan-out and scheduling ----------------------------------------------------------------

_FAN_OUT = """
WITH batch AS (
    SELECT id FROM webhook_outbox WHERE fanned_out_at IS NULL
    ORDER BY created_at LIMIT :batch FOR UPDATE SKIP LOCKED
), marked AS (
    UPDATE webhook_outbox o SET fanned_out_at = now() FROM batch WHERE o.id = batch.id
    RETURNING o.id, o.type
), created AS (
    INSERT INTO webhook_deliveries (id, endpoint_id, event_id, status, next_attempt_at)
    SELECT 'whd_' || replace(gen_random_uuid()::text, '-', ''), e.id, m.id, 'pending', now()
    FROM marked m JOIN webhook_endpoints e
      ON e.enabled AND (e.events ? '*' OR e.events ? m.type)
    ON CONFLICT (endpoint_id, event_id) DO NOTHING
    RETURNING 1
)
SELECT (SELECT count(*) FROM marked) AS events, (SELECT count(*) FROM created) AS deliveries
"""

# Due deliveries of each enabled endpoint, oldest due first, as many as its room: its
# in-flight cap less those already leased or being attempted. Per endpoint, through
# ix_webhook_deliveries_endpoint_due, so a dispatch (one on every commit's NOTIFY) takes
# the head of each endpoint's backlog instead of ranking the whole backlog; counting
# what is in flight still reads the endpoint's pending rows through that index.
_LEASE_DUE = """
WITH room AS (
    SELECT e.id AS endpoint_id,
           CASE WHEN e.failing_since IS NULL THEN :in_flight ELSE 1 END - (
               SELECT count(*) FROM webhook_deliveries b
               WHERE b.endpoint_id = e.id AND b.status = 'pending'
                 AND (b.scheduled_until > now() OR b.attempting_until > now())
           ) AS n
    FROM webhook_endpoints e WHERE e.enabled
), due AS (
    SELECT d.id, room.endpoint_id,
           row_number() OVER (PARTITION BY room.endpoint_id
                              ORDER BY d.next_attempt_at, d.id) AS rank
    FROM room CROSS JOIN LATERAL (
        SELECT id, next_attempt_at FROM webhook_deliveries d
        WHERE d.endpoint_id = room.endpoint_id AND d.status = 'pending'
          AND d.next_attempt_at <= now()
          AND (d.scheduled_until IS NULL OR d.scheduled_until <= now())
          AND (d.attempting_until IS NULL OR d.attempting_until <= now())
        ORDER BY d.next_attempt_at, d.id
        LIMIT least(greatest(room.n, 0), :batch)
    ) d
)
UPDATE webhook_deliveries d
SET scheduled_until = now() + make_interval(secs => :lease)
FROM due WHERE d.id = due.id
RETURNING d.id, due.rank
"""


def lease_seconds(settings: Settings) -> float:
    """How long an enqueued delivery is left to the queue before it is enqueued again:
    longer than an attempt, short enough that a lost message costs seconds."""
    return 3 * settings.webhook_timeout_seconds + 5


def dispatch_once(
    *, enqueue: Callable[[str], bool] | None = None, wait: bool = True
) -> dict[str, int | bool]:
    """Fan out new events and enqueue the deliveries that are due; safe to run anywhere,
    any time. One runs at a time: with ``wait`` the next waits for it (and then sees what
    committed meanwhile), without it skips."""
    from shared.adapters.celery_app import enqueue_webhook_delivery

    enqueue = enqueue or enqueue_webhook_delivery
    settings = get_settings()
    with unit_of_work() as session:
        lock = func.pg_advisory_xact_lock if wait else func.pg_try_advisory_xact_lock
        if session.scalar(select(lock(*DISPATCH_LOCK))) is False:
            return {"skipped": True}
        fanned = session.execute(text(_FAN_OUT), {"batch": DISPATCH_BATCH}).one()
        leased = session.execute(
            text(_LEASE_DUE),
            {"in_flight": ENDPOINT_IN_FLIGHT, "lease": lease_seconds(settings),
             "batch": DISPATCH_BATCH},
        ).all()
        session.commit()
    # One task per DELIVERY_BATCH leased deliveries of an endpoint: it is given the first
    # and claims the rest itself.
    ids = [row.id for row in sorted(leased, key=lambda row: row.rank)
           if (row.rank - 1) % DELIVERY_BATCH == 0]
    enqueued = sum(1 for delivery_id in ids if enqueue(delivery_id))
    return {"skipped": False, "events": int(fanned.events),
            "deliveries_created": int(fanned.deliveries), "enqueued": enqueued}


def dispatch_in_reconcile() -> int:
    """The reconcile pass's share: what the workers' dispatchers left (none running, a
    lost NOTIFY). Never fails the pass; returns how many deliveries it enqueued."""
    try:
        result = dispatch_once(wait=False)
    except Exception:
        log.exception("webhook dispatch in the reconcile pass failed")
        return 0
    return int(result.get("enqueued", 0))


# -- delivering a batch -----------------------------------------------------------------
# Plain SQL on the session's psycopg connection (``driver_cursor``): a delivery to a fast
# endpoint is an HTTP request and a share of a few statements, and the ORM's per-statement
# cost was most of its CPU (bench/events.py). One transaction claims a batch and reads
# its events; one records every attempt of the batch and, after a success, claims the
# endpoint's next batch.

_CLAIMED = """
    d.id, d.endpoint_id, d.event_id, d.schedule_step, d.resend_requested_by,
    e.url, e.secret, e.failing_since, o.type, o.sequence, o.previous_status, o.refund,
    o.occurred_at,
    CASE WHEN e.previous_secret_expires_at > now() THEN e.previous_secret END
        AS previous_secret
"""
_CLAIMED_NAMES = """id, endpoint_id, event_id, schedule_step, resend_requested_by, url, secret,
    failing_since, type, sequence, previous_status, refund, occurred_at, previous_secret"""

# The delivery a task was given, if it is still due and nobody is attempting it.
_CLAIM = f"""
UPDATE webhook_deliveries d
SET attempting_until = now() + make_interval(secs => %(hold)s), scheduled_until = NULL
FROM webhook_endpoints e, webhook_outbox o
WHERE d.id = %(id)s AND e.id = d.endpoint_id AND o.id = d.event_id AND e.enabled
  AND d.status = 'pending' AND d.next_attempt_at <= now()
  AND (d.attempting_until IS NULL OR d.attempting_until <= now())
RETURNING {_CLAIMED}
"""  # noqa: S608 - built from constants only

# Up to %(limit)s more due deliveries of an endpoint, oldest due first: even ones enqueued
# and waiting for a thread (their messages then find nothing to do), so a busy endpoint's
# deliveries never wait behind the queue.
_CLAIM_MORE = f"""
WITH batch AS (
    SELECT id FROM webhook_deliveries
    WHERE endpoint_id = %(endpoint_id)s AND status = 'pending' AND next_attempt_at <= now()
      AND (attempting_until IS NULL OR attempting_until <= now())
    ORDER BY next_attempt_at, id LIMIT %(limit)s FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE webhook_deliveries d
    SET attempting_until = now() + make_interval(secs => %(hold)s), scheduled_until = NULL
    FROM batch, webhook_endpoints e, webhook_outbox o
    WHERE d.id = batch.id AND e.id = d.endpoint_id AND o.id = d.event_id AND e.enabled
    RETURNING {_CLAIMED}, d.next_attempt_at AS due
)
SELECT {_CLAIMED_NAMES} FROM claimed ORDER BY due, id
"""  # noqa: S608 - built from constants only

# Or, when the task has gone on long enough, the next one not already enqueued is
# handed to the queue.
_LEASE_NEXT = """
UPDATE webhook_deliveries SET scheduled_until = now() + make_interval(secs => %(lease)s)
WHERE id = (
    SELECT id FROM webhook_deliveries
    WHERE endpoint_id = %(endpoint_id)s AND status = 'pending' AND next_attempt_at <= now()
      AND (scheduled_until IS NULL OR scheduled_until <= now())
      AND (attempting_until IS NULL OR attempting_until <= now())
    ORDER BY next_attempt_at, id LIMIT 1 FOR UPDATE SKIP LOCKED
)
RETURNING id
"""

# Every attempt of a batch in one statement: its log rows, its deliveries' new state, and
# the claimed deliveries the task did not get to let go of.
_RECORD = """
WITH outcome AS (
    SELECT * FROM unnest(
        %(ids)s::text[], %(attempted_at)s::timestamptz[], %(duration_ms)s::int[],
        %(status_code)s::int[], %(error)s::text[], %(response_body)s::text[],
        %(requested_by)s::text[], %(status)s::text[], %(step)s::int[], %(delay)s::float8[]
    ) AS t(id, attempted_at, duration_ms, status_code, error, response_body, requested_by,
           status, step, delay)
), attempt AS (
    INSERT INTO webhook_delivery_attempts (delivery_id, attempted_at, duration_ms,
                                           status_code, error, response_body, requested_by)
    SELECT id, attempted_at, duration_ms, status_code, error, response_body, requested_by
    FROM outcome
), released AS (
    UPDATE webhook_deliveries SET attempting_until = NULL
    WHERE id = ANY(%(unattempted)s::text[]) AND status = 'pending'
)
UPDATE webhook_deliveries d SET
    status = o.status,
    attempts = d.attempts + 1,
    schedule_step = o.step,
    next_attempt_at = CASE WHEN o.status = 'pending'
        THEN now() + make_interval(secs => o.delay) END,
    delivered_at = CASE WHEN o.status = 'delivered' THEN now() ELSE d.delivered_at END,
    attempting_until = NULL, scheduled_until = NULL, resend_requested_by = NULL,
    last_attempt_at = o.attempted_at, last_status_code = o.status_code,
    last_error = o.error, updated_at = now()
FROM outcome o
WHERE d.id = o.id
"""


@dataclass(frozen=True)
class Claimed:
    id: str
    endpoint_id: str
    event_id: str
    schedule_step: int
    resend_requested_by: str | None
    url: str
    secret: str
    failing_since: datetime | None
    type: str
    sequence: int
    previous_status: str | None
    refund: dict[str, Any]
    occurred_at: datetime
    previous_secret: str | None

    def body(self) -> str:
        return event_body(
            event_id=self.event_id, event_type=self.type, occurred_at=self.occurred_at,
            refund_row=self.refund, previous_status=self.previous_status,
            sequence=self.sequence,
        )


@dataclass(frozen=True)
class Outcome:
    delivery_id: str
    outcome: str  # delivered | retry | failed | skipped
    status_code: int | None = None
    error: str | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class _Attempt:
    claimed: Claimed
    answer: outbound_http.Answer
    attempted_at: datetime


def deliver(
    delivery_id: str,
    *,
    enqueue: Callable[[str], bool] | None = None,
    observe: Callable[[Outcome], None] | None = None,
    pace: Callable[[float], None] | None = None,
) -> list[Outcome]:
    """Attempt the given delivery now; once it is delivered, go on with batches of up to
    DELIVERY_BATCH due ones of the same endpoint, oldest first, one request each over the
    same connection, until a failure or ``TASK_SECONDS``; then hand the next one to the
    queue.
    ``pace`` is told the CPU seconds of this thread after each attempt and each record
    (the worker pauses deliveries there to leave refunds the CPU). Returns what each
    attempt did."""
    from shared.adapters.celery_app import enqueue_webhook_delivery

    enqueue = enqueue or enqueue_webhook_delivery
    settings = get_settings()
    # Longer than a task can attempt (TASK_SECONDS and one attempt's timeout): a worker
    # killed mid-batch leaves its deliveries due again after this, never lost.
    hold = settings.webhook_timeout_seconds + TASK_SECONDS + 15
    with unit_of_work() as session:
        row = driver_cursor(session).execute(_CLAIM, {"id": delivery_id, "hold": hold}).fetchone()
        session.commit()  # the connection goes back to the pool before the HTTP calls
    # The given one first, alone: an endpoint that does not answer holds one delivery
    # per task, not a batch; after it is delivered, the endpoint's next due ones follow.
    batch = [Claimed(**row._asdict())] if row is not None else []
    if not batch:
        return [Outcome(delivery_id, "skipped")]
    outcomes: list[Outcome] = []
    started = time.monotonic()
    cpu = time.thread_time()

    def step_done() -> None:
        nonlocal cpu
        if pace is not None:
            pace(time.thread_time() - cpu)
            cpu = time.thread_time()

    with outbound_http.Sender(batch[0].url) as sender:
        while batch:
            attempts: list[_Attempt] = []
            for claimed in batch:
                attempts.append(_attempt(claimed, sender, settings))
                step_done()
                if not attempts[-1].answer.delivered:
                    break  # the endpoint is failing: the rest wait for their turn
                if time.monotonic() - started >= TASK_SECONDS:
                    break
            then = "claim" if time.monotonic() - started < TASK_SECONDS else "lease"
            results, batch, handed = _record(attempts, batch[len(attempts):],
                                             settings=settings, then=then, hold=hold)
            outcomes += results
            step_done()
            if observe is not None:
                for result in results:
                    observe(result)
            if handed is not None:
                enqueue(handed)
    return outcomes


def _claim_more(cursor: Any, endpoint_id: str, limit: int, hold: float) -> list[Claimed]:
    rows = cursor.execute(_CLAIM_MORE, {"endpoint_id": endpoint_id, "limit": limit,
                                        "hold": hold}).fetchall()
    return [Claimed(**row._asdict()) for row in rows]


def _attempt(claimed: Claimed, sender: outbound_http.Sender, settings: Settings) -> _Attempt:
    body = claimed.body()
    attempted_at = datetime.now(UTC)
    if settings.is_production and not claimed.url.startswith("https://"):
        # Saved before the service ran in production: never sent in the clear there.
        answer = outbound_http.Answer(
            status=None, body=None, seconds=0.0,
            error="refused: production sends events only to https:// URLs",
        )
    else:
        headers = signed_request(secret=claimed.secret, event_id=claimed.event_id, body=body,
                                 now=attempted_at, previous_secret=claimed.previous_secret)
        answer = sender.post(body.encode(), headers, timeout=settings.webhook_timeout_seconds)
    return _Attempt(claimed, answer, attempted_at)


def _record(
    attempts: list[_Attempt], unattempted: list[Claimed], *, settings: Settings, then: str,
    hold: float,
) -> tuple[list[Outcome], list[Claimed], str | None]:
    """Record a batch's attempts (and let go of the deliveries it did not get to); after
    a batch all delivered, claim (or lease, to hand to the queue) the endpoint's next in
    the same transaction."""
    delays = settings.webhook_retry_delays
    rows: dict[str, list[Any]] = {name: [] for name in (
        "ids", "attempted_at", "duration_ms", "status_code", "error", "response_body",
        "requested_by", "status", "step", "delay")}
    results: list[Outcome] = []
    for attempt in attempts:
        claimed, answer = attempt.claimed, attempt.answer
        step = claimed.schedule_step + 1
        if answer.delivered:
            outcome, status, step = "delivered", "delivered", claimed.schedule_step
        elif step > len(delays):
            outcome, status = "failed", "failed"
        else:
            outcome, status = "retry", "pending"
        for name, value in (
            ("ids", claimed.id), ("attempted_at", attempt.attempted_at),
            ("duration_ms", round(answer.seconds * 1000)), ("status_code", answer.status),
            ("error", answer.error), ("response_body", answer.body),
            ("requested_by", claimed.resend_requested_by), ("status", status),
            ("step", step), ("delay", float(delays[step - 1]) if outcome == "retry" else 0.0),
        ):
            rows[name].append(value)
        results.append(Outcome(claimed.id, outcome, answer.status, answer.error,
                               answer.seconds))
    endpoint_id = attempts[0].claimed.endpoint_id
    delivered = all(result.outcome == "delivered" for result in results)
    following: list[Claimed] = []
    handed: str | None = None
    with unit_of_work() as session:
        cursor = driver_cursor(session)
        cursor.execute(_RECORD, {**rows, "unattempted": [c.id for c in unattempted]})
        if delivered:
            if any(a.claimed.failing_since is not None for a in attempts):
                cursor.execute("UPDATE webhook_endpoints SET failing_since = NULL "
                               "WHERE id = %(id)s", {"id": endpoint_id})
            if then == "claim":
                following = _claim_more(cursor, endpoint_id, DELIVERY_BATCH, hold)
            else:
                row = cursor.execute(_LEASE_NEXT, {"endpoint_id": endpoint_id,
                                                   "lease": lease_seconds(settings)}).fetchone()
                handed = row.id if row is not None else None
        else:
            _note_failure(session, endpoint_id, settings)
        session.commit()
    return results, following, handed


def _note_failure(session: Session, endpoint_id: str, settings: Settings) -> None:
    """Start the endpoint's failure clock, and disable it once every attempt has failed
    for WEBHOOK_DISABLE_AFTER_SECONDS."""
    disabled = session.execute(
        text("""
            UPDATE webhook_endpoints SET
                failing_since = coalesce(failing_since, now()),
                enabled = CASE WHEN failing_since <= now() - make_interval(secs => :after)
                               THEN false ELSE enabled END,
                disabled_reason = CASE WHEN failing_since <= now() - make_interval(secs => :after)
                    THEN 'every delivery failed since ' || to_char(failing_since AT TIME ZONE 'UTC',
                         'YYYY-MM-DD"T"HH24:MI:SS"Z"') || '; enable it again once it answers 2xx'
                    ELSE disabled_reason END,
                updated_at = now()
            WHERE id = :id AND enabled
            RETURNING enabled
        """),
        {"id": endpoint_id, "after": settings.webhook_disable_after_seconds},
    ).scalar()
    if disabled is False:
        log.error("webhook endpoint disabled after failing for %ss",
                  int(settings.webhook_disable_after_seconds),
                  extra={"endpoint_id": endpoint_id})


def postpone(delivery_id: str, seconds: float = 1.0) -> None:
    """Leave a leased delivery to a later dispatch (this worker has no room for it now)."""
    with unit_of_work() as session:
        session.execute(
            text("UPDATE webhook_deliveries SET scheduled_until = now() + "
                 "make_interval(secs => :seconds) WHERE id = :id AND status = 'pending'"),
            {"id": delivery_id, "seconds": seconds},
        )
        session.commit()


def signed_request(
    *, secret: str, event_id: str, body: str, now: datetime | None = None,
    previous_secret: str | None = None,
) -> dict[str, str]:
    """The Standard Webhooks headers for ``body``: the event id as ``webhook-id`` (the same
    on every retry), the time of this attempt, and the signature over both and the body;
    during a rotation, a second signature with the previous secret (space-separated, as
    the scheme allows), so either secret verifies."""
    moment = now or datetime.now(UTC)
    signatures = [Webhook(secret).sign(event_id, moment, body)]
    if previous_secret:
        signatures.append(Webhook(previous_secret).sign(event_id, moment, body))
    return {
        "webhook-id": event_id,
        "webhook-timestamp": str(int(moment.timestamp())),
        "webhook-signature": " ".join(signatures),
    }


# -- the console ---------------------------------------------------------------------


@dataclass(frozen=True)
class ConsoleOverview:
    now: datetime
    endpoints: list[Any]
    failing: list[Any]


def console_overview(*, session: Session, failing_limit: int) -> ConsoleOverview:
    """Every endpoint with its backlog, and the deliveries whose last attempt failed."""
    now = session.scalar(select(func.now()))
    endpoints = session.execute(text("""
        SELECT e.id, e.url, e.description, e.events, e.enabled, e.disabled_reason,
               e.failing_since,
               count(d.id) FILTER (WHERE d.status = 'pending') AS pending,
               count(d.id) FILTER (WHERE d.status = 'failed') AS failed,
               min(o.occurred_at) FILTER (WHERE d.status = 'pending') AS oldest_pending
        FROM webhook_endpoints e
        LEFT JOIN webhook_deliveries d ON d.endpoint_id = e.id AND d.status <> 'delivered'
        LEFT JOIN webhook_outbox o ON o.id = d.event_id
        GROUP BY e.id ORDER BY e.created_at DESC, e.id
    """)).all()
    failing = session.execute(text("""
        SELECT d.id, d.endpoint_id, d.event_id, o.type AS event_type, o.refund_id, d.status,
               d.attempts, d.last_attempt_at, d.last_error, d.next_attempt_at
        FROM webhook_deliveries d JOIN webhook_outbox o ON o.id = d.event_id
        WHERE d.status <> 'delivered' AND d.last_error IS NOT NULL
        ORDER BY d.last_attempt_at DESC LIMIT :limit
    """), {"limit": failing_limit}).all()
    return ConsoleOverview(now=now, endpoints=list(endpoints), failing=list(failing))


# -- delivery log and replay ---------------------------------------------------------


class InvalidCursor(ValueError):
    pass


def list_deliveries(
    *, session: Session, endpoint_id: str, status: str | None, limit: int,
    cursor: str | None,
) -> dict[str, Any]:
    """The endpoint's deliveries, newest first, with their attempts."""
    _endpoint(session, endpoint_id)
    query = (
        select(WebhookDelivery, WebhookOutboxEvent.type, WebhookOutboxEvent.refund_id)
        .join(WebhookOutboxEvent, WebhookOutboxEvent.id == WebhookDelivery.event_id)
        .where(WebhookDelivery.endpoint_id == endpoint_id)
    )
    if status is not None:
        query = query.where(WebhookDelivery.status == status)
    if cursor is not None:
        created, last_id = _decode_cursor(cursor)
        query = query.where(
            tuple_(WebhookDelivery.created_at, WebhookDelivery.id) < tuple_(created, last_id)
        )
    rows = session.execute(
        query.order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id.desc())
        .limit(limit + 1)
    ).all()
    page = rows[:limit]
    attempts = _attempt_logs(session, [row[0].id for row in page])
    data = [
        delivery_body(delivery, event_type=event_type, refund_id=refund_id,
                      attempt_log=attempts.get(delivery.id, []))
        for delivery, event_type, refund_id in page
    ]
    next_cursor = _encode_cursor(page[-1][0]) if len(rows) > limit else None
    return {"data": data, "has_more": next_cursor is not None, "next_cursor": next_cursor}


def delivery_body(
    delivery: WebhookDelivery, *, event_type: str, refund_id: str,
    attempt_log: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "id": delivery.id,
        "endpoint_id": delivery.endpoint_id,
        "event_id": delivery.event_id,
        "event_type": event_type,
        "refund_id": refund_id,
        "status": delivery.status,
        "attempts": delivery.attempts,
        "next_attempt_at": _iso(delivery.next_attempt_at) if delivery.status == "pending"
        else None,
        "last_attempt_at": _iso(delivery.last_attempt_at),
        "last_status_code": delivery.last_status_code,
        "last_error": delivery.last_error,
        "delivered_at": _iso(delivery.delivered_at),
        "created_at": _iso(delivery.created_at),
        "attempt_log": attempt_log,
    }


def _attempt_logs(session: Session, ids: list[str]) -> dict[str, list[dict[str, Any]]]:
    if not ids:
        return {}
    ranked = (
        select(
            WebhookDeliveryAttempt,
            func.row_number().over(
                partition_by=WebhookDeliveryAttempt.delivery_id,
                order_by=WebhookDeliveryAttempt.id.desc(),
            ).label("rank"),
        )
        .where(WebhookDeliveryAttempt.delivery_id.in_(ids))
        .subquery()
    )
    rows = session.execute(
        select(ranked).where(ranked.c.rank <= ATTEMPT_LOG_SHOWN).order_by(ranked.c.id)
    ).all()
    logs: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        logs.setdefault(row.delivery_id, []).append({
            "attempted_at": _iso(row.attempted_at),
            "duration_ms": row.duration_ms,
            "status_code": row.status_code,
            "error": row.error,
            "response_body": row.response_body,
            "requested_by": row.requested_by,
        })
    return logs


def resend(*, session: Session, delivery_id: str, requested_by: str) -> dict[str, Any]:
    """Send a delivery again now, whatever its status: one more attempt for a delivered or
    failed one, the next retry brought forward for a pending one. Commits; the caller
    enqueues ``delivery_id`` afterwards."""
    if not _could_be_id(delivery_id):
        raise NotFound("No webhook delivery has that id.")
    row = session.execute(
        select(WebhookDelivery, WebhookEndpoint.enabled)
        .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
        .where(WebhookDelivery.id == delivery_id)
        .with_for_update(of=WebhookDelivery)
    ).first()
    if row is None:
        raise NotFound(f"No webhook delivery has the id '{delivery_id}'.")
    delivery, enabled = row
    if not enabled:
        raise EndpointDisabled("The endpoint is disabled; enable it (PATCH enabled: true) "
                               "before sending its events again.")
    settings = get_settings()
    if delivery.status != "pending":
        # One attempt: if it fails, the delivery is failed again rather than rescheduled.
        delivery.schedule_step = len(settings.webhook_retry_delays)
    delivery.status = "pending"
    delivery.next_attempt_at = func.now()
    delivery.scheduled_until = func.now() + timedelta(seconds=lease_seconds(settings))
    delivery.resend_requested_by = requested_by
    delivery.updated_at = func.now()
    session.flush()
    session.refresh(delivery)
    event = session.get(WebhookOutboxEvent, delivery.event_id)
    body = delivery_body(
        delivery, event_type=event.type if event else "", refund_id=event.refund_id if event
        else "", attempt_log=_attempt_logs(session, [delivery.id]).get(delivery.id, []),
    )
    session.commit()
    log.info("webhook delivery sent again on request",
             extra={"delivery_id": delivery_id, "requested_by": requested_by})
    return body


def _encode_cursor(delivery: WebhookDelivery) -> str:
    raw = json.dumps([delivery.created_at.isoformat(), delivery.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, last_id = json.loads(raw)
        position = datetime.fromisoformat(created)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise InvalidCursor("cursor is not one this service returned") from exc
    if position.tzinfo is None or not isinstance(last_id, str) or not _could_be_id(last_id):
        raise InvalidCursor("cursor is not one this service returned")
    return position, last_id


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
