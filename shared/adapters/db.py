"""Engine and unit of work: one transaction per unit, rolled back unless committed."""

from __future__ import annotations

import functools
import select
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg
from gevent.monkey import get_original
from psycopg.rows import namedtuple_row
from psycopg_pool import ConnectionPool
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import InterfaceError, InvalidatePoolError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from shared.adapters.config import get_settings
from shared.domain.errors import OutcomeUnknown

#: SQLSTATE classes Postgres answers COMMIT with when it rolled the transaction back for
#: certain (integrity violation of a deferred constraint, serialization failure,
#: deadlock): nothing was recorded. Any other failure of a COMMIT, a broken connection
#: above all, leaves the outcome unknown.
DEFINITE_ROLLBACK_CLASSES = ("23", "40")


#: SQLAlchemy's pool where nothing bounds it (beat, the console, tests): room for one
#: connection per thread, opened lazily. The web and the worker bound it (below).
_engine_pool = {"pool_size": 64, "max_overflow": 10}


def bound_engine_pool(size: int) -> None:
    """Keep this process's SQLAlchemy pool at ``size`` connections: callers past the bound
    wait for one instead of each opening one. Call before the first connection.

    The web bounds it at ``WEB_DB_CONNECTIONS`` (``api.create_app``): up to
    ``WEB_CONNECTIONS`` requests at once as greenlets. The worker at
    ``WORKER_DB_CONNECTIONS`` (``worker.app``): in a burst of Stripe events, its threads
    applying them held 26-38 connections (make bench, webhook_burst), busy all at once
    each time Stripe's answers came back together, their backends taking the cores from
    the web's. Bounded: 11 in all, and the webhook's p99 167-207 ms against 227-270
    (three paired runs)."""
    if get_engine.cache_info().currsize:
        raise RuntimeError("bound_engine_pool() after the engine was built")
    _engine_pool.update(pool_size=size, max_overflow=0)


@functools.cache
def get_engine() -> Engine:
    """SQLAlchemy's engine (everything but the hot paths' single statements). Checked at
    checkout as the hot paths' pools are (``_closed_while_idle``), not pinged: a ping is
    a round trip per unit of work, two for each Stripe event a worker applies."""
    settings = get_settings()
    engine = create_engine(
        settings.sqlalchemy_url,
        **_engine_pool,
        connect_args={"options": CONNECTION_OPTIONS},
    )
    event.listen(engine, "checkout", _replace_if_closed_while_idle)
    return engine


def _replace_if_closed_while_idle(dbapi_connection: Any, *_: Any) -> None:
    # SQLAlchemy's pool replaces the connection and, as Postgres most likely restarted,
    # every other one made before now, at its next checkout (its documented way to
    # handle disconnects pessimistically without a ping).
    if _closed_while_idle(dbapi_connection):
        raise InvalidatePoolError("the connection was closed while idle")


#: A statement that waits this long on a lock is a bug or an outage, not load.
CONNECTION_OPTIONS = "-c timezone=UTC -c lock_timeout=10000 -c statement_timeout=30000"

_T = TypeVar("_T")


def _made_once(make: Callable[[], _T]) -> Callable[[], _T]:
    """``functools.cache`` for a pool, whose first callers arrive together: the first one
    makes it and the others wait for it. With ``functools.cache`` alone, every caller
    arriving while the first was still in ``make`` made a pool of its own: opening one
    starts its threads, which lets other threads (greenlets under gevent) in, and 16
    requests reaching a new web process at once made 16 pools, each keeping a Postgres
    connection for the life of the process (``tests/test_engine.py``)."""
    cached = functools.cache(make)
    lock = threading.Lock()

    @functools.wraps(make)
    def get() -> _T:
        if not cached.cache_info().currsize:
            with lock:
                return cached()
        return cached()

    get.cache_info = cached.cache_info  # type: ignore[attr-defined]
    get.cache_clear = cached.cache_clear  # type: ignore[attr-defined]
    return get


@_made_once
def get_pool() -> ConnectionPool[psycopg.Connection[Any]]:
    """Autocommit connections for one-statement units of work (the worker's claim and
    record), handed back as soon as the statement is done, so that a process holds a
    few connections however many of its threads wait on Stripe (SPEC 6).

    No ping before each use (a round trip per checkout): a connection found broken
    fails its statement, is discarded by the pool, and the caller retries the task."""
    # A checkout that waits 30 s means Postgres is down or the pool is too small.
    return _autocommit_pool("refunds-hot-path", get_settings().worker_db_connections, 30)


def _autocommit_pool(
    name: str, max_size: int, timeout: float, *,
    application_name: str | None = None,
    check_at_checkout: bool = False,
) -> ConnectionPool[psycopg.Connection[Any]]:
    """A psycopg pool of autocommit connections with the service's session settings,
    opened in the background (a process starts even while Postgres is away).

    ``check_at_checkout``: a connection Postgres closed while it sat idle is replaced
    before it is used (see ``get_web_pool``)."""
    kwargs: dict[str, Any] = {"autocommit": True, "options": CONNECTION_OPTIONS}
    if application_name is not None:
        kwargs["application_name"] = application_name

    def nothing_to_read(connection: psycopg.Connection[Any]) -> None:
        if _closed_while_idle(connection):
            connection.close()  # so that the pool replaces it rather than keep it
            # Postgres most likely restarted and closed the pool's other idle connections
            # too: test them now. Otherwise the checkout would find them dead one by one,
            # waiting psycopg_pool's back-off after each (1, 2, 4 s: past the web's 5 s,
            # a 503 after a restart); now it waits one back-off and gets a new one.
            pool.check()
            raise psycopg.OperationalError("the connection was closed while idle")

    pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
        get_settings().libpq_url, min_size=1, max_size=max_size, kwargs=kwargs,
        timeout=timeout, check=nothing_to_read if check_at_checkout else None, name=name,
        open=False,
    )
    pool.open(wait=False)
    return pool


#: pg_stat_activity.application_name of the hot path's connections.
WEB_APPLICATION_NAME = "refunds-web"


@_made_once
def get_web_pool() -> ConnectionPool[psycopg.Connection[Any]]:
    """Autocommit connections for the API's hot path (``POST /v1/admin/refunds``: one
    statement, ``run_and_commit``), ``WEB_DB_CONNECTIONS`` of them; requests beyond
    that wait their turn.

    Plain psycopg, not the engine: SQLAlchemy's session, its pool checkout and its
    per-checkout ping cost more of a POST's CPU than the statement itself, and the ping
    was a round trip of its own (make bench, py-spy). The check at checkout costs none:
    a connection Postgres closed while it sat idle (a restart, a failover, a proxy's
    idle timeout) has something to read, its end or Postgres' last words, and is
    replaced before a statement is sent on it."""
    # A connection is held for one statement, so the wait for one is short even with
    # every request of the process queued for it; 5 s means Postgres cannot be reached:
    # answer 503 well before a caller gives up.
    return _autocommit_pool(
        "refunds-web", get_settings().web_db_connections, 5,
        application_name=WEB_APPLICATION_NAME, check_at_checkout=True,
    )


@_made_once
def get_webhook_pool() -> ConnectionPool[psycopg.Connection[Any]]:
    """Autocommit connections for ``POST /v1/webhooks/stripe``'s one statement (storing
    an event that a worker applies: most of a refund burst), ``WEB_DB_CONNECTIONS`` of
    them, checked as the refund endpoint's are. A pool of its own: a burst of Stripe's
    events queues for these, never for the connections refunds are initiated on."""
    return _autocommit_pool(
        "refunds-webhooks", get_settings().web_db_connections, 5,
        application_name="refunds-webhooks", check_at_checkout=True,
    )


#: The system's poll() even where gevent patched the select module (the web's gevent
#: worker): a poll with no timeout never blocks, and gevent's would pass every checkout
#: through its hub and back (2 % of a POST's CPU, make bench).
_system_poll = get_original("select", "poll")


def _closed_while_idle(connection: psycopg.Connection[Any]) -> bool:
    """An idle connection has nothing to read; one that does was closed by Postgres (its
    end, or its last words before it)."""
    poller = _system_poll()
    poller.register(connection.fileno(), select.POLLIN)
    return bool(poller.poll(0))


def run_and_commit(connection: psycopg.Connection[Any], query: str, params: Any) -> Any:
    """The row of one statement that records something, on an autocommit connection.

    A connection that breaks before the answer is back leaves the outcome unknown
    (``OutcomeUnknown``): the statement may have been committed. An error Postgres
    answered with (a lock or statement timeout...) means nothing was recorded."""
    try:
        return connection.execute(query, params).fetchone()  # type: ignore[arg-type]
    except psycopg.Error as exc:
        if connection.broken:
            raise OutcomeUnknown(
                "The database connection broke while the change was being committed: "
                "it may or may not have been recorded."
            ) from exc
        raise


class UnitOfWorkSession(Session):
    """A session whose ``commit`` says when its outcome is unknown."""

    def commit(self) -> None:
        try:
            super().commit()
        except (OperationalError, InterfaceError) as exc:
            sqlstate = getattr(exc.orig, "sqlstate", None) or ""
            if sqlstate[:2] in DEFINITE_ROLLBACK_CLASSES:
                raise
            raise OutcomeUnknown(
                "The database connection broke while the change was being committed: "
                "it may or may not have been recorded."
            ) from exc


@functools.cache
def _session_factory() -> sessionmaker[UnitOfWorkSession]:
    return sessionmaker(bind=get_engine(), class_=UnitOfWorkSession, expire_on_commit=False)


@contextmanager
def unit_of_work() -> Iterator[Session]:
    """A session whose transaction is rolled back unless the block calls ``commit()``.

    A ``commit()`` that fails in a way that leaves its outcome unknown (the connection
    broke during COMMIT) raises ``shared.domain.errors.OutcomeUnknown``; an error raised before
    it (``OperationalError`` from a statement) means nothing was recorded."""
    session = _session_factory()()
    try:
        yield session
    finally:
        session.rollback()
        session.close()


def driver_cursor(session: Session) -> psycopg.Cursor[Any]:
    """A psycopg cursor on the session's connection, inside its transaction, whose rows
    have attributes. For the hot path only: a statement through it costs a third of the
    CPU of ``session.execute`` (make bench); everything else goes through SQLAlchemy."""
    connection = session.connection().connection.driver_connection
    return connection.cursor(row_factory=namedtuple_row)
