"""Sending one refund to Stripe (SPEC 6): the use case behind ``refunds.process``.

Why a refund is never sent twice:

1. Only one process sends a given refund at a time. The sender holds a Postgres
   advisory lock keyed by the refund id for the whole attempt (claim, lookup, create,
   record); a second delivery of the same task finds the lock taken and stands down.
   It is not a row lock, so the API, webhooks and the reconciler are never blocked
   behind a slow Stripe call, and it dies with the sender's connection, so a killed
   worker never leaves it behind.
2. Every attempt is counted in the claim (``attempts + 1``, committed before Stripe is
   called). Any attempt after the first first asks Stripe for a refund carrying our
   ``metadata.refund_id`` and adopts it: an earlier attempt may have been applied by
   Stripe with the answer lost, and Stripe forgets idempotency keys after 24 h.
3. ``Refund.create`` always goes out with the refund's stored idempotency key and the
   same parameters, so Stripe itself folds repeats within 24 h into one refund.

A refund whose outcome is unknown stays ``pending`` (SPEC 5): transient errors are
retried with bounded, jittered backoff, then the reconciler takes over.
"""

from __future__ import annotations

import enum
import logging
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, func, select, update
from sqlalchemy.orm import Session

from shared.attention import mark_held
from shared.celery_app import MAX_RETRY_COUNTDOWN_SECONDS
from shared.config import get_settings
from shared.db import get_engine
from shared.models import Payment, Refund, RefundStatus
from shared.refund_updates import apply_stripe_refund
from shared.stripe_gateway import (
    GATEWAY_ERRORS,
    ErrorKind,
    StripeFailure,
    StripeGateway,
    classify_error,
    get_gateway,
)
from shared.transitions import record_event, transition

log = logging.getLogger(__name__)

ACTOR = "worker"
#: First key of the two-int advisory locks that stand for "sending this refund".
SEND_LOCK_NAMESPACE = 7_310_001


class Outcome(enum.StrEnum):
    #: Stripe gave an answer and the refund now reflects it (any status, ``failed`` included).
    DONE = "done"
    #: Nothing to do: the refund is past ``pending``, unknown, or being sent by another worker.
    SKIPPED = "skipped"
    #: Outcome unknown or Stripe busy; ``retry_in`` says when to try again.
    RETRY = "retry"
    #: Still unknown after the last retry: left ``pending`` for the reconciler.
    LEFT_FOR_RECONCILER = "left_for_reconciler"
    #: Needs a person (bad API key, idempotency key conflict); stays ``pending``.
    HELD = "held"


@dataclass(frozen=True)
class Result:
    outcome: Outcome
    status: str | None = None
    retry_in: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class _Claim:
    refund_id: str
    attempts: int
    amount: int
    charge_id: str | None
    payment_intent_id: str | None
    reason: str | None
    idempotency_key: str
    stripe_refund_id: str | None


def process_refund(
    refund_id: str, *, retries: int = 0, gateway: StripeGateway | None = None
) -> Result:
    """Send one pending refund to Stripe and record the answer. Safe to call any number
    of times, from any number of processes at once.

    ``retries`` is how many times this delivery was retried already; it sets the backoff
    and when to leave the refund to the reconciler.
    """
    gateway = gateway or get_gateway()
    with _send_lock(refund_id) as (held, connection):
        if not held:
            log.info("refund is being sent by another worker", extra={"refund_id": refund_id})
            return Result(Outcome.SKIPPED)
        with Session(bind=connection, expire_on_commit=False) as session:
            claim = _claim(session, refund_id)
            if claim is None:
                return Result(Outcome.SKIPPED)
            try:
                stripe_refund = _send(gateway, claim)
            except GATEWAY_ERRORS as exc:
                return _on_error(session, gateway, claim, classify_error(exc), retries=retries)
            return _record(session, claim, stripe_refund)


def retry_countdown(retries: int, retry_after: float | None = None) -> float:
    """Seconds before retry ``retries + 1``: exponential, jittered, bounded.

    "Equal jitter" (half fixed, half random) spreads a herd of retries without ever
    retrying at once; the bound keeps countdowns short, since a task waiting for its
    countdown sits unacknowledged in a worker and must stay under the broker's
    visibility timeout.
    """
    settings = get_settings()
    cap = min(settings.retry_max_seconds, MAX_RETRY_COUNTDOWN_SECONDS)
    ceiling = min(cap, settings.retry_base_seconds * 2 ** min(retries, 30))
    countdown = random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not security
    if retry_after is not None:
        countdown = max(countdown, retry_after)
    return min(countdown, cap)


# -- steps ---------------------------------------------------------------------------


@contextmanager
def _send_lock(refund_id: str) -> Iterator[tuple[bool, Connection]]:
    """A session-level advisory lock on a connection kept for the whole attempt."""
    key = (SEND_LOCK_NAMESPACE, func.hashtext(refund_id))
    with get_engine().connect() as connection:
        held = bool(connection.scalar(select(func.pg_try_advisory_lock(*key))))
        connection.commit()
        released = not held
        try:
            yield held, connection
        finally:
            if held:
                try:
                    connection.rollback()
                    released = bool(connection.scalar(select(func.pg_advisory_unlock(*key))))
                    connection.commit()
                except Exception:
                    log.exception("could not release the send lock", extra={"refund_id": refund_id})
            if not released:
                # Never hand a connection that may still hold the lock back to the pool:
                # closing it for good is what releases the lock.
                connection.invalidate()


def _claim(session: Session, refund_id: str) -> _Claim | None:
    """Count this attempt, if the refund is still ``pending``; commits at once so the
    count survives whatever happens next."""
    row = session.execute(
        update(Refund)
        .where(Refund.id == refund_id, Refund.status == RefundStatus.PENDING)
        .values(attempts=Refund.attempts + 1, updated_at=func.now())
        .returning(
            Refund.attempts, Refund.amount, Refund.charge_id, Refund.payment_id, Refund.reason,
            Refund.stripe_idempotency_key, Refund.stripe_refund_id,
        )
    ).first()
    if row is None:
        session.rollback()
        log.info("refund is not pending; nothing to send", extra={"refund_id": refund_id})
        return None
    payment_intent_id = session.scalar(
        select(Payment.stripe_payment_intent_id).where(Payment.id == row.payment_id)
    )
    session.commit()
    return _Claim(
        refund_id=refund_id,
        attempts=row.attempts,
        amount=row.amount,
        charge_id=row.charge_id,
        payment_intent_id=payment_intent_id,
        reason=row.reason,
        idempotency_key=row.stripe_idempotency_key,
        stripe_refund_id=row.stripe_refund_id,
    )


def _send(gateway: StripeGateway, claim: _Claim) -> Any:
    if claim.stripe_refund_id is not None:
        return gateway.retrieve_refund(claim.stripe_refund_id)
    if claim.attempts > 1:
        found = _find(gateway, claim)
        if found is not None:
            log.info("adopted the Stripe refund an earlier attempt made",
                     extra={"refund_id": claim.refund_id, "stripe_refund_id": found.id})
            return found
    return gateway.create_refund(
        refund_id=claim.refund_id,
        idempotency_key=claim.idempotency_key,
        amount=claim.amount,
        charge_id=claim.charge_id,
        payment_intent_id=claim.payment_intent_id,
        reason=claim.reason,
    )


def _find(gateway: StripeGateway, claim: _Claim) -> Any:
    return gateway.find_refund(
        refund_id=claim.refund_id,
        charge_id=claim.charge_id,
        payment_intent_id=claim.payment_intent_id,
    )


def _record(session: Session, claim: _Claim, stripe_refund: Any) -> Result:
    apply_stripe_refund(session, stripe_refund, actor=ACTOR)
    status = session.scalar(select(Refund.status).where(Refund.id == claim.refund_id))
    session.commit()
    log.info("refund sent", extra={"refund_id": claim.refund_id, "status": status,
                                   "stripe_refund_id": stripe_refund.id})
    return Result(Outcome.DONE, status=status)


def _on_error(
    session: Session, gateway: StripeGateway, claim: _Claim, failure: StripeFailure, *, retries: int
) -> Result:
    if failure.kind in (ErrorKind.DEFINITE, ErrorKind.KEY_CONFLICT):
        # A definite "no" to this request is not yet a definite "no" to the refund: an
        # earlier attempt may have gone through (charge_already_refunded can be our own
        # refund; a key conflict means Stripe saw this key before). Only when Stripe
        # holds none of ours does the refund fail.
        try:
            found = _find(gateway, claim)
        except GATEWAY_ERRORS as exc:
            failure = classify_error(exc)
        else:
            if found is not None:
                return _record(session, claim, found)
            if failure.kind is ErrorKind.DEFINITE:
                return _fail(session, claim, failure)

    _note_error(session, claim.refund_id, failure)
    if failure.kind is ErrorKind.TRANSIENT:
        if retries + 1 < get_settings().max_attempts:
            log.warning("Stripe outcome unknown; will retry",
                        extra={"refund_id": claim.refund_id, "error": failure.describe()})
            session.commit()
            return Result(Outcome.RETRY, retry_in=retry_countdown(retries, failure.retry_after),
                          error=failure.describe())
        log.warning("Stripe outcome still unknown after the last retry; the reconciler takes over",
                    extra={"refund_id": claim.refund_id, "error": failure.describe()})
        _record_pending_event(session, claim, failure, "left for the reconciler")
        session.commit()
        return Result(Outcome.LEFT_FOR_RECONCILER, error=failure.describe())
    log.error("Stripe refused our credentials or idempotency key; refund held for a person",
              extra={"refund_id": claim.refund_id, "error": failure.describe()})
    _record_pending_event(session, claim, failure, "held: needs a person")
    mark_held(session, claim.refund_id, claim.attempts, failure.describe())
    session.commit()
    return Result(Outcome.HELD, error=failure.describe())


def _fail(session: Session, claim: _Claim, failure: StripeFailure) -> Result:
    transition(
        session,
        claim.refund_id,
        RefundStatus.FAILED,
        actor=ACTOR,
        detail={"code": failure.code, "http_status": failure.http_status,
                "attempt": claim.attempts},
        failure_reason=failure.describe(),
        last_error=failure.describe(),
    )
    status = session.scalar(select(Refund.status).where(Refund.id == claim.refund_id))
    session.commit()
    log.info("Stripe refused the refund", extra={"refund_id": claim.refund_id,
                                                 "code": failure.code, "status": status})
    return Result(Outcome.DONE, status=status, error=failure.describe())


def _note_error(session: Session, refund_id: str, failure: StripeFailure) -> None:
    session.execute(
        update(Refund)
        .where(Refund.id == refund_id, Refund.status == RefundStatus.PENDING)
        .values(last_error=failure.describe(), updated_at=func.now())
    )


def _record_pending_event(
    session: Session, claim: _Claim, failure: StripeFailure, note: str
) -> None:
    """Audit why a refund is still ``pending`` when the worker stops trying."""
    record_event(
        session,
        refund_id=claim.refund_id,
        from_status=RefundStatus.PENDING,
        to_status=RefundStatus.PENDING,
        actor=ACTOR,
        detail={"note": note, "error": failure.describe(), "kind": failure.kind,
                "attempt": claim.attempts},
    )
