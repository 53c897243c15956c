"""Fixtures for the operations tests: whole stacks of real processes.

A stack started here runs beat and workers that consume the ``refunds`` queue and
reconcile every refund in their database, so it gets a database and a Redis of its
own (a redis-server on a free port): it must not take other tests' tasks, nor
reconcile their refunds against the wrong Stripe emulator.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text

from tests.support import BIN, ROOT, RedisServer

PG_ADMIN_URL = os.environ.get(
    "TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


def _admin_execute(sql: str) -> None:
    engine = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(sql))
    engine.dispose()


@pytest.fixture(scope="package")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="package")
def ops_env(service_env: dict[str, str], own_redis: RedisServer) -> Iterator[dict[str, str]]:
    """The run's settings, with a migrated database and a Redis of the ops tests' own."""
    name = f"refunds_ops_{uuid.uuid4().hex[:10]}"
    _admin_execute(f'CREATE DATABASE "{name}"')
    env = {
        **service_env,
        "DATABASE_URL": PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}",
        "REDIS_URL": own_redis.url,
        "PATH": f"{BIN}{os.pathsep}{service_env.get('PATH', '')}",
    }
    env.pop("CELERY_BROKER_URL", None)
    subprocess.run(
        [str(BIN / "refunds"), "migrate"],
        env=env,
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    yield env
    _admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
