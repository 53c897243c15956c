"""A refund pipeline for the fuzzers: gunicorn (2 processes), a Celery worker and the
Stripe emulator, on a database and a Redis of the package's own, with a few real
payments to refund, so fuzzed requests reach past "not found" into the money rules.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from tests.chaos.stack import Pipeline, running_pipeline
from tests.conftest import RUN_ID, _admin_execute
from tests.support import RedisServer, create_database, seed_emulator_payments


@pytest.fixture(scope="package")
def fuzz_pipeline(
    service_env: dict[str, str], log_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pipeline]:
    name = f"refunds_test_{RUN_ID}_fuzz"
    database_url = create_database(name)
    redis_server = RedisServer(tmp_path_factory.mktemp("fuzz-redis"))
    try:
        with running_pipeline(
            service_env, database_url=database_url, redis_url=redis_server.url,
            log_dir=log_dir, web_workers=2, workers=1, beat=False,
        ) as pipeline:
            yield pipeline
    finally:
        redis_server.stop()
        _admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="package")
def fuzz_db(fuzz_pipeline: Pipeline) -> Iterator[Session]:
    engine = create_engine(fuzz_pipeline.env["DATABASE_URL"])
    with Session(engine, expire_on_commit=False) as session:
        yield session
    engine.dispose()


@pytest.fixture(scope="package")
def fuzz_charges(fuzz_pipeline: Pipeline, fuzz_db: Session) -> list[str]:
    """Succeeded charges, at the emulator and in the service, for fuzzed refunds to hit."""
    return seed_emulator_payments(fuzz_pipeline, fuzz_db, 20, amount=100_000)
