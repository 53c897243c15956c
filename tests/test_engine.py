"""SQLAlchemy's engine (every unit of work but the hot paths' single statements): no
ping before each use, and still a connection Postgres closed while it sat in the pool (a
restart, a failover, an idle timeout) is replaced at checkout, not used. And the hot
paths' pools: one a process, however many callers arrive at once."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psycopg
from sqlalchemy import text

from shared.adapters.config import get_settings
from shared.adapters.db import get_engine, get_webhook_pool


def test_a_connection_closed_while_idle_is_replaced_at_checkout(service_env) -> None:
    engine = get_engine()
    engine.dispose()  # so that the pool holds exactly the connection below
    with engine.connect() as connection:
        closed = connection.execute(text("SELECT pg_backend_pid()")).scalar_one()
    with psycopg.connect(get_settings().libpq_url, autocommit=True) as admin:
        assert admin.execute("SELECT pg_terminate_backend(%s)", (closed,)).fetchone() == (True,)
        deadline = time.monotonic() + 10
        while admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (closed,)).fetchone():
            assert time.monotonic() < deadline, "the terminated backend is still there"
            time.sleep(0.02)

    with engine.connect() as connection:
        replacement = connection.execute(text("SELECT pg_backend_pid()")).scalar_one()
    assert replacement != closed


def test_callers_arriving_together_at_a_new_process_share_one_pool(service_env) -> None:
    get_webhook_pool.cache_clear()  # as a web process that has not served a webhook yet
    callers = 16
    together = threading.Barrier(callers)

    def first_use(_: int) -> object:
        together.wait()
        return get_webhook_pool()

    with ThreadPoolExecutor(callers) as threads:
        pools = list(threads.map(first_use, range(callers)))
    made = {id(pool): pool for pool in pools}
    for pool in made.values():
        pool.close()
    get_webhook_pool.cache_clear()
    assert len(made) == 1, f"{len(made)} pools, each holding a connection"
