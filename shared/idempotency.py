"""Idempotency-Key records (SPEC 3.4), scoped to the caller.

The record is claimed inside the same transaction as the refund it answers for, so
two concurrent requests with one key serialize on its primary key: the second waits
for the first to commit and then replays its answer."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text, update
from sqlalchemy.orm import Session

from shared.errors import IdempotencyKeyReused
from shared.models import IdempotencyRecord

KEY_TTL_HOURS = 24


@dataclass(frozen=True)
class StoredResponse:
    status: int
    body: dict[str, Any]


def request_fingerprint(body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


_CLAIM = text(
    """
    INSERT INTO idempotency_records (subject, key, request_hash)
    VALUES (:subject, :key, :hash)
    ON CONFLICT (subject, key) DO UPDATE
        SET request_hash = EXCLUDED.request_hash, response_status = NULL,
            response_body = NULL, created_at = now()
        WHERE idempotency_records.created_at < now() - make_interval(hours => :ttl)
    RETURNING key
    """
)

_READ = text(
    "SELECT request_hash, response_status, response_body FROM idempotency_records "
    "WHERE subject = :subject AND key = :key"
)


def claim(session: Session, *, subject: str, key: str, fingerprint: str) -> StoredResponse | None:
    """Claim ``key`` for this request, or return the answer stored under it.

    Raises IdempotencyKeyReused when the key was used with another body."""
    params = {"subject": subject, "key": key, "hash": fingerprint, "ttl": KEY_TTL_HOURS}
    if session.execute(_CLAIM, params).first() is not None:
        return None
    row = session.execute(_READ, params).one()
    if row.request_hash != fingerprint:
        raise IdempotencyKeyReused(
            "This Idempotency-Key was already used with a different request body. "
            "Use a new key for a new refund."
        )
    return StoredResponse(status=row.response_status, body=row.response_body)


def store(session: Session, *, subject: str, key: str, response: StoredResponse) -> None:
    session.execute(
        update(IdempotencyRecord)
        .where(IdempotencyRecord.subject == subject, IdempotencyRecord.key == key)
        .values(response_status=response.status, response_body=response.body)
    )
