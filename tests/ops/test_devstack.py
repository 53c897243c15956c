"""`make run` (python -m cli.devstack): one line when Postgres or Redis is down; otherwise
a database created and migrated, the whole stack up, a curl that works as printed, and
everything stopped by Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import PG_ADMIN_URL, _admin_execute
from tests.support import BIN, ROOT, RedisServer, free_port

DEVSTACK = [str(BIN / "python"), "-m", "cli.devstack"]


def _ports() -> dict[str, str]:
    return {
        name: str(free_port())
        for name in ("PORT", "FLOWER_PORT", "EMULATOR_PORT", "WORKER_METRICS_PORT")
    }


def _env(base: dict[str, str], **overrides: str) -> dict[str, str]:
    env = {**base, **_ports(), **overrides}
    for name in (
        "STRIPE_API_BASE",
        "CELERY_BROKER_URL",
        "FLOWER_BASIC_AUTH",
        "PROMETHEUS_MULTIPROC_DIR",
    ):
        env.pop(name, None)
    return env


def _run_briefly(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        DEVSTACK, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )


def test_postgres_down_is_one_line_saying_how_to_start_it(ops_env: dict[str, str]) -> None:
    port = free_port()
    result = _run_briefly(
        _env(ops_env, DATABASE_URL=f"postgresql://postgres@127.0.0.1:{port}/refunds")
    )
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"make run: Postgres is not reachable at 127.0.0.1:{port}")
    assert "start it" in lines[0] and "DATABASE_URL" in lines[0]


def test_redis_down_is_one_line_saying_how_to_start_it(ops_env: dict[str, str]) -> None:
    port = free_port()
    result = _run_briefly(_env(ops_env, REDIS_URL=f"redis://127.0.0.1:{port}/0"))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"make run: Redis is not reachable at 127.0.0.1:{port}")
    assert "redis-server" in lines[0] and "REDIS_URL" in lines[0]


def test_a_port_in_use_is_one_line_naming_it(ops_env: dict[str, str]) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _run_briefly(_env(ops_env, FLOWER_PORT=str(port)))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"make run: port {port} (FLOWER_PORT) is taken; stop what holds it or set FLOWER_PORT"
    )


@pytest.fixture
def fresh_database() -> Iterator[str]:
    name = f"refunds_devstack_{uuid.uuid4().hex[:10]}"
    yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    _admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _banner_block(output: str, start: str, end: str) -> str:
    lines = output[output.index(start) :].splitlines()[1:]
    block = []
    for line in lines:
        if line.strip().startswith(end):
            break
        block.append(line.strip())
    return "\n".join(block)


def test_make_run_starts_everything_prints_a_working_curl_and_stops_on_ctrl_c(
    ops_env: dict[str, str], fresh_database: str, tmp_path: Path
) -> None:
    redis_server = RedisServer(tmp_path)
    env = _env(ops_env, DATABASE_URL=fresh_database, REDIS_URL=redis_server.url)
    out = tmp_path / "make-run.log"
    try:
        with out.open("w") as log:
            proc = subprocess.Popen(
                DEVSTACK,
                env=env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                text=True,
            )
        try:
            deadline = time.monotonic() + 120
            while "Ctrl-C stops everything." not in out.read_text():
                assert proc.poll() is None, out.read_text()
                assert time.monotonic() < deadline, out.read_text()
                time.sleep(0.2)
            output = out.read_text()
            assert f"make run: created database {fresh_database.rsplit('/', 1)[1]}" in output
            assert f"API:      http://127.0.0.1:{env['PORT']}" in output
            assert (
                f"Flower:   http://127.0.0.1:{env['FLOWER_PORT']}   (login admin / admin)" in output
            )

            create = _banner_block(output, "Refund a demo payment", "Then follow it")
            created = subprocess.run(
                ["/bin/sh", "-c", create.replace("\\\n", " ")],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
                env={"PATH": "/usr/bin:/bin"},
            )
            assert '"status": "pending"' in created.stdout, created
            refund_id = re.search(r'"refund_id": "(\w+)"', created.stdout)
            assert refund_id

            export = create.splitlines()[0]
            follow = export + "\n" + _banner_block(output, "Then follow it", "Flower:")
            deadline = time.monotonic() + 20
            listed = ""
            while '"status":"succeeded"' not in listed.replace(" ", ""):
                assert time.monotonic() < deadline, listed
                listed = subprocess.run(
                    ["/bin/sh", "-c", follow],
                    capture_output=True,
                    text=True,
                    timeout=30,
                    check=True,
                    env={"PATH": "/usr/bin:/bin"},
                ).stdout
                time.sleep(0.2)
            assert refund_id.group(1) in listed

            flower = httpx.get(
                f"http://127.0.0.1:{env['FLOWER_PORT']}/api/workers",
                auth=("admin", "admin"),
                timeout=10,
            )
            assert flower.status_code == 200

            os.killpg(
                proc.pid, signal.SIGINT
            )  # what Ctrl-C does to the terminal's foreground group
            assert proc.wait(60) == 0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        output = out.read_text()
        assert output.rstrip().endswith("make run: stopped")
        for name in ("web", "worker", "beat", "flower", "emulator"):
            assert f"{name}.1 stopped (rc=0)" in output, output[-3000:]
        for port in (
            env["PORT"],
            env["FLOWER_PORT"],
            env["EMULATOR_PORT"],
            env["WORKER_METRICS_PORT"],
        ):
            with pytest.raises(httpx.TransportError):
                httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
    finally:
        redis_server.stop()
