"""Idempotency-Key records (SPEC 3.4), scoped to the caller.

The record is claimed inside the same transaction as the refund it answers for, so
two concurrent requests with one key serialize on its primary key: the second waits
for the first to commit and then replays its answer."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import namedtuple_row
from psycopg.types.json import Jsonb

from shared.domain.errors import IdempotencyKeyReused

KEY_TTL_HOURS = 24


@dataclass(frozen=True)
class StoredResponse:
    status: int
    body: dict[str, Any]


def request_fingerprint(body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


# Plain SQL on the refund's own psycopg connection, in its transaction
# (``shared.services.refunds``): careful callers send a key with every POST.
_CLAIM = """
    INSERT INTO idempotency_records (subject, key, request_hash)
    VALUES (%(subject)s, %(key)s, %(hash)s)
    ON CONFLICT (subject, key) DO UPDATE
        SET request_hash = EXCLUDED.request_hash, response_status = NULL,
            response_body = NULL, created_at = now()
        WHERE idempotency_records.created_at < now() - make_interval(hours => %(ttl)s)
    RETURNING key
"""
_READ = (
    "SELECT request_hash, response_status, response_body FROM idempotency_records "
    "WHERE subject = %(subject)s AND key = %(key)s"
)
_STORE = (
    "UPDATE idempotency_records SET response_status = %(status)s, response_body = %(body)s "
    "WHERE subject = %(subject)s AND key = %(key)s"
)


def claim(
    connection: psycopg.Connection[Any], *, subject: str, key: str, fingerprint: str
) -> StoredResponse | None:
    """Claim ``key`` for this request, or return the answer stored under it.

    Raises IdempotencyKeyReused when the key was used with another body."""
    params = {"subject": subject, "key": key, "hash": fingerprint, "ttl": KEY_TTL_HOURS}
    cursor = connection.cursor(row_factory=namedtuple_row)
    if cursor.execute(_CLAIM, params).fetchone() is not None:
        return None
    row = cursor.execute(_READ, params).fetchone()
    assert row is not None  # the row that conflicted: records are replaced, never deleted
    if row.request_hash != fingerprint:
        raise IdempotencyKeyReused(
            "This Idempotency-Key was already used with a different request body. "
            "Use a new key for a new refund."
        )
    return StoredResponse(status=row.response_status, body=row.response_body)


def store(
    connection: psycopg.Connection[Any], *, subject: str, key: str, response: StoredResponse
) -> None:
    connection.execute(
        _STORE,
        {"status": response.status, "body": Jsonb(response.body), "subject": subject, "key": key},
    )
