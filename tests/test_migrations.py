"""Alembic migrations are the only way the schema changes (SPEC 4): they must produce
exactly what the models describe, and go down and up again cleanly."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, inspect, make_url, text
from sqlalchemy.exc import DBAPIError

from shared.domain.models import Base

ALEMBIC_INI = Path(__file__).resolve().parent.parent / "alembic.ini"
SEED_ROWS = (
    "INSERT INTO payments (id, amount, currency, status) VALUES ('pay_1', 100, 'usd', 'succeeded')",
    "INSERT INTO refunds (id, payment_id, amount, currency, status, stripe_idempotency_key, "
    "initiated_by) VALUES ('rf_1', 'pay_1', 100, 'usd', 'pending', 'refund-rf_1', 'ops')",
    "INSERT INTO refund_events (refund_id, to_status, actor) VALUES ('rf_1', 'pending', 'ops')",
)


def alembic_config(database_url: str) -> Config:
    cfg = Config(str(ALEMBIC_INI))
    cfg.attributes["configure_logging"] = False
    cfg.attributes["database_url"] = database_url
    return cfg


def drift(engine: Engine) -> list[object]:
    """What autogenerate would write into a new migration: empty when in step."""
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": True}
        )
        return list(compare_metadata(context, Base.metadata))


@pytest.fixture
def scratch_url(service_env: dict[str, str]) -> Iterator[str]:
    """An empty database of its own, dropped afterwards."""
    url = make_url(service_env["DATABASE_URL"])
    admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    name = f"{url.database}_mig_{uuid.uuid4().hex[:6]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_models_and_migrations_do_not_drift(service_env: dict[str, str]) -> None:
    engine = create_engine(service_env["DATABASE_URL"])
    try:
        differences = drift(engine)
    finally:
        engine.dispose()
    assert differences == [], (
        "the models and the migrations differ; write a migration "
        f"(alembic revision --autogenerate): {differences}"
    )


def test_the_run_database_is_at_the_single_head(service_env: dict[str, str]) -> None:
    heads = ScriptDirectory.from_config(alembic_config(service_env["DATABASE_URL"])).get_heads()
    assert len(heads) == 1, f"migrations have several heads, merge them: {heads}"
    engine = create_engine(service_env["DATABASE_URL"])
    try:
        with engine.connect() as conn:
            assert MigrationContext.configure(conn).get_current_heads() == tuple(heads)
    finally:
        engine.dispose()


def test_downgrade_to_base_then_upgrade_to_head(scratch_url: str) -> None:
    cfg = alembic_config(scratch_url)
    engine = create_engine(scratch_url)
    try:
        command.upgrade(cfg, "head")
        assert drift(engine) == []
        command.downgrade(cfg, "base")
        engine.dispose()  # reflect afresh: the schema just changed under the pool
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        assert drift(engine) != []  # the check sees a schema that is not the models'
        with engine.connect() as conn:
            functions = conn.execute(
                text("SELECT proname FROM pg_proc WHERE proname = 'refund_events_append_only'")
            ).all()
        assert functions == []
        command.upgrade(cfg, "head")
        engine.dispose()
        assert drift(engine) == []
        assert set(Base.metadata.tables) <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_the_audit_trail_is_append_only_in_the_database(scratch_url: str) -> None:
    """The migration's trigger, not only the code, refuses to rewrite history."""
    command.upgrade(alembic_config(scratch_url), "head")
    engine = create_engine(scratch_url)
    try:
        with engine.begin() as conn:
            for statement in SEED_ROWS:
                conn.execute(text(statement))
        for statement in (
            "UPDATE refund_events SET actor = 'someone else'",
            "DELETE FROM refund_events",
        ):
            with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
                conn.execute(text(statement))
    finally:
        engine.dispose()
