"""Engine and unit of work: one transaction per unit, rolled back unless committed."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.rows import namedtuple_row
from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker

from shared.config import get_settings


@functools.cache
def get_engine() -> Engine:
    settings = get_settings()
    return create_engine(
        settings.sqlalchemy_url,
        # Room to keep one connection per thread (gunicorn's WEB_THREADS, the worker's
        # WORKER_CONCURRENCY up to its maximum of 64). Connections open lazily, so a
        # process keeps only as many as its threads use at once; with fewer kept than
        # that, every busy moment closed and reopened connections (a new Postgres
        # backend each time) and worker threads queued behind 15 connections.
        pool_size=64,
        max_overflow=10,
        pool_pre_ping=True,
        # A statement that waits this long on a lock is a bug or an outage, not load.
        connect_args={
            "options": "-c timezone=UTC -c lock_timeout=10000 -c statement_timeout=30000"
        },
    )


@functools.cache
def _session_factory() -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


@contextmanager
def unit_of_work() -> Iterator[Session]:
    """A session whose transaction is rolled back unless the block calls ``commit()``."""
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
