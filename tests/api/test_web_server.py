"""What the web server itself must do, checked on the one the Procfile runs (gunicorn's
gevent worker, from gunicorn.conf.py): a request waiting on Postgres holds up no other
request of its process, SIGTERM lets requests in flight finish, keep-alive connections
spread over the processes, and /metrics adds up every process. (Requests the server
refuses itself are answered as JSON: tests/api/test_errors.py.)"""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psycopg
import pytest

from shared.adapters.db import WEB_APPLICATION_NAME
from tests.api.helpers import REFUNDS
from tests.support import auth, seed_payment, terminate_backends, wait_for_http, web_process


@pytest.fixture
def one_process(service_env: dict[str, str], log_dir: Path) -> Iterator[tuple[object, str]]:
    web, url = web_process(service_env, log_dir, workers=1)
    with web:
        wait_for_http(f"{url}/healthz", proc=web.proc)
        yield web, url


def _libpq_url(env: dict[str, str]) -> str:
    return env["DATABASE_URL"].replace("postgresql+psycopg://", "postgresql://")


def _wait_for_lock_waiter(conn: psycopg.Connection, deadline: float = 10.0) -> None:
    until = time.monotonic() + deadline
    while time.monotonic() < until:
        waiting = conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE application_name = 'refunds-web' AND wait_event_type = 'Lock'"
        ).fetchone()
        if waiting and waiting[0]:
            return
        time.sleep(0.02)
    raise AssertionError("the POST never waited on the payment's lock")


def test_a_request_waiting_on_postgres_holds_up_no_other_and_sigterm_lets_it_finish(
    one_process, service_env, settings, db
) -> None:
    web, url = one_process
    _, held_charge = seed_payment(db)
    _, other_charge = seed_payment(db)
    headers = auth(settings)
    with psycopg.connect(_libpq_url(service_env)) as locker, psycopg.connect(
        _libpq_url(service_env), autocommit=True
    ) as watcher, ThreadPoolExecutor(1) as pool:
        locker.execute("SELECT 1 FROM charges c JOIN payments p ON p.id = c.payment_id"
                       " WHERE c.id = %s FOR UPDATE OF p", (held_charge.id,))
        held = pool.submit(httpx.post, f"{url}{REFUNDS}", timeout=30, headers=headers,
                           json={"charge_id": held_charge.id, "amount_cents": 100})
        _wait_for_lock_waiter(watcher)

        # The only process is waiting on Postgres for that request; the others go on.
        started = time.monotonic()
        other = httpx.post(f"{url}{REFUNDS}", timeout=5, headers=headers,
                           json={"charge_id": other_charge.id, "amount_cents": 100})
        assert other.status_code == 201, other.text
        assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
        assert time.monotonic() - started < 2

        # SIGTERM while the first is still in flight: it is answered, then the server exits.
        web.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert not held.done()
        locker.rollback()
        answer = held.result(timeout=10)
    assert answer.status_code == 201, answer.text
    assert web.proc.wait(15) == 0


def test_keep_alive_connections_spread_over_processes_and_metrics_add_up(
    service_env: dict[str, str], log_dir: Path, settings
) -> None:
    web, url = web_process(service_env, log_dir, workers=2)
    connections, requests_each = 16, 5
    missing = f"{REFUNDS}/rf_{'0' * 24}"
    with web:
        wait_for_http(f"{url}/healthz", proc=web.proc)
        barrier = threading.Barrier(connections)

        def use_one_connection(_: int) -> list[int]:
            with httpx.Client(base_url=url, timeout=10, headers=auth(settings)) as client:
                barrier.wait()
                return [client.get(missing).status_code for _ in range(requests_each)]

        with ThreadPoolExecutor(connections) as pool:
            statuses = [s for answer in pool.map(use_one_connection, range(connections))
                        for s in answer]
        assert statuses == [404] * connections * requests_each
        scraped = httpx.get(f"{url}/metrics", timeout=10).text
        served_by = {
            json.loads(line)["pid"] for line in web.log().splitlines()
            if line.startswith("{") and '"logger": "api.access"' in line and missing in line
        }

    # Each connection is served by one process for its whole life; the kernel spreads the
    # connections (SO_REUSEPORT), so 16 of them land on both.
    assert len(served_by) == 2, served_by
    counted = re.search(
        r'^refunds_http_requests_total\{method="GET",route="/v1/admin/refunds/<path:refund_id>",'
        r'status="404"\} (\S+)$', scraped, re.MULTILINE)
    assert counted is not None, scraped[:2000]
    assert float(counted.group(1)) == connections * requests_each


def test_when_postgres_dropped_every_pooled_connection_a_lone_request_waits_one_back_off(
    one_process, settings, db
) -> None:
    """A restart closes all of a pool's connections at once. The checkout that finds the
    first one dead tests the others there and then, instead of finding them dead one by
    one behind psycopg_pool's growing back-off (1, 2, 4 s: a 503 past the 5 s wait)."""
    _, url = one_process
    _, charge = seed_payment(db, amount=100_000)
    headers = auth(settings)
    body = {"charge_id": charge.id, "amount_cents": 100}

    def post(_: int) -> int:
        return httpx.post(f"{url}{REFUNDS}", json=body, headers=headers, timeout=10).status_code

    # Requests on one payment at once wait on its lock, each holding a connection: the
    # refund endpoint's pool grows to its full size.
    with ThreadPoolExecutor(16) as pool:
        assert set(pool.map(post, range(48))) == {201}
    assert terminate_backends(db, WEB_APPLICATION_NAME) >= 3

    started = time.monotonic()
    assert post(0) == 201
    assert time.monotonic() - started < 2.5
