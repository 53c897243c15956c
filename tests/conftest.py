"""Test session setup: a database and a Redis database number of this run's own.

Every run creates a fresh Postgres database (migrated with Alembic) and claims a
free Redis database number, so concurrent runs never see each other; both are
released at the end. Settings come from the environment, which is set here before
anything reads it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

PG_ADMIN_URL = os.environ.get(
    "TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_HOST_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379")
RUN_ID = uuid.uuid4().hex[:10]
DB_NAME = f"refunds_test_{RUN_ID}"
REDIS_CLAIM_TTL = 4 * 3600


def _claim_redis_db() -> int:
    """Take a Redis database number no other test run holds (db 0 is left to dev use)."""
    admin = redis.Redis.from_url(f"{REDIS_HOST_URL}/0")
    for number in range(1, 16):
        if admin.set(f"refunds-test-db-claim:{number}", RUN_ID, nx=True, ex=REDIS_CLAIM_TTL):
            return number
    raise RuntimeError("all Redis database numbers 1-15 are claimed by other test runs")


def _release_redis_db(number: int) -> None:
    admin = redis.Redis.from_url(f"{REDIS_HOST_URL}/0")
    redis.Redis.from_url(f"{REDIS_HOST_URL}/{number}").flushdb()
    if admin.get(f"refunds-test-db-claim:{number}") == RUN_ID.encode():
        admin.delete(f"refunds-test-db-claim:{number}")


def _admin_execute(sql: str) -> None:
    engine = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(sql))
    engine.dispose()


@pytest.fixture(scope="session")
def redis_db() -> Iterator[int]:
    number = _claim_redis_db()
    redis.Redis.from_url(f"{REDIS_HOST_URL}/{number}").flushdb()
    yield number
    _release_redis_db(number)


@pytest.fixture(scope="session")
def service_env(
    redis_db: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """The environment every process of this run (tests, web, workers) shares."""
    _admin_execute(f'CREATE DATABASE "{DB_NAME}"')
    database_url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{DB_NAME}"
    env = {
        "DATABASE_URL": database_url,
        "REDIS_URL": f"{REDIS_HOST_URL}/{redis_db}",
        "JWT_SECRET": f"test-jwt-secret-of-32-bytes-at-least-{RUN_ID}",
        "STRIPE_API_KEY": "sk_test_refunds_tests",
        "STRIPE_WEBHOOK_SECRET": f"whsec_test_{RUN_ID}",
        "FLOWER_BASIC_AUTH": "ops:test-flower-password",
        "LOG_LEVEL": "INFO",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    os.environ.pop("CELERY_BROKER_URL", None)
    from shared.adapters.config import get_settings

    get_settings.cache_clear()
    from alembic import command
    from alembic.config import Config

    cfg = Config(str(Path(__file__).resolve().parent.parent / "alembic.ini"))
    cfg.attributes["configure_logging"] = False
    command.upgrade(cfg, "head")
    yield {**os.environ}
    from shared.adapters.db import get_engine

    get_engine().dispose()
    _admin_execute(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def settings(service_env: dict[str, str]):
    from shared.adapters.config import get_settings

    return get_settings()


@pytest.fixture
def db(service_env: dict[str, str]) -> Iterator[Session]:
    from shared.adapters.db import get_engine

    with Session(get_engine(), expire_on_commit=False) as session:
        yield session


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def api_url(service_env: dict[str, str], log_dir: Path) -> Iterator[str]:
    """A real gunicorn server (2 processes) for the whole run."""
    from tests.support import wait_for_http, web_process

    web, url = web_process(service_env, log_dir, workers=2)
    with web:
        wait_for_http(f"{url}/healthz", proc=web.proc)
        yield url
