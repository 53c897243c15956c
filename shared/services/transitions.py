"""The refund state machine (SPEC 5): every change is a guarded UPDATE plus an audit event,
so a late or duplicate message can never move a refund backwards.

``move`` is the one statement that does it (lock the row, update it if the machine allows,
append the event), in one round trip, on any psycopg connection: the session's, for
callers inside a unit of work (``transition``), or a pooled one, for the worker.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from sqlalchemy.orm import Session

from shared.adapters.db import driver_cursor
from shared.domain.models import RefundStatus

S = RefundStatus

#: target status -> statuses it may be reached from
ALLOWED_SOURCES: dict[RefundStatus, frozenset[RefundStatus]] = {
    S.PENDING: frozenset({S.AWAITING_APPROVAL}),  # approved (shared.services.approvals)
    S.PROCESSING: frozenset({S.PENDING}),
    S.REQUIRES_ACTION: frozenset({S.PENDING}),
    S.SUCCEEDED: frozenset({S.PENDING, S.PROCESSING, S.REQUIRES_ACTION}),
    S.FAILED: frozenset({S.PENDING, S.PROCESSING, S.REQUIRES_ACTION, S.SUCCEEDED}),
    S.CANCELED: frozenset({S.AWAITING_APPROVAL, S.PENDING, S.PROCESSING, S.REQUIRES_ACTION}),
}

#: Columns a move may set besides the status (names are never taken from input).
MOVABLE_COLUMNS = frozenset(
    {"failure_reason", "last_error", "stripe_refund_id", "lease_expires_at"}
)


def can_move(from_status: str, to_status: str) -> bool:
    return RefundStatus(from_status) in ALLOWED_SOURCES.get(RefundStatus(to_status), frozenset())


@dataclass(frozen=True)
class Moved:
    """What ``move`` found and left: ``from_status`` is the status before the statement,
    ``status`` the one after (the same when the move was not allowed)."""

    from_status: str
    status: str

    @property
    def changed(self) -> bool:
        return self.from_status != self.status


# The row is locked first (``locked``), so the allowed-source check and the event's
# from_status see the latest committed status even when another transaction moved it a
# moment ago; the UPDATE re-checks the guard on that same row version.
_MOVE_SQL = """
WITH locked AS (
    SELECT id, status FROM refunds WHERE id = %(refund_id)s FOR UPDATE
), moved AS (
    UPDATE refunds r SET {assignments}
    FROM locked
    WHERE r.id = locked.id {guard}
    RETURNING r.id, locked.status AS from_status, r.status AS status
), event AS (
    INSERT INTO refund_events (refund_id, from_status, to_status, actor, detail)
    SELECT id, from_status, status, %(actor)s, %(detail)s FROM moved
    WHERE from_status IS DISTINCT FROM status
    RETURNING 1
)
SELECT from_status, status FROM moved
"""
_ALLOWED = "locked.status = ANY(%(sources)s)"


def _move_sql(fields: Mapping[str, Any], always: Mapping[str, Any]) -> str:
    unknown = (set(fields) | set(always)) - MOVABLE_COLUMNS
    if unknown:
        raise ValueError(f"not a movable refund column: {sorted(unknown)}")
    if always:
        # Some columns change whatever the status does: the move itself is conditional.
        assignments = [f"status = CASE WHEN {_ALLOWED} THEN %(to_status)s ELSE r.status END"]
        assignments += [
            f"{name} = CASE WHEN {_ALLOWED} THEN %(f_{name})s ELSE r.{name} END"
            for name in fields
        ]
        assignments += [
            # A Stripe refund id, once known, is never replaced.
            f"{name} = COALESCE(r.{name}, %(a_{name})s)"
            if name == "stripe_refund_id"
            else f"{name} = %(a_{name})s"
            for name in always
        ]
        guard = ""
    else:
        assignments = ["status = %(to_status)s"] + [f"{name} = %(f_{name})s" for name in fields]
        guard = f"AND {_ALLOWED}"
    assignments.append("updated_at = now()")
    return _MOVE_SQL.format(assignments=", ".join(assignments), guard=guard)


def move(
    cursor: psycopg.Cursor[Any],
    refund_id: str,
    to_status: RefundStatus,
    *,
    actor: str,
    detail: Mapping[str, Any] | None = None,
    fields: Mapping[str, Any] | None = None,
    always: Mapping[str, Any] | None = None,
) -> Moved | None:
    """Move a refund to ``to_status`` if the machine allows it from where it is now, with
    its audit event, in one statement.

    ``fields`` are set only with the move; ``always`` are set whether or not the status
    may move (``stripe_refund_id`` only while it is still empty). Returns None when the
    refund does not exist, or, without ``always``, when the move was not allowed.
    """
    fields = fields or {}
    always = always or {}
    params: dict[str, Any] = {
        "refund_id": refund_id,
        "to_status": str(to_status),
        "sources": [str(s) for s in ALLOWED_SOURCES.get(to_status, ())],
        "actor": actor,
        "detail": Jsonb(dict(detail)) if detail is not None else None,
        **{f"f_{k}": v for k, v in fields.items()},
        **{f"a_{k}": v for k, v in always.items()},
    }
    row = cursor.execute(_move_sql(fields, always), params).fetchone()  # type: ignore[arg-type]
    if row is None:
        return None
    return Moved(from_status=row[0], status=row[1])


def record_event(
    session: Session,
    *,
    refund_id: str,
    from_status: str | None,
    to_status: str,
    actor: str,
    detail: Mapping[str, Any] | None = None,
) -> None:
    """Append an audit event in the session's transaction (for what ``move`` does not
    cover: a refund's creation, or a note on one that stays where it is)."""
    insert_event(
        driver_cursor(session),
        refund_id=refund_id, from_status=from_status, to_status=to_status, actor=actor,
        detail=detail,
    )


def insert_event(
    cursor: psycopg.Cursor[Any],
    *,
    refund_id: str,
    from_status: str | None,
    to_status: str,
    actor: str,
    detail: Mapping[str, Any] | None = None,
) -> None:
    cursor.execute(
        "INSERT INTO refund_events (refund_id, from_status, to_status, actor, detail)"
        " VALUES (%s, %s, %s, %s, %s)",
        (refund_id, from_status, str(to_status), actor,
         Jsonb(dict(detail)) if detail is not None else None),
    )


def transition(
    session: Session,
    refund_id: str,
    to_status: RefundStatus,
    *,
    actor: str,
    detail: Mapping[str, Any] | None = None,
    **fields: Any,
) -> str | None:
    """Move a refund inside the session's transaction; returns the status it came from,
    or None when the move was not allowed (already there, or past it)."""
    moved = move(
        driver_cursor(session), refund_id, to_status, actor=actor, detail=detail, fields=fields
    )
    return moved.from_status if moved is not None else None
