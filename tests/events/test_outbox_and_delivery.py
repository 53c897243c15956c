"""The outbox, fan-out and one delivery, run in this process against real Postgres and
a real HTTP receiver on loopback; every delivery is verified with ``standardwebhooks``
as a consumer would."""

from __future__ import annotations

import socket
import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session
from standardwebhooks import Webhook

from shared.adapters import outbound_http
from shared.domain.models import (
    RefundEvent,
    RefundStatus,
    WebhookDelivery,
    WebhookDeliveryAttempt,
    WebhookEndpoint,
    WebhookOutboxEvent,
)
from shared.services import webhook_delivery
from shared.services.transitions import record_event
from tests.events.conftest import Receiver, make_endpoint, make_refund, move

S = RefundStatus


def outbox_of(db: Session, refund_id: str) -> list[WebhookOutboxEvent]:
    db.expire_all()
    return list(db.scalars(select(WebhookOutboxEvent)
                           .where(WebhookOutboxEvent.refund_id == refund_id)
                           .order_by(WebhookOutboxEvent.sequence)))


def dispatch() -> list[str]:
    enqueued: list[str] = []
    result = webhook_delivery.dispatch_once(enqueue=lambda i: enqueued.append(i) or True)
    assert result["skipped"] is False
    return enqueued


def deliveries_of(db: Session, endpoint_id: str) -> list[WebhookDelivery]:
    db.expire_all()
    return list(db.scalars(select(WebhookDelivery)
                           .where(WebhookDelivery.endpoint_id == endpoint_id)
                           .order_by(WebhookDelivery.created_at, WebhookDelivery.id)))


def make_due(db: Session, delivery_id: str) -> None:
    db.execute(update(WebhookDelivery).where(WebhookDelivery.id == delivery_id)
               .values(next_attempt_at=datetime.now(UTC) - timedelta(seconds=1)))
    db.commit()


def verify(endpoint: WebhookEndpoint, receiver: Receiver) -> list[dict]:
    """Every request the receiver got, checked with the library, parsed."""
    hook = Webhook(endpoint.secret)
    return [hook.verify(r.body, r.headers) for r in receiver.received]


# -- the outbox ------------------------------------------------------------------------


def test_every_status_change_commits_with_its_event_numbered_in_order(edb: Session) -> None:
    refund_id = make_refund(edb)
    move(edb, refund_id, S.PROCESSING)
    move(edb, refund_id, S.SUCCEEDED, stripe_refund_id=f"re_{refund_id}")
    move(edb, refund_id, S.FAILED, failure_reason="expired_or_canceled_card")
    events = outbox_of(edb, refund_id)
    assert [(e.type, e.previous_status, e.sequence) for e in events] == [
        ("refund.created", None, 1),
        ("refund.processing", "pending", 2),
        ("refund.succeeded", "processing", 3),
        ("refund.failed", "succeeded", 4),  # a late failure
    ]
    assert [e.refund["status"] for e in events] == ["pending", "processing", "succeeded",
                                                   "failed"]
    assert events[3].refund["failure_reason"] == "expired_or_canceled_card"
    assert all(e.id.startswith("evt_") for e in events)


def test_a_rolled_back_change_leaves_no_event_and_a_non_change_makes_none(edb: Session) -> None:
    refund_id = make_refund(edb)
    transition(edb, refund_id, S.PROCESSING)
    edb.rollback()
    record_event(edb, refund_id=refund_id, from_status="pending", to_status="pending",
                 actor="worker", detail={"attempt": 1})
    edb.commit()
    assert [e.type for e in outbox_of(edb, refund_id)] == ["refund.created"]
    assert edb.scalar(select(RefundEvent.id).where(RefundEvent.refund_id == refund_id)
                      .where(RefundEvent.from_status == "pending")) is not None


def test_with_no_endpoint_enabled_events_are_kept_with_no_fan_out_work(
    edb: Session, events_env: dict[str, str], receiver: Receiver
) -> None:
    """Nobody subscribed: the event is recorded already fanned out and wakes no dispatcher
    (no NOTIFY); an endpoint receives what changes while it is enabled."""
    import psycopg

    with psycopg.connect(events_env["DATABASE_URL"].replace("+psycopg", ""),
                         autocommit=True) as listener:
        listener.execute("LISTEN webhook_outbox")
        quiet = make_refund(edb)
        move(edb, quiet, S.SUCCEEDED)
        assert [e.fanned_out_at is not None for e in outbox_of(edb, quiet)] == [True, True]
        assert list(listener.notifies(timeout=0.5)) == []
        endpoint = make_endpoint(edb, receiver.url)
        heard = make_refund(edb)
        assert [e.fanned_out_at for e in outbox_of(edb, heard)] == [None]
        assert len(list(listener.notifies(timeout=2, stop_after=1))) == 1
    dispatch()
    assert [d.event_id for d in deliveries_of(edb, endpoint.id)] == [
        e.id for e in outbox_of(edb, heard)]


def transition(db: Session, refund_id: str, to_status: RefundStatus) -> None:
    from shared.services.transitions import transition as move_refund

    assert move_refund(db, refund_id, to_status, actor="worker") is not None


def test_fan_out_makes_one_delivery_per_subscribed_enabled_endpoint(
    edb: Session, receiver: Receiver
) -> None:
    everything = make_endpoint(edb, receiver.url)
    finished = make_endpoint(edb, receiver.url, events=["refund.succeeded"])
    off = make_endpoint(edb, receiver.url)
    edb.execute(update(WebhookEndpoint).where(WebhookEndpoint.id == off.id)
                .values(enabled=False))
    edb.commit()
    refund_id = make_refund(edb)
    move(edb, refund_id, S.SUCCEEDED)
    enqueued = dispatch()
    assert len(deliveries_of(edb, everything.id)) == 2
    assert len(deliveries_of(edb, finished.id)) == 1
    assert deliveries_of(edb, off.id) == []
    # All leased; one task per endpoint, given its first (it claims the rest itself).
    assert all(d.scheduled_until is not None for e in (everything, finished)
               for d in deliveries_of(edb, e.id))
    assert sorted(enqueued) == sorted(deliveries_of(edb, e.id)[0].id
                                      for e in (everything, finished))
    # Leased: the next dispatch leaves them to the queue; fanned out: no second delivery.
    assert dispatch() == []
    assert len(deliveries_of(edb, everything.id)) == 2


def test_a_lease_that_runs_out_is_enqueued_again(edb: Session, receiver: Receiver) -> None:
    """A message lost with Redis, or an enqueue that never happened after the commit."""
    endpoint = make_endpoint(edb, receiver.url)
    make_refund(edb)
    (delivery_id,) = dispatch()
    edb.execute(update(WebhookDelivery).where(WebhookDelivery.id == delivery_id)
                .values(scheduled_until=datetime.now(UTC) - timedelta(seconds=1)))
    edb.commit()
    assert dispatch() == [delivery_id]
    assert len(deliveries_of(edb, endpoint.id)) == 1


# -- one delivery ----------------------------------------------------------------------


def test_a_delivery_is_signed_and_shaped_as_the_spec_says(
    edb: Session, receiver: Receiver
) -> None:
    endpoint = make_endpoint(edb, receiver.url)
    refund_id = make_refund(edb, amount=1_234)
    move(edb, refund_id, S.SUCCEEDED, stripe_refund_id=f"re_{refund_id}")
    for delivery_id in dispatch():
        webhook_delivery.deliver(delivery_id)
    bodies = sorted(verify(endpoint, receiver), key=lambda b: b["data"]["sequence"])
    assert [b["type"] for b in bodies] == ["refund.created", "refund.succeeded"]
    created, succeeded = bodies
    assert set(succeeded) == {"id", "type", "timestamp", "data"}
    assert set(succeeded["data"]) == {"refund", "previous_status", "sequence"}
    assert succeeded["data"]["previous_status"] == "pending"
    assert created["data"]["previous_status"] is None
    refund = succeeded["data"]["refund"]
    assert refund["refund_id"] == refund_id and refund["amount_cents"] == 1_234
    assert refund["status"] == "succeeded" and refund["stripe_refund_id"] == f"re_{refund_id}"
    assert set(refund) == {"refund_id", "payment_id", "charge_id", "amount_cents", "status",
                           "stripe_refund_id", "currency", "reason", "failure_reason",
                           "initiated_by", "created_at", "updated_at", "attempts"}
    assert succeeded["timestamp"].endswith("Z")
    datetime.fromisoformat(succeeded["timestamp"])
    for got, body in zip(receiver.received, verify(endpoint, receiver), strict=True):
        assert got.headers["webhook-id"] == body["id"]
        assert abs(int(got.headers["webhook-timestamp"]) - time.time()) < 60
        assert got.headers["content-type"] == "application/json"
    # Nothing internal or secret leaves.
    raw = b"".join(r.body for r in receiver.received)
    for secret_thing in (b"stripe_idempotency_key", b"last_error", endpoint.secret.encode()):
        assert secret_thing not in raw
    assert all(d.status == "delivered" for d in deliveries_of(edb, endpoint.id))


def test_retries_keep_the_webhook_id_and_body_and_follow_the_schedule(
    edb: Session, receiver: Receiver
) -> None:
    endpoint = make_endpoint(edb, receiver.url)
    make_refund(edb)
    (delivery_id,) = dispatch()
    receiver.status = 503
    before = datetime.now(UTC)
    (outcome,) = webhook_delivery.deliver(delivery_id)
    assert outcome.outcome == "retry" and outcome.status_code == 503
    (delivery,) = deliveries_of(edb, endpoint.id)
    assert delivery.status == "pending" and delivery.attempts == 1
    # WEBHOOK_RETRY_SCHEDULE=1,1,1 in these tests: the next try a second later.
    assert before + timedelta(seconds=0.9) <= delivery.next_attempt_at
    assert delivery.next_attempt_at <= datetime.now(UTC) + timedelta(seconds=1.1)
    assert webhook_delivery.deliver(delivery_id)[0].outcome == "skipped"  # not due yet
    receiver.status = 200
    make_due(edb, delivery_id)
    (outcome,) = webhook_delivery.deliver(delivery_id)
    assert outcome.outcome == "delivered"
    first, second = receiver.received
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert first.body == second.body
    verify(endpoint, receiver)


def test_after_the_last_delay_a_delivery_is_failed_with_each_attempt_logged(
    edb: Session, receiver: Receiver
) -> None:
    endpoint = make_endpoint(edb, receiver.url)
    make_refund(edb)
    (delivery_id,) = dispatch()
    receiver.status = 500
    receiver.answer = b"x" * 5000
    outcomes = []
    for _ in range(4):  # the first attempt and one per delay of 1,1,1
        make_due(edb, delivery_id)
        outcomes += [o.outcome for o in webhook_delivery.deliver(delivery_id)]
    assert outcomes == ["retry", "retry", "retry", "failed"]
    (delivery,) = deliveries_of(edb, endpoint.id)
    assert delivery.status == "failed" and delivery.attempts == 4
    assert delivery.last_status_code == 500 and delivery.last_error == "HTTP 500"
    attempts = list(edb.scalars(select(WebhookDeliveryAttempt)
                                .where(WebhookDeliveryAttempt.delivery_id == delivery_id)))
    assert len(attempts) == 4
    assert all(len(a.response_body or "") == 1024 for a in attempts)  # cut to 1 KB
    make_due(edb, delivery_id)
    assert webhook_delivery.deliver(delivery_id)[0].outcome == "skipped"


def test_redirects_are_not_followed(edb: Session, receiver: Receiver) -> None:
    target = Receiver().start()
    try:
        receiver.status = 302
        receiver.headers = {"Location": target.url}
        endpoint = make_endpoint(edb, receiver.url)
        make_refund(edb)
        (delivery_id,) = dispatch()
        (outcome,) = webhook_delivery.deliver(delivery_id)
        assert outcome.outcome == "retry" and outcome.status_code == 302
        assert "not followed" in (outcome.error or "")
        assert target.received == []
        assert len(receiver.received) == 1
        assert deliveries_of(edb, endpoint.id)[0].status == "pending"
    finally:
        target.stop()


def test_an_attempt_is_bounded_by_the_timeout(edb: Session, receiver: Receiver) -> None:
    receiver.delay = 5  # WEBHOOK_TIMEOUT_SECONDS=1 here
    make_endpoint(edb, receiver.url)
    make_refund(edb)
    (delivery_id,) = dispatch()
    started = time.monotonic()
    (outcome,) = webhook_delivery.deliver(delivery_id)
    assert time.monotonic() - started < 2.5
    assert outcome.outcome == "retry" and outcome.error == "no answer within 1s"


def test_a_name_resolving_to_a_metadata_address_is_refused_at_connect_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The URL passed the API's checks (a plain name); what it resolves to is checked when
    connecting, and nothing is sent."""
    connected: list[object] = []
    real = socket.getaddrinfo

    def resolver(host: str, *args: object, **kwargs: object) -> list:
        if host == "hooks.example.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", 80)),
                    (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("fe80::1", 80, 0, 0))]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    monkeypatch.setattr(socket.socket, "connect", lambda *a: connected.append(a))
    answer = outbound_http.post("http://hooks.example.test/x", b"{}", {}, timeout=1)
    assert answer.status is None and not answer.delivered
    assert "link-local or cloud metadata" in (answer.error or "")
    assert connected == []


def test_a_task_sends_its_endpoints_due_deliveries_in_batches_over_one_connection(
    edb: Session, receiver: Receiver
) -> None:
    receiver.keep_alive = True
    receiver.stop()
    receiver.start()
    endpoint = make_endpoint(edb, receiver.url)
    count = webhook_delivery.DELIVERY_BATCH + 5
    for _ in range(count):
        make_refund(edb)
    enqueued = dispatch()
    # One task per batch of leased deliveries...
    assert len(enqueued) == 2
    # ...and the first one takes every due one, batch after batch, those already
    # enqueued included...
    outcomes = webhook_delivery.deliver(enqueued[0])
    assert [o.outcome for o in outcomes] == ["delivered"] * count
    # ...whose messages then find nothing to do.
    assert webhook_delivery.deliver(enqueued[1])[0].outcome == "skipped"
    assert {d.status for d in deliveries_of(edb, endpoint.id)} == {"delivered"}
    # One signed request per event, its own webhook-id each, all over one connection.
    assert len({b["id"] for b in verify(endpoint, receiver)}) == count
    assert len({r.headers["webhook-id"] for r in receiver.received}) == count
    assert len({r.peer for r in receiver.received}) == 1
    # Every attempt is logged.
    edb.expire_all()
    logged = edb.scalar(select(func.count()).select_from(WebhookDeliveryAttempt)
                        .join(WebhookDelivery)
                        .where(WebhookDelivery.endpoint_id == endpoint.id))
    assert logged == count


def test_a_receiver_closing_each_connection_still_gets_every_event(
    edb: Session, receiver: Receiver
) -> None:
    """HTTP/1.0 (the receiver fixture's default): a connection per request."""
    endpoint = make_endpoint(edb, receiver.url)
    for _ in range(5):
        make_refund(edb)
    (first,) = dispatch()
    assert [o.outcome for o in webhook_delivery.deliver(first)] == ["delivered"] * 5
    assert len({r.peer for r in receiver.received}) == 5
    assert len(verify(endpoint, receiver)) == 5


def test_a_task_stops_starting_attempts_after_its_time_and_hands_the_rest_on(
    edb: Session, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(webhook_delivery, "TASK_SECONDS", 0.3)
    receiver.delay = 0.1
    endpoint = make_endpoint(edb, receiver.url)
    for _ in range(10):
        make_refund(edb)
    (first,) = dispatch()
    handed: list[str] = []
    outcomes = webhook_delivery.deliver(first, enqueue=lambda i: handed.append(i) or True)
    assert 1 <= len(outcomes) < 10
    assert all(o.outcome == "delivered" for o in outcomes)
    # The rest are let go of, and the next one is handed to the queue (leased).
    left = [d for d in deliveries_of(edb, endpoint.id) if d.status == "pending"]
    assert len(left) == 10 - len(outcomes)
    assert all(d.attempting_until is None for d in left)
    assert len(handed) == 1 and handed[0] in {d.id for d in left}


def test_a_failing_endpoint_gets_one_delivery_at_a_time(edb: Session, receiver: Receiver) -> None:
    receiver.status = 500
    endpoint = make_endpoint(edb, receiver.url)
    for _ in range(6):
        make_refund(edb)
    (first,) = dispatch()
    # The first failure ends the batch: one request, the other five let go of.
    (outcome,) = webhook_delivery.deliver(first)
    assert outcome.outcome == "retry" and len(receiver.received) == 1
    assert all(d.attempting_until is None for d in deliveries_of(edb, endpoint.id))
    edb.execute(update(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint.id)
                .values(scheduled_until=None, next_attempt_at=datetime.now(UTC)))
    edb.commit()
    # Failing from now on: one leased, and its task takes that one alone.
    (only,) = dispatch()
    assert len(webhook_delivery.deliver(only)) == 1
    assert len(receiver.received) == 2


def test_an_endpoint_failing_for_the_disable_period_is_disabled_and_says_so(
    edb: Session, receiver: Receiver
) -> None:
    receiver.status = 500
    endpoint = make_endpoint(edb, receiver.url)
    make_refund(edb)
    (delivery_id,) = dispatch()
    webhook_delivery.deliver(delivery_id)
    edb.refresh(endpoint)
    assert endpoint.enabled and endpoint.failing_since is not None
    # Every attempt has failed for longer than WEBHOOK_DISABLE_AFTER_SECONDS (5 days).
    edb.execute(update(WebhookEndpoint).where(WebhookEndpoint.id == endpoint.id)
                .values(failing_since=datetime.now(UTC) - timedelta(days=5, seconds=1)))
    edb.commit()
    make_due(edb, delivery_id)
    webhook_delivery.deliver(delivery_id)
    edb.refresh(endpoint)
    assert not endpoint.enabled
    assert "every delivery failed since" in (endpoint.disabled_reason or "")
    make_due(edb, delivery_id)
    assert dispatch() == []  # a disabled endpoint gets nothing
    # Enabled again, its waiting deliveries resume and the clock starts afresh.
    webhook_delivery.update_endpoint(session=edb, endpoint_id=endpoint.id,
                                     changes={"enabled": True}, production=False)
    edb.refresh(endpoint)
    assert endpoint.enabled and endpoint.failing_since is None and not endpoint.disabled_reason
    receiver.status = 200
    assert dispatch() == [delivery_id]


def test_a_success_clears_the_failure_clock(edb: Session, receiver: Receiver) -> None:
    receiver.status = 500
    endpoint = make_endpoint(edb, receiver.url)
    make_refund(edb)
    (delivery_id,) = dispatch()
    webhook_delivery.deliver(delivery_id)
    receiver.status = 200
    make_due(edb, delivery_id)
    webhook_delivery.deliver(delivery_id)
    edb.refresh(endpoint)
    assert endpoint.failing_since is None


def test_send_again_resends_a_delivered_event_once(edb: Session, receiver: Receiver) -> None:
    endpoint = make_endpoint(edb, receiver.url)
    make_refund(edb)
    (delivery_id,) = dispatch()
    webhook_delivery.deliver(delivery_id)
    body = webhook_delivery.resend(session=edb, delivery_id=delivery_id,
                                   requested_by="ops@example.com")
    assert body["status"] == "pending"
    receiver.status = 500
    (outcome,) = webhook_delivery.deliver(delivery_id)
    assert outcome.outcome == "failed"  # one attempt on request, not a new schedule
    edb.expire_all()
    attempts = list(edb.scalars(select(WebhookDeliveryAttempt.requested_by)
                                .where(WebhookDeliveryAttempt.delivery_id == delivery_id)
                                .order_by(WebhookDeliveryAttempt.id)))
    assert attempts == [None, "ops@example.com"]
    first, second = receiver.received
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    verify(endpoint, receiver)


def test_the_trigger_is_in_the_migration(edb: Session) -> None:
    names = edb.scalars(text(
        "SELECT tgname FROM pg_trigger WHERE tgrelid = 'refund_events'::regclass "
        "AND NOT tgisinternal ORDER BY tgname")).all()
    assert "refund_events_to_webhook_outbox" in names


def test_production_never_sends_to_a_plain_http_url(
    edb: Session, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An endpoint saved before the service ran in production keeps its http:// URL; it
    is refused when sending, not only when saving."""
    from shared.adapters.config import Settings

    make_endpoint(edb, receiver.url)
    make_refund(edb)
    (delivery_id,) = dispatch()
    # Production as Settings.is_production says (APP_ENV=production or a live key),
    # without the other production requirements this test's settings do not meet.
    monkeypatch.setattr(Settings, "is_production", property(lambda _: True))
    (outcome,) = webhook_delivery.deliver(delivery_id)
    assert outcome.outcome == "retry" and "https://" in (outcome.error or "")
    assert receiver.received == []


def test_a_change_and_its_event_written_in_one_statement_make_an_exact_event(
    edb: Session,
) -> None:
    """Plain SQL moves a refund and records its event in one statement (a data-modifying
    WITH); the trigger still sees the refund as that statement left it."""
    refund_id = make_refund(edb)
    edb.execute(text("""
        WITH locked AS (SELECT id, status FROM refunds WHERE id = :id FOR UPDATE),
        moved AS (
            UPDATE refunds r SET status = 'succeeded', stripe_refund_id = :stripe_id,
                                 updated_at = now()
            FROM locked WHERE r.id = locked.id
            RETURNING r.id, locked.status AS from_status, r.status AS status
        )
        INSERT INTO refund_events (refund_id, from_status, to_status, actor)
        SELECT id, from_status, status, 'worker' FROM moved
    """), {"id": refund_id, "stripe_id": f"re_{refund_id}"})
    edb.commit()
    created, succeeded = outbox_of(edb, refund_id)
    assert (succeeded.type, succeeded.previous_status, succeeded.sequence) == (
        "refund.succeeded", "pending", 2)
    assert succeeded.refund["stripe_refund_id"] == f"re_{refund_id}"
    assert created.refund["stripe_refund_id"] is None
