"""Health: /healthz, /readyz naming what is down, and `refunds worker-health`."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import (
    BIN,
    ROOT,
    ServiceProcess,
    free_port,
    wait_for_http,
    web_process,
    worker_process,
)


def _closed_port() -> int:
    return free_port()  # free means nothing listens there


def test_readyz_is_ready_when_database_and_broker_answer(api_url: str) -> None:
    response = httpx.get(f"{api_url}/readyz", timeout=10)
    assert response.status_code == 200
    assert response.json() == {"status": "ready"}


def test_readyz_names_the_broker_when_redis_is_down(
    service_env: dict[str, str], log_dir: Path
) -> None:
    env = {**service_env, "REDIS_URL": f"redis://127.0.0.1:{_closed_port()}/0"}
    web, url = web_process(env, log_dir, workers=1)
    with web:
        wait_for_http(f"{url}/healthz", proc=web.proc)
        assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
        response = httpx.get(f"{url}/readyz", timeout=15)
        assert response.status_code == 503
        body = response.json()
        assert body["error"] == "unavailable"
        assert body["down"] == ["broker"]
        assert "broker" in body["message"]
        assert httpx.get(f"{url}/metrics", timeout=10).status_code == 200


def test_readyz_names_the_database_and_metrics_say_so_when_postgres_is_down(
    service_env: dict[str, str], log_dir: Path
) -> None:
    env = {
        **service_env,
        "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{_closed_port()}/refunds",
    }
    web, url = web_process(env, log_dir, workers=1)
    with web:
        wait_for_http(f"{url}/healthz", proc=web.proc)
        response = httpx.get(f"{url}/readyz", timeout=15)
        assert response.status_code == 503
        assert response.json()["down"] == ["database"]
        metrics = httpx.get(f"{url}/metrics", timeout=15)
        assert metrics.status_code == 200
        assert "\nrefunds_db_metrics_up 0.0\n" in metrics.text
        assert "refunds_open{" not in metrics.text


def _worker_health(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "refunds"), "worker-health", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def health_worker(ops_env: dict[str, str], log_dir: Path) -> Iterator[tuple[ServiceProcess, str]]:
    env = {**ops_env, "WORKER_METRICS_PORT": "0"}
    worker = worker_process(env, log_dir, name="health", concurrency=1)
    node = f"health-{os.getpid()}@{socket.gethostname()}"
    with worker:
        deadline = time.monotonic() + 30
        while _worker_health(ops_env, "--node", node, "--timeout", "1").returncode != 0:
            assert worker.proc is not None and worker.proc.poll() is None, worker.log()
            assert time.monotonic() < deadline, worker.log()
        yield worker, node


def test_worker_health_exits_0_when_the_worker_answers(
    health_worker: tuple[ServiceProcess, str], ops_env: dict[str, str]
) -> None:
    _, node = health_worker
    result = _worker_health(ops_env, "--node", node)
    assert result.returncode == 0
    assert result.stdout.strip() == f"ok: {node} answered"
    assert _worker_health(ops_env, "--this-host", "--timeout", "2").returncode == 0


def test_worker_health_exits_1_when_no_such_worker_answers(
    health_worker: tuple[ServiceProcess, str], ops_env: dict[str, str]
) -> None:
    result = _worker_health(ops_env, "--node", "nobody@nowhere", "--timeout", "1")
    assert result.returncode == 1
    assert result.stderr.strip() == "no worker answered nobody@nowhere within 1s"


def test_worker_health_exits_1_when_the_broker_is_down(ops_env: dict[str, str]) -> None:
    env = {**ops_env, "REDIS_URL": f"redis://127.0.0.1:{_closed_port()}/0"}
    result = _worker_health(env, "--timeout", "1")
    assert result.returncode == 1
    assert result.stderr.startswith("broker unreachable")


def test_worker_health_exits_1_once_the_worker_has_stopped(
    health_worker: tuple[ServiceProcess, str], ops_env: dict[str, str]
) -> None:
    worker, node = health_worker
    assert worker.stop() == 0
    result = _worker_health(ops_env, "--node", node, "--timeout", "1")
    assert result.returncode == 1
