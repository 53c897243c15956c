"""Engine and unit of work: one transaction per unit, rolled back unless committed."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker

from shared.config import get_settings


@functools.cache
def get_engine() -> Engine:
    settings = get_settings()
    return create_engine(
        settings.sqlalchemy_url,
        pool_size=5,
        max_overflow=10,
        pool_pre_ping=True,
        # A statement that waits this long on a lock is a bug or an outage, not load.
        connect_args={"options": "-c timezone=UTC -c lock_timeout=10000 -c statement_timeout=30000"},
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
