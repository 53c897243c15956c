"""The refund pipeline as real processes, on infrastructure a test may break.

Used by the chaos runner, the concurrency and the contract-fuzzing tests: a Stripe
emulator, gunicorn, Celery workers and beat, on a Redis and (for chaos) a Postgres
cluster of their own, so killing, restarting or flushing them never touches the
machine's shared servers or another test's data.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import create_engine, text

from emulator.testing import Admin, EmulatorProcess
from tests.support import (
    ServiceProcess,
    beat_process,
    free_port,
    migrate,
    wait_for_http,
    web_process,
    worker_process,
)

PG_BIN = Path(os.environ.get("CHAOS_PG_BIN", "/usr/lib/postgresql/15/bin"))

#: Settings every process of a pipeline runs with (production defaults in brackets):
#: short retries, a reconciler that runs every second, so every failure settles in
#: seconds, not minutes.
FAST_SETTINGS = {
    "RETRY_BASE_SECONDS": "0.2",  # [2]
    "RETRY_MAX_SECONDS": "2",  # [300]
    "MAX_ATTEMPTS": "5",  # [8]
    "STRIPE_TIMEOUT_SECONDS": "2",  # [10]
    "CLAIM_LEASE_SECONDS": "15",  # [90]: a killed worker's refund waits this long
    "RECONCILE_INTERVAL_SECONDS": "1",  # [60]
    "STUCK_AFTER_SECONDS": "3",  # [300]
    "STUCK_ALERT_SECONDS": "60",  # [3600]
    "STRIPE_MAX_RPS": "500",  # [25]
    "WORKER_CONCURRENCY": "4",  # [64]
    "WORKER_METRICS_PORT": "0",  # several workers share the machine
    "LOG_LEVEL": "INFO",
}


class PostgresCluster:
    """A Postgres cluster of its own (``initdb`` as the ``postgres`` user, in a temporary
    directory, on a free port), which may be stopped, crashed and restarted at will."""

    def __init__(self, *, bin_dir: Path = PG_BIN) -> None:
        self.bin_dir = bin_dir
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="refunds-pg-"))
        shutil.chown(self.root, user="postgres")
        self.data = self.root / "data"
        self.log_path = self.root / "postgres.log"
        self.restarts = 0
        self._run("initdb", "-D", str(self.data), "--auth=trust", "-U", "postgres", "-E", "UTF8",
                  "--no-sync")

    def _run(self, tool: str, *args: str) -> None:
        result = subprocess.run(
            ["runuser", "-u", "postgres", "--", str(self.bin_dir / tool), *args],
            capture_output=True, text=True, check=False, timeout=120,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{tool} failed ({result.returncode}): {result.stderr.strip()}")

    def start(self) -> None:
        # fsync=off survives a crashed server (the OS keeps what was written), not a
        # crashed machine; synchronous_commit stays on: a commit the service was told
        # about must survive the crash, as it does in production.
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.root}"
            " -c fsync=off -c max_connections=200"
        )
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.log_path),
                  "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        """``fast`` closes every session cleanly; ``immediate`` is a crash (recovery at start)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def restart(self, *, down_seconds: float = 0.0) -> None:
        """Crash it, keep it down a while, start it again: every open connection breaks."""
        self.stop("immediate")
        time.sleep(down_seconds)
        self.start()
        self.restarts += 1

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        engine = create_engine(self.url(), isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
        url = self.url(name)
        migrate(url)
        return url

    def destroy(self) -> None:
        with contextlib.suppress(RuntimeError):  # not running
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class Pipeline:
    """Running processes of one refund pipeline; ``workers`` may be killed and replaced."""

    env: dict[str, str]
    api_url: str
    emulator: EmulatorProcess
    web: ServiceProcess
    beat: ServiceProcess | None
    log_dir: Path
    workers: list[ServiceProcess] = field(default_factory=list)
    retired: list[ServiceProcess] = field(default_factory=list)
    _started: int = 0

    @property
    def admin(self) -> Admin:
        return self.emulator.admin

    @property
    def webhook_url(self) -> str:
        return f"{self.api_url}/v1/webhooks/stripe"

    def start_worker(self, concurrency: int | None = None) -> ServiceProcess:
        self._started += 1
        proc = worker_process(
            self.env, self.log_dir, name=f"worker{self._started}",
            concurrency=concurrency or int(self.env["WORKER_CONCURRENCY"]),
        ).start()
        self.workers.append(proc)
        return proc

    def kill_worker(self, index: int) -> ServiceProcess:
        """SIGKILL a worker's whole process group, as a crash or an OOM kill would."""
        proc = self.workers.pop(index)
        proc.kill()
        self.retired.append(proc)
        return proc

    def log_paths(self) -> list[Path]:
        procs = [self.web, *self.workers, *self.retired]
        if self.beat is not None:
            procs.append(self.beat)
        return [p.log_path for p in procs]

    def stop(self) -> None:
        """SIGTERM everything at once, then wait for each: their shutdowns overlap."""
        procs = [p for p in (self.beat, *self.workers, self.web) if p is not None]
        for proc in procs:
            if proc.proc is not None and proc.proc.poll() is None:
                os.killpg(proc.proc.pid, signal.SIGTERM)
        for proc in procs:
            proc.stop()


@contextmanager
def running_pipeline(
    base_env: Mapping[str, str],
    *,
    database_url: str,
    redis_url: str,
    log_dir: Path,
    web_workers: int = 2,
    workers: int = 1,
    beat: bool = True,
    settings: Mapping[str, str] | None = None,
    card_delay: float = 1.0,
) -> Iterator[Pipeline]:
    """Start the emulator, gunicorn, ``workers`` Celery workers and beat; stop them all
    at the end. The emulator signs its webhooks with the service's secret and POSTs
    them to the gunicorn, as Stripe would."""
    web_port = free_port()
    api_url = f"http://127.0.0.1:{web_port}"
    env = {k: v for k, v in base_env.items() if k != "CELERY_BROKER_URL"}
    env |= {**FAST_SETTINGS, **(settings or {}), "DATABASE_URL": database_url,
            "REDIS_URL": redis_url}
    with EmulatorProcess(
        webhook_url=f"{api_url}/v1/webhooks/stripe",
        webhook_secret=env["STRIPE_WEBHOOK_SECRET"],
        pending_refund_delay=card_delay,
        failing_refund_delay=card_delay,
    ) as emulator:
        env["STRIPE_API_BASE"] = emulator.url
        web, _ = web_process(env, log_dir, workers=web_workers, port=web_port)
        pipeline = Pipeline(env=env, api_url=api_url, emulator=emulator, web=web,
                            beat=beat_process(env, log_dir) if beat else None, log_dir=log_dir)
        try:
            web.start()
            for _ in range(workers):
                pipeline.start_worker()
            if pipeline.beat is not None:
                pipeline.beat.start()
            wait_for_http(f"{api_url}/healthz", timeout=60, proc=web.proc)
            yield pipeline
        finally:
            pipeline.stop()
