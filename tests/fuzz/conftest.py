"""A refund pipeline for the fuzzers: gunicorn (2 processes), a Celery worker and the
Stripe emulator, on a Postgres cluster and a Redis of the package's own, with a few real
payments to refund, so fuzzed requests reach past "not found" into the money rules.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from tests.chaos.stack import Pipeline, PostgresCluster, running_pipeline
from tests.support import RedisServer, seed_emulator_payments


@pytest.fixture(scope="package")
def fuzz_pipeline(
    service_env: dict[str, str], log_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pipeline]:
    # A cluster of its own: the run's shared Postgres may be near its connection limit,
    # and a fuzzer must find the service's 500s, not the neighbours'.
    cluster = PostgresCluster()
    redis_server = RedisServer(tmp_path_factory.mktemp("fuzz-redis"))
    try:
        cluster.start()
        with running_pipeline(
            service_env, database_url=cluster.create_database("refunds"),
            redis_url=redis_server.url, log_dir=log_dir, web_workers=2, workers=1, beat=False,
        ) as pipeline:
            yield pipeline
    finally:
        redis_server.stop()
        cluster.destroy()


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
