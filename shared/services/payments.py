"""Payments in: payments and charges from Stripe's PaymentIntents and Charges.

Webhooks (``shared.services.stripe_events``) and ``refunds payments sync`` both go through the
upserts here, so the rules live in one place:

- upserts are ``INSERT ... ON CONFLICT``, safe to repeat and to run concurrently;
- a status only moves forward (``STATUS_RANK``): a late ``processing`` never
  overwrites ``succeeded``, and a final status is never left; when only Stripe can
  say which of two statuses is newer, Stripe is asked;
- ``payments.amount`` is what was captured once a payment has succeeded, because
  what is left to refund is computed from it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, and_, case, func, literal_column, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from shared.adapters.db import driver_cursor, unit_of_work
from shared.adapters.stripe_gateway import (
    GATEWAY_ERRORS,
    ErrorKind,
    StripeGateway,
    classify_error,
    get_gateway,
)
from shared.domain.models import Charge, Payment, new_id
from shared.domain.stripe_objects import StripeObject, as_dict, id_of
from shared.services.refund_updates import apply_stripe_refund

log = logging.getLogger(__name__)

#: How far along a payment or charge is: PaymentIntent statuses, plus Charge statuses
#: for payments made with the Charges API alone (no PaymentIntent). An event's snapshot
#: only replaces a status of lower rank; a status of rank ``FINAL_RANK`` is never left.
STATUS_RANK: dict[str, int] = {
    "requires_payment_method": 1,
    "requires_confirmation": 1,
    "requires_action": 1,
    "pending": 2,
    "processing": 2,
    "requires_capture": 3,
    "succeeded": 4,
    "canceled": 4,
    "failed": 4,
}
FINAL_RANK = 4

#: Rows per INSERT and per transaction in a sync: big enough to amortise round trips,
#: small enough that a batch holds its row locks only briefly next to live webhooks.
SYNC_BATCH = 500
DEADLOCK_RETRIES = 3
#: Transient listing errors in a row before a sync gives up (it can simply be run again).
LIST_RETRIES = 5

T = TypeVar("T")


def status_rank(status: str) -> int:
    return STATUS_RANK.get(status, 0)


def _rank_sql(column: Any) -> ColumnElement[int]:
    return case(STATUS_RANK, value=column, else_=0)


def _may_replace_status(current: Any, incoming: Any, *, authoritative: bool) -> ColumnElement[bool]:
    """SQL for "the incoming status may replace the stored one".

    Never out of a final status (except to refresh the same one). Otherwise strictly
    forward, unless ``incoming`` was just read from Stripe (``authoritative``): Stripe
    itself moves a PaymentIntent back (``processing`` to ``requires_payment_method``
    when an asynchronous payment fails) and sideways (``requires_confirmation`` to
    ``requires_action``), and only a fresh read tells that apart from a late event.
    """
    not_final = _rank_sql(current) < FINAL_RANK
    if authoritative:
        return or_(current == incoming, not_final)
    return or_(current == incoming, and_(not_final, _rank_sql(incoming) > _rank_sql(current)))


# Payments --------------------------------------------------------------------------


def payment_values(pi: StripeObject) -> dict[str, Any]:
    """Our payment columns for a Stripe PaymentIntent."""
    status = str(pi["status"])
    amount = pi.get("amount") or 0
    if status == "succeeded" and pi.get("amount_received") is not None:
        # What was captured, which can be less than asked (partial capture). Before
        # success nothing is refundable, so the intended amount is shown meanwhile.
        amount = pi["amount_received"]
    return {
        "stripe_payment_intent_id": str(pi["id"]),
        "amount": int(amount),
        "currency": str(pi["currency"]).lower(),
        "status": status,
    }


def _legacy_payment_id(charge_id: str) -> str:
    """The payment id of a charge made without a PaymentIntent (the Charges API).

    Derived from the charge id, so concurrent webhooks and syncs agree on it without
    a lookup and ``ON CONFLICT (id)`` makes its upsert idempotent."""
    return "pay_" + hashlib.sha256(charge_id.encode()).hexdigest()[:24]


@functools.cache
def _payment_upsert(*, authoritative: bool, conflict: str) -> Any:
    """The payments upsert, built once: executed with a list of rows, SQLAlchemy sends
    them as multi-row INSERTs ("insertmanyvalues") from one compiled statement."""
    table = Payment.__table__
    stmt = pg_insert(table)
    new = stmt.excluded
    current = table.c
    return stmt.on_conflict_do_update(
        index_elements=[current[conflict]],
        set_={
            "status": new.status,
            "amount": new.amount,
            "currency": new.currency,
            "updated_at": func.now(),
        },
        where=and_(
            _may_replace_status(current.status, new.status, authoritative=authoritative),
            or_(
                current.status != new.status,
                current.amount != new.amount,
                current.currency != new.currency,
            ),
        ),
    ).returning(literal_column("xmax = 0"))


def upsert_payments(
    session: Session, intents: Iterable[StripeObject], *, authoritative: bool = False
) -> dict[str, int]:
    """Insert or update payments from PaymentIntents; returns inserted/updated counts.

    ``authoritative``: the objects were just read from Stripe (not an event snapshot),
    so a non-final status may also move back (see ``_may_replace_status``)."""
    by_pi = {str(pi["id"]): payment_values(pi) for pi in intents}
    # One row per PaymentIntent, in key order so concurrent batches lock rows in the
    # same order and cannot deadlock each other.
    rows = [{"id": new_id("pay"), **by_pi[pi_id]} for pi_id in sorted(by_pi)]
    stmt = _payment_upsert(authoritative=authoritative, conflict="stripe_payment_intent_id")
    return _count(session, stmt, rows)


def _upsert_legacy_payments(session: Session, charges: list[StripeObject]) -> None:
    """Payments for charges that have no PaymentIntent; the charge is the payment."""
    rows = sorted(
        (
            {
                "id": _legacy_payment_id(str(ch["id"])),
                "stripe_payment_intent_id": None,
                "amount": charge_amount(ch),
                "currency": str(ch["currency"]).lower(),
                "status": str(ch["status"]),
            }
            for ch in charges
        ),
        key=lambda row: row["id"],
    )
    _count(session, _payment_upsert(authoritative=False, conflict="id"), rows)


def payment_ids_for(session: Session, payment_intent_ids: Iterable[str]) -> dict[str, str]:
    """Our payment id for each PaymentIntent id we know."""
    ids = list(set(payment_intent_ids))
    if not ids:
        return {}
    rows = session.execute(
        select(Payment.stripe_payment_intent_id, Payment.id).where(
            Payment.stripe_payment_intent_id.in_(ids)
        )
    )
    return {str(pi_id): pay_id for pi_id, pay_id in rows}


def apply_payment_intent(session: Session, pi: StripeObject, *, gateway: StripeGateway) -> None:
    """Apply a PaymentIntent snapshot from an event; if it does not stick, ask Stripe.

    A snapshot only moves a payment forward. When the stored status is still not final
    and differs from the snapshot's afterwards, the snapshot was either late or Stripe
    really moved the payment back or sideways; Stripe's current answer settles it.
    Reading after the upsert (which waits for a concurrent one on the same row) also
    settles two events for one PaymentIntent applied at the same moment."""
    upsert_payments(session, [pi])
    stored = session.scalar(
        select(Payment.status).where(Payment.stripe_payment_intent_id == str(pi["id"]))
    )
    if stored is not None and stored != pi["status"] and status_rank(stored) < FINAL_RANK:
        fresh = as_dict(gateway.retrieve_payment_intent(str(pi["id"])))
        upsert_payments(session, [fresh], authoritative=True)


# Charges ---------------------------------------------------------------------------


def charge_amount(ch: StripeObject) -> int:
    """What a charge captured: nothing for a failed or uncaptured one."""
    captured = ch.get("amount_captured")
    if captured is None:  # objects from before Stripe added amount_captured
        captured = ch.get("amount", 0) if ch.get("captured") else 0
    return int(captured)


def upsert_charges(
    session: Session,
    charges: Iterable[StripeObject],
    *,
    gateway: StripeGateway,
    disputed: bool = False,
) -> dict[str, int]:
    """Insert or update charges (and, first, the payments they belong to).

    A charge whose PaymentIntent we have not seen yet (its events are late, or it was
    created while a sync was listing) has its PaymentIntent fetched from Stripe.
    ``disputed`` marks them disputed whatever the objects say. Once set, ``disputed``
    is never cleared: Stripe keeps it true after a dispute closes too."""
    by_id = {str(ch["id"]): ch for ch in charges}
    if not by_id:
        return {"inserted": 0, "updated": 0}
    pi_ids = {cid: id_of(ch.get("payment_intent")) for cid, ch in by_id.items()}
    known = payment_ids_for(session, (pi for pi in pi_ids.values() if pi))
    missing = sorted({pi for pi in pi_ids.values() if pi and pi not in known})
    if missing:
        upsert_payments(
            session,
            [as_dict(gateway.retrieve_payment_intent(pi)) for pi in missing],
            authoritative=True,
        )
        known |= payment_ids_for(session, missing)
    _upsert_legacy_payments(session, [ch for cid, ch in by_id.items() if pi_ids[cid] is None])

    rows = []
    for cid in sorted(by_id):
        ch = by_id[cid]
        pi = pi_ids[cid]
        rows.append(
            {
                "id": cid,
                "payment_id": known[pi] if pi else _legacy_payment_id(cid),
                "amount": charge_amount(ch),
                "currency": str(ch["currency"]).lower(),
                "status": str(ch["status"]),
                "disputed": disputed or bool(ch.get("disputed")),
            }
        )
    return _count(session, _charge_upsert(), rows)


@functools.cache
def _charge_upsert() -> Any:
    table = Charge.__table__
    stmt = pg_insert(table)
    new = stmt.excluded
    current = table.c
    status_ok = _may_replace_status(current.status, new.status, authoritative=False)
    return stmt.on_conflict_do_update(
        index_elements=[current.id],
        set_={
            "status": case((status_ok, new.status), else_=current.status),
            "amount": case((status_ok, new.amount), else_=current.amount),
            "currency": case((status_ok, new.currency), else_=current.currency),
            "disputed": or_(current.disputed, new.disputed),
            "updated_at": func.now(),
        },
        where=or_(
            and_(
                status_ok,
                or_(
                    current.status != new.status,
                    current.amount != new.amount,
                    current.currency != new.currency,
                ),
            ),
            and_(new.disputed, current.disputed.is_(False)),
        ),
    ).returning(literal_column("xmax = 0"))


def mark_disputed(session: Session, charge_id: str) -> bool:
    """Flag a known charge as disputed; False when we do not have the charge."""
    found = session.execute(
        update(Charge)
        .where(Charge.id == charge_id)
        .values(disputed=True, updated_at=func.now())
        .returning(Charge.id)
    ).first()
    return found is not None


def ensure_charges(session: Session, charge_ids: Iterable[str], *, gateway: StripeGateway) -> None:
    """Make sure each charge (and its payment) is stored, fetching unknown ones."""
    ids = set(charge_ids)
    if not ids:
        return
    # Plain SQL: through the ORM this check was 9 % of a worker's CPU while it applied a
    # burst of Stripe's refund events, one charge each (make bench, py-spy).
    have = {row.id for row in driver_cursor(session).execute(
        "SELECT id FROM charges WHERE id = ANY(%s)", (list(ids),))}
    unknown = sorted(ids - have)
    if unknown:
        fetched = [as_dict(gateway.retrieve_charge(c)) for c in unknown]
        upsert_charges(session, fetched, gateway=gateway)


def _count(session: Session, stmt: Any, rows: list[dict[str, Any]]) -> dict[str, int]:
    """Run an upsert over ``rows``; count the rows it inserted and those it changed."""
    if not rows:
        return {"inserted": 0, "updated": 0}
    inserted = updated = 0
    for (was_insert,) in session.execute(stmt, rows):
        if was_insert:
            inserted += 1
        else:
            updated += 1
    return {"inserted": inserted, "updated": updated}


# Refunds made outside this service -------------------------------------------------


def apply_refunds(
    session: Session, refunds: Iterable[Any], *, gateway: StripeGateway, actor: str
) -> dict[str, int]:
    """Record Stripe refunds (each as read from Stripe) against their payments.

    The refund rules (matching our own refunds, recording ones made elsewhere,
    forward-only status) belong to ``shared.services.refund_updates``; this only makes sure the
    charge and payment each refund belongs to are stored first. Counts the refunds
    that still found no payment (Stripe lost track of it: logged by the callee)."""
    refunds = list(refunds)
    ensure_charges(
        session,
        (cid for cid in (id_of(as_dict(r).get("charge")) for r in refunds) if cid),
        gateway=gateway,
    )
    unmatched = 0
    for refund in refunds:
        if apply_stripe_refund(session, refund, actor=actor) is None:
            unmatched += 1
    return {"unmatched": unmatched}


# Sync ------------------------------------------------------------------------------


def _batches(items: Iterable[Any], size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for item in items:
        batch.append(as_dict(item))
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


_DONE = object()


def _read_ahead(batches: Iterator[T], depth: int = 2) -> Iterator[T]:
    """Yield ``batches`` while a thread reads the next ones from Stripe, so listing a page
    (network, and building the SDK's objects) overlaps writing the previous batch."""
    ready: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for batch in batches:
                while not stop.is_set():
                    try:
                        ready.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            ready.put(_DONE)
        except BaseException as exc:  # handed to the consumer, raised there
            ready.put(exc)

    reader = threading.Thread(target=produce, name="stripe-list-reader", daemon=True)
    reader.start()
    try:
        while (item := ready.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        reader.join(timeout=5)


Write = Callable[[Session, list[dict[str, Any]]], dict[str, int]]


def _in_transaction(write: Write, batch: list[dict[str, Any]]) -> dict[str, int]:
    """Write one batch in its own transaction, again if Postgres chose it as a deadlock
    victim (a live webhook can lock the same rows in another order)."""
    for attempt in range(DEADLOCK_RETRIES):
        try:
            with unit_of_work() as session:
                result = write(session, batch)
                session.commit()
                return result
        except OperationalError as exc:
            if getattr(exc.orig, "sqlstate", None) != "40P01" or attempt == DEADLOCK_RETRIES - 1:
                raise
            log.warning("sync batch deadlocked, retrying")
    raise AssertionError("unreachable")


def _resumable(
    list_after: Callable[[str | None], Iterator[dict[str, Any]]],
) -> Iterator[dict[str, Any]]:
    """Items of a Stripe list; after a transient error (429, our rate limiter, 5xx, a
    dropped connection) the listing goes on after the last item read instead of
    failing the whole sync."""
    last: str | None = None
    failures = 0
    while True:
        try:
            for item in list_after(last):
                yield item
                last = str(item["id"])
                failures = 0
            return
        except GATEWAY_ERRORS as exc:
            failure = classify_error(exc)
            failures += 1
            if failure.kind is not ErrorKind.TRANSIENT or failures > LIST_RETRIES:
                raise
            pause = failure.retry_after or min(2.0**failures, 30.0)
            log.warning("listing from Stripe failed (%s), going on in %.1fs", failure.code, pause)
            time.sleep(pause)


def sync_from_stripe(
    *, gateway: StripeGateway | None = None, batch_size: int = SYNC_BATCH
) -> dict[str, Any]:
    """Backfill every PaymentIntent, charge and refund Stripe has (auto-paging).

    Safe to run again and alongside webhooks: every write is an idempotent,
    forward-only upsert, one transaction per batch. PaymentIntents go first so the
    charges find their payments; refunds last, so a refund made in Stripe's dashboard
    counts against what is left. Returns counts and seconds per kind of object."""
    gw = gateway or get_gateway()
    started = time.monotonic()
    phases: list[tuple[str, Callable[[], Iterator[Any]], Write]] = [
        (
            "payment_intents",
            lambda: _resumable(lambda after: gw.iter_payment_intents(starting_after=after)),
            lambda s, batch: upsert_payments(s, batch, authoritative=True),
        ),
        (
            "charges",
            lambda: _resumable(lambda after: gw.iter_charges(starting_after=after)),
            lambda s, batch: upsert_charges(s, batch, gateway=gw),
        ),
        (
            "refunds",
            lambda: _resumable(lambda after: gw.iter_all_refunds(starting_after=after)),
            lambda s, batch: apply_refunds(s, batch, gateway=gw, actor="stripe"),
        ),
    ]
    result: dict[str, Any] = {}
    for name, list_all, write in phases:
        phase_started = time.monotonic()
        counts: dict[str, Any] = {"seen": 0}
        for batch in _read_ahead(_batches(list_all(), batch_size)):
            counts["seen"] += len(batch)
            for key, value in _in_transaction(write, batch).items():
                counts[key] = counts.get(key, 0) + value
        counts["seconds"] = round(time.monotonic() - phase_started, 3)
        result[name] = counts
    result["seconds"] = round(time.monotonic() - started, 3)
    log.info("payments sync done", extra={"sync": result})
    return result
