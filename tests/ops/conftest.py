"""Fixtures for the operations tests: whole stacks of real processes.

A stack started here runs beat and workers that consume the ``refunds`` queue and
reconcile every refund in their database, so it gets a database and a Redis of its
own (a redis-server on a free port): it must not take other tests' tasks, nor
reconcile their refunds against the wrong Stripe emulator.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from tests.conftest import _admin_execute
from tests.support import BIN, RedisServer, create_database


@pytest.fixture(scope="package")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="package")
def ops_env(service_env: dict[str, str], own_redis: RedisServer) -> Iterator[dict[str, str]]:
    """The run's settings, with a migrated database and a Redis of the ops tests' own."""
    name = f"refunds_ops_{uuid.uuid4().hex[:10]}"
    env = {
        **service_env,
        "DATABASE_URL": create_database(name),
        "REDIS_URL": own_redis.url,
        "PATH": f"{BIN}{os.pathsep}{service_env.get('PATH', '')}",
    }
    env.pop("CELERY_BROKER_URL", None)
    yield env
    _admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
