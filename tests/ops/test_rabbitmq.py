"""The same code over RabbitMQ (CELERY_BROKER_URL=amqp://...): a refund end to end, its
message durable and persistent while no worker runs.

The test gets a RabbitMQ virtual host of its own, so concurrent runs never share a queue.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from emulator.testing import EmulatorProcess
from shared.adapters.config import Settings
from tests.support import auth, wait_for_http, web_process, worker_process

RABBIT = ("127.0.0.1", 5672)


def _rabbitmqctl(*args: str) -> str:
    binary = shutil.which("rabbitmqctl")
    assert binary is not None
    result = subprocess.run(
        [binary, "-q", *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def vhost() -> Iterator[str]:
    with socket.socket() as s:
        s.settimeout(1)
        if s.connect_ex(RABBIT) != 0:
            pytest.skip("RabbitMQ is not running on 127.0.0.1:5672")
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is not installed; it creates the test's own virtual host")
    name = f"refunds_test_{uuid.uuid4().hex[:10]}"
    _rabbitmqctl("add_vhost", name)
    _rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    yield name
    _rabbitmqctl("delete_vhost", name)


def _queue(vhost: str, name: str) -> dict[str, str]:
    out = _rabbitmqctl(
        "list_queues",
        "-p",
        vhost,
        "--no-table-headers",
        "name",
        "durable",
        "messages",
        "messages_persistent",
    )
    for line in out.splitlines():
        fields = line.split()
        if fields and fields[0] == name:
            return dict(
                zip(("name", "durable", "messages", "messages_persistent"), fields, strict=True)
            )
    return {}


def test_a_refund_goes_end_to_end_over_rabbitmq_with_durable_persistent_messages(
    ops_env: dict[str, str], vhost: str, settings: Settings, log_dir: Path
) -> None:
    with EmulatorProcess() as emulator:
        env = {
            **ops_env,
            "CELERY_BROKER_URL": f"amqp://guest:guest@127.0.0.1:5672/{vhost}",
            "STRIPE_API_BASE": emulator.url,
            "WORKER_METRICS_PORT": "0",
        }
        seeded = emulator.admin.seed(1, amount=3000)
        subprocess.run(
            ["refunds", "payments", "sync"], env=env, check=True, capture_output=True, timeout=60
        )
        web, url = web_process(env, log_dir, workers=1)
        with web:
            wait_for_http(f"{url}/healthz", proc=web.proc)
            ready = httpx.get(f"{url}/readyz", timeout=15)
            assert ready.status_code == 200, ready.text

            headers = auth(settings)
            created = httpx.post(
                f"{url}/v1/admin/refunds",
                headers=headers,
                timeout=15,
                json={"charge_id": seeded["charges"][0], "amount_cents": 700},
            )
            assert created.status_code == 201, created.text
            refund_id = created.json()["refund_id"]

            # No worker yet: the task waits in a durable queue as a persistent message,
            # so a broker restart would not lose it.
            queue = _queue(vhost, "refunds")
            assert queue == {
                "name": "refunds",
                "durable": "true",
                "messages": "1",
                "messages_persistent": "1",
            }

            worker = worker_process(env, log_dir, name="rabbit")
            with worker:
                deadline = time.monotonic() + 30
                status = "pending"
                while status != "succeeded":
                    assert time.monotonic() < deadline, worker.log()[-3000:]
                    time.sleep(0.2)
                    status = httpx.get(
                        f"{url}/v1/admin/refunds/{refund_id}", headers=headers, timeout=10
                    ).json()["status"]
            assert worker.proc is not None and worker.proc.returncode == 0
        assert emulator.admin.refunds(metadata_refund_id=refund_id)[0]["amount"] == 700
        assert _queue(vhost, "refunds")["messages"] == "0"
