"""Sending one refund to Stripe (SPEC 6): the use case behind ``refunds.process``.

A refund is a claim, one Stripe call and one recording statement, and no database
connection is held while Stripe is being waited for:

1. **Claim** (one statement, committed): a ``pending`` refund whose lease is free gets
   a lease (``lease_expires_at``, longer than any attempt can last) and ``attempts + 1``.
   A second delivery of the same task finds the lease taken and stands down.
2. **Stripe**, with the connection back in the pool. ``Refund.create`` always carries
   the refund's stored idempotency key and the same parameters, so Stripe folds repeats
   within 24 h into one refund; and any attempt after the first asks Stripe first for a
   refund carrying our ``metadata.refund_id`` and adopts it, since an earlier attempt may
   have gone through with its answer lost, and Stripe forgets keys after 24 h. So even
   a lease that lapsed under a very slow Stripe cannot make a second refund.
3. **Record** (one statement): Stripe's answer, the move and its audit event, and the
   lease released.

Only a request that may have reached Stripe is an attempt: when the shared rate limiter
holds a request back, the claim is given back as it was (no attempt, no lookup next
time). A refund whose outcome is unknown stays ``pending`` (SPEC 5): it is retried with
bounded, jittered backoff, then left to the reconciler.
"""

from __future__ import annotations

import enum
import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg.types.json import Jsonb

from shared.adapters.celery_app import MAX_RETRY_COUNTDOWN_SECONDS
from shared.adapters.config import get_settings
from shared.adapters.db import get_pool, unit_of_work
from shared.adapters.rate_limit import RateLimited
from shared.adapters.stripe_gateway import (
    GATEWAY_ERRORS,
    ErrorKind,
    StripeFailure,
    StripeGateway,
    classify_error,
    get_gateway,
)
from shared.domain.models import RefundStatus
from shared.services.attention import mark_held
from shared.services.refund_updates import STRIPE_STATUS, failure_text
from shared.services.transitions import move

log = logging.getLogger(__name__)

ACTOR = "worker"
S = RefundStatus


class Outcome(enum.StrEnum):
    #: Stripe accepted the refund (it is ``succeeded``, ``processing`` or ``requires_action``).
    SUCCEEDED = "succeeded"
    #: Stripe refused it for good, or failed or canceled it: the refund is ``failed``/``canceled``.
    FAILED = "failed"
    #: Nothing to do: the refund is past ``pending``, unknown, or being sent by another worker.
    SKIPPED = "skipped"
    #: Outcome unknown, or Stripe or our rate limiter busy; ``retry_in`` says when to retry.
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
    lease_expires_at: datetime


def process_refund(
    refund_id: str, *, retries: int = 0, gateway: StripeGateway | None = None
) -> Result:
    """Send one pending refund to Stripe and record the answer. Safe to call any number
    of times, from any number of processes at once.

    ``retries`` is how many times this delivery was retried already; it sets the backoff
    and when to leave the refund to the reconciler.
    """
    gateway = gateway or get_gateway()
    claim = _claim(refund_id)
    if claim is None:
        log.info("refund is not pending or is being sent by another worker; nothing to send",
                 extra={"refund_id": refund_id})
        return Result(Outcome.SKIPPED)
    try:
        stripe_refund = _send(gateway, claim)
    except RateLimited as exc:
        # Held back here, before anything left for Stripe: not an attempt.
        _give_back(claim)
        return Result(Outcome.RETRY, retry_in=_after_rate_limit(exc.retry_after),
                      error=classify_error(exc).describe())
    except GATEWAY_ERRORS as exc:
        return _on_error(gateway, claim, classify_error(exc), retries=retries)
    return _record(claim, stripe_refund)


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


def _after_rate_limit(retry_after: float) -> float:
    """When to try again after our own limiter said wait: soon, spread over a second so
    that the waiting refunds do not come back as one herd."""
    return retry_after + random.uniform(0, 1)  # noqa: S311 - jitter, not security


# -- statements ------------------------------------------------------------------------

_CLAIM_SQL = """
UPDATE refunds r
SET attempts = r.attempts + 1,
    lease_expires_at = now() + make_interval(secs => %(lease)s),
    updated_at = now()
FROM payments p
WHERE r.id = %(refund_id)s
  AND r.status = 'pending'
  AND (r.lease_expires_at IS NULL OR r.lease_expires_at <= now())
  AND r.needs_attention_since IS NULL  -- held for a person: sent only when one asks
  AND p.id = r.payment_id
RETURNING r.attempts, r.amount, r.charge_id, p.stripe_payment_intent_id, r.reason,
          r.stripe_idempotency_key, r.stripe_refund_id, r.lease_expires_at
"""

# Only while this claim's lease is still the refund's: a lapsed lease may be another's.
_GIVE_BACK_SQL = """
UPDATE refunds SET attempts = attempts - 1, lease_expires_at = NULL
WHERE id = %(refund_id)s AND status = 'pending' AND lease_expires_at = %(lease)s
"""

_NOTE_ERROR_SQL = """
UPDATE refunds SET last_error = %(error)s, lease_expires_at = NULL, updated_at = now()
WHERE id = %(refund_id)s AND status = 'pending'
"""


def _execute(sql: str, params: Mapping[str, Any]) -> tuple[Any, ...] | None:
    """One statement on a pooled autocommit connection, handed back at once; its first
    row, if it returns any."""
    with get_pool().connection() as connection:
        cursor = connection.execute(sql, params)  # type: ignore[arg-type]
        return cursor.fetchone() if cursor.description else None


def _claim(refund_id: str) -> _Claim | None:
    lease = get_settings().claim_lease_seconds
    row = _execute(_CLAIM_SQL, {"refund_id": refund_id, "lease": lease})
    if row is None:
        return None
    return _Claim(refund_id, *row)


def _give_back(claim: _Claim) -> None:
    _execute(_GIVE_BACK_SQL, {"refund_id": claim.refund_id, "lease": claim.lease_expires_at})


# -- steps -----------------------------------------------------------------------------


def _send(gateway: StripeGateway, claim: _Claim) -> Mapping[str, Any]:
    if claim.stripe_refund_id is not None:
        return gateway.retrieve_refund(claim.stripe_refund_id)
    if claim.attempts > 1:
        found = _find(gateway, claim)
        if found is not None:
            log.info("adopted the Stripe refund an earlier attempt made",
                     extra={"refund_id": claim.refund_id, "stripe_refund_id": found["id"]})
            return found
    return gateway.create_refund(
        refund_id=claim.refund_id,
        idempotency_key=claim.idempotency_key,
        amount=claim.amount,
        charge_id=claim.charge_id,
        payment_intent_id=claim.payment_intent_id,
        reason=claim.reason,
    )


def _find(gateway: StripeGateway, claim: _Claim) -> Mapping[str, Any] | None:
    return gateway.find_refund(
        refund_id=claim.refund_id,
        charge_id=claim.charge_id,
        payment_intent_id=claim.payment_intent_id,
    )


def _record(claim: _Claim, stripe_refund: Mapping[str, Any]) -> Result:
    """Stripe's answer, the move, its audit event and the lease released: one statement."""
    stripe_id = str(stripe_refund["id"])
    stripe_status = str(stripe_refund["status"])
    if stripe_refund.get("amount") != claim.amount:
        log.error("Stripe refund amount differs from ours",
                  extra={"refund_id": claim.refund_id, "stripe_refund_id": stripe_id,
                         "amount": claim.amount, "stripe_amount": stripe_refund.get("amount")})
    target = STRIPE_STATUS.get(stripe_status)
    if target is None:
        log.warning("unknown Stripe refund status %r; left pending", stripe_status,
                    extra={"refund_id": claim.refund_id})
        target = S.PENDING  # not a move: only the Stripe id is kept
    fields = {"failure_reason": failure_text(stripe_refund)} if target is S.FAILED else {}
    with get_pool().connection() as connection:
        moved = move(
            connection.cursor(),
            claim.refund_id,
            target,
            actor=ACTOR,
            detail={"stripe_refund_id": stripe_id, "stripe_status": stripe_status,
                    "attempt": claim.attempts},
            fields=fields,
            always={"stripe_refund_id": stripe_id, "lease_expires_at": None},
        )
    status = moved.status if moved is not None else None
    log.info("refund sent", extra={"refund_id": claim.refund_id, "status": status,
                                   "stripe_refund_id": stripe_id})
    outcome = Outcome.FAILED if status in (S.FAILED, S.CANCELED) else Outcome.SUCCEEDED
    return Result(outcome, status=status)


def _on_error(
    gateway: StripeGateway, claim: _Claim, failure: StripeFailure, *, retries: int
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
                return _record(claim, found)
            if failure.kind is ErrorKind.DEFINITE:
                return _fail(claim, failure)

    if failure.kind is ErrorKind.TRANSIENT:
        if retries + 1 < get_settings().max_attempts:
            _execute(_NOTE_ERROR_SQL, {"refund_id": claim.refund_id, "error": failure.describe()})
            log.warning("Stripe outcome unknown; will retry",
                        extra={"refund_id": claim.refund_id, "error": failure.describe()})
            return Result(Outcome.RETRY, retry_in=retry_countdown(retries, failure.retry_after),
                          error=failure.describe())
        log.warning("Stripe outcome still unknown after the last retry; the reconciler takes over",
                    extra={"refund_id": claim.refund_id, "error": failure.describe()})
        _stay_pending(claim, failure, "left for the reconciler")
        return Result(Outcome.LEFT_FOR_RECONCILER, error=failure.describe())
    log.error("Stripe refused our credentials or idempotency key; refund held for a person",
              extra={"refund_id": claim.refund_id, "error": failure.describe()})
    _stay_pending(claim, failure, "held: needs a person")
    with unit_of_work() as session:
        mark_held(session, claim.refund_id, claim.attempts, failure.describe())
        session.commit()
    return Result(Outcome.HELD, error=failure.describe())


def _fail(claim: _Claim, failure: StripeFailure) -> Result:
    with get_pool().connection() as connection:
        moved = move(
            connection.cursor(),
            claim.refund_id,
            S.FAILED,
            actor=ACTOR,
            detail={"code": failure.code, "http_status": failure.http_status,
                    "attempt": claim.attempts},
            fields={"failure_reason": failure.describe()},
            always={"last_error": failure.describe(), "lease_expires_at": None},
        )
    status = moved.status if moved is not None else None
    log.info("Stripe refused the refund", extra={"refund_id": claim.refund_id,
                                                 "code": failure.code, "status": status})
    return Result(Outcome.FAILED, status=status, error=failure.describe())


_STAY_PENDING_SQL = """
WITH noted AS (
    UPDATE refunds SET last_error = %(error)s, lease_expires_at = NULL, updated_at = now()
    WHERE id = %(refund_id)s AND status = 'pending'
    RETURNING id
)
INSERT INTO refund_events (refund_id, from_status, to_status, actor, detail)
SELECT id, 'pending', 'pending', %(actor)s, %(detail)s FROM noted
"""


def _stay_pending(claim: _Claim, failure: StripeFailure, note: str) -> None:
    """Audit why a refund is still ``pending`` when the worker stops trying."""
    detail = {"note": note, "error": failure.describe(), "kind": str(failure.kind),
              "attempt": claim.attempts}
    _execute(_STAY_PENDING_SQL, {
        "refund_id": claim.refund_id, "error": failure.describe(), "actor": ACTOR,
        "detail": Jsonb(detail),
    })
