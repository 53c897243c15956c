"""Helpers shared by the tests: real processes, free ports, tokens and seed data."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import redis
from sqlalchemy import text
from sqlalchemy.orm import Session

from shared.adapters.config import Settings
from shared.adapters.tokens import issue_token
from shared.domain.models import Charge, Payment, new_id

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_http(
    url: str, timeout: float = 20.0, proc: subprocess.Popen[Any] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.TransportError:
            time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


class ServiceProcess:
    """A real child process (web, worker, beat...) with its output in a log file."""

    def __init__(self, name: str, argv: list[str], env: Mapping[str, str], log_dir: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = dict(env)
        self.log_path = log_dir / f"{name}-{int(time.time() * 1000)}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServiceProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL the whole process group, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def web_process(
    env: Mapping[str, str], log_dir: Path, *, workers: int = 2, port: int | None = None
) -> tuple[ServiceProcess, str]:
    port = port or free_port()
    argv = [
        str(BIN / "gunicorn"),
        "api.wsgi:app",
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        str(workers),
        "--graceful-timeout",
        "5",
        "--log-level",
        "warning",
    ]
    return ServiceProcess("web", argv, env, log_dir), f"http://127.0.0.1:{port}"


def worker_process(
    env: Mapping[str, str],
    log_dir: Path,
    *,
    name: str = "worker",
    concurrency: int = 2,
    pool: str = "threads",
) -> ServiceProcess:
    argv = [
        str(BIN / "celery"),
        "-A",
        "worker.app",
        "worker",
        "--loglevel",
        "INFO",
        "--pool",
        pool,
        "--concurrency",
        str(concurrency),
        "--hostname",
        f"{name}-{os.getpid()}@%h",
        "--without-mingle",
        "--without-gossip",
    ]
    return ServiceProcess(name, argv, env, log_dir)


def beat_process(env: Mapping[str, str], log_dir: Path, *, name: str = "beat") -> ServiceProcess:
    schedule = log_dir / f"{name}-schedule-{time.monotonic_ns()}"
    argv = [
        str(BIN / "celery"),
        "-A",
        "worker.app",
        "beat",
        "--loglevel",
        "INFO",
        "--schedule",
        str(schedule),
    ]
    return ServiceProcess(name, argv, env, log_dir)


class RedisServer:
    """A redis-server of a test's own, on a free port, without persistence: a restart
    loses everything it held, as a crashed broker does."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(self.url).ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL, as a crash would: the queue it held is lost."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def migrate(database_url: str) -> None:
    """Bring a database to the head revision, in this process."""
    from alembic import command
    from alembic.config import Config

    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.attributes["configure_logging"] = False
    cfg.attributes["database_url"] = database_url
    command.upgrade(cfg, "head")


_BACKENDS_OF = ("SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND application_name = :name")
_TERMINATE_BACKENDS_OF = ("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                          " WHERE datname = current_database() AND application_name = :name")


def terminate_backends(session: Session, application_name: str) -> int:
    """Terminate this database's backends of ``application_name``, as a Postgres restart
    would, and wait until they are gone (``pg_terminate_backend`` only signals), so that
    the pools holding them find them dead while idle. Returns how many there were."""
    params = {"name": application_name}
    terminated = int(session.scalar(text(_TERMINATE_BACKENDS_OF), params) or 0)
    session.commit()
    deadline = time.monotonic() + 10
    while session.scalar(text(_BACKENDS_OF), params):
        session.commit()
        assert time.monotonic() < deadline, "terminated backends still there"
        time.sleep(0.02)
    session.commit()
    return terminated


def create_database(name: str) -> str:
    """A new, migrated database on the run's Postgres; its URL."""
    from tests.conftest import PG_ADMIN_URL, _admin_execute

    _admin_execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    migrate(url)
    return url


def token(
    settings: Settings,
    *,
    scopes: tuple[str, ...] = ("refunds:read", "refunds:write"),
    sub: str = "ops@example.com",
    ttl: int = 3600,
) -> str:
    return issue_token(settings, subject=sub, scopes=list(scopes), ttl_seconds=ttl)


def auth(settings: Settings, **kwargs: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(settings, **kwargs)}"}


def seed_payment(
    session: Session,
    *,
    amount: int = 10_000,
    currency: str = "usd",
    status: str = "succeeded",
    charge_status: str | None = "succeeded",
    disputed: bool = False,
) -> tuple[Payment, Charge | None]:
    """A payment (and its charge) as `refunds payments sync` would have stored it."""
    suffix = new_id("x")[2:]
    payment = Payment(
        id=new_id("pay"),
        stripe_payment_intent_id=f"pi_{suffix}",
        amount=amount,
        currency=currency,
        status=status,
    )
    session.add(payment)
    session.flush()
    charge = None
    if charge_status is not None:
        charge = Charge(
            id=f"ch_{suffix}",
            payment_id=payment.id,
            amount=amount,
            currency=currency,
            status=charge_status,
            disputed=disputed,
        )
        session.add(charge)
    session.commit()
    return payment, charge


def seed_emulator_payments(
    stack: Any,
    db: Session,
    count: int,
    *,
    amount: int = 5_000,
    payment_method: str = "pm_card_visa",
) -> list[str]:
    """Succeeded payments made at the emulator (``stack.admin``) and stored as payments
    sync would; their charge ids."""
    seeded = stack.admin.seed(count, amount=amount, payment_method=payment_method)
    for pi_id, charge_id in zip(seeded["payment_intents"], seeded["charges"], strict=True):
        payment = Payment(
            id=new_id("pay"),
            stripe_payment_intent_id=pi_id,
            amount=amount,
            currency="usd",
            status="succeeded",
        )
        db.add(payment)
        db.flush()
        db.add(
            Charge(
                id=charge_id,
                payment_id=payment.id,
                amount=amount,
                currency="usd",
                status="succeeded",
            )
        )
    db.commit()
    return list(seeded["charges"])


def table_counts(session: Session) -> dict[str, int]:
    tables = (
        "refunds",
        "refund_events",
        "idempotency_records",
        "payments",
        "charges",
        "stripe_events",
    )
    return {t: int(session.execute(text(f"SELECT count(*) FROM {t}")).scalar_one()) for t in tables}  # noqa: S608 - fixed names
