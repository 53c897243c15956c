"""The Procfile run as production runs it: honcho starts web, worker, beat and flower
(with the Stripe emulator beside them); a refund goes through over HTTP and is then
found in Flower, in /metrics and in the JSON logs; the stack stops cleanly.

The tests in this module run in order on one stack; the last ones stop it and read
everything it logged.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from emulator.testing import EmulatorProcess
from shared.adapters.config import Settings
from tests.support import BIN, ROOT, auth, free_port

FLOWER_LOGIN = ("ops", "stack-flower-password-7")
# Sent as X-Request-Id, which is echoed back and logged: the logs must mask the secret part.
LEAKY_REQUEST_IDS = {
    "sk_live_stackLeak0123456789": "stackLeak0123456789",
    "card 4242 4242 4242 4242": "4242 4242 4242 4242",
    "whsec_hookLeak0123456789": "hookLeak0123456789",
    "Bearer bearerLeak0123456789": "bearerLeak0123456789",
    "see https://ops:pw-leak-0123@example.com": "pw-leak-0123",
}
SERVICES = ("web", "worker", "beat", "flower")
LINE = re.compile(r"^\d\d:\d\d:\d\d (?P<name>[\w.]+)\s*\| (?P<text>.*)$")


@dataclass
class Stack:
    env: dict[str, str]
    web: str
    flower: str
    worker_metrics: str
    emulator: EmulatorProcess
    honcho: subprocess.Popen[bytes]
    log_path: Path
    refund_id: str = ""
    bearer: str = ""
    returncode: int | None = None
    facts: dict[str, object] = field(default_factory=dict)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.returncode is None:
            self.honcho.send_signal(signal.SIGTERM)
            self.returncode = self.honcho.wait(40)
        return self.returncode


def _wait(
    url: str,
    stack_proc: subprocess.Popen[bytes],
    log: Path,
    *,
    status: int | None = None,
    timeout: float = 60.0,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stack_proc.poll() is not None:
            pytest.fail(
                f"honcho exited ({stack_proc.returncode}) before {url} answered:\n"
                + log.read_text(errors="replace")[-4000:]
            )
        try:
            response = httpx.get(url, timeout=2)
            if status is None or response.status_code == status:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    pytest.fail(f"{url} did not answer in {timeout}s:\n" + log.read_text(errors="replace")[-4000:])


@pytest.fixture(scope="module")
def stack(ops_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("stack")
    web_port, flower_port, metrics_port = free_port(), free_port(), free_port()
    webhook = f"http://127.0.0.1:{web_port}/v1/webhooks/stripe"
    with EmulatorProcess(
        webhook_url=webhook, webhook_secret=ops_env["STRIPE_WEBHOOK_SECRET"]
    ) as emu:
        env = {
            **ops_env,
            "PORT": str(web_port),
            "FLOWER_PORT": str(flower_port),
            "FLOWER_ADDRESS": "127.0.0.1",
            "FLOWER_BASIC_AUTH": ":".join(FLOWER_LOGIN),
            "WORKER_METRICS_PORT": str(metrics_port),
            "STRIPE_API_BASE": emu.url,
            "WEB_CONCURRENCY": "2",
            "WEB_CONNECTIONS": "50",
            "WORKER_CONCURRENCY": "2",
        }
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        empty_env_file = tmp / "empty.env"
        empty_env_file.write_text("")
        log_path = tmp / "honcho.log"
        with log_path.open("wb") as log:
            honcho = subprocess.Popen(
                [
                    str(BIN / "honcho"),
                    "start",
                    "--no-colour",
                    "-f",
                    str(ROOT / "Procfile"),
                    "-d",
                    str(ROOT),
                    "-e",
                    str(empty_env_file),
                    *SERVICES,
                ],
                env=env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        stack = Stack(
            env=env,
            web=f"http://127.0.0.1:{web_port}",
            flower=f"http://127.0.0.1:{flower_port}",
            worker_metrics=f"http://127.0.0.1:{metrics_port}/metrics",
            emulator=emu,
            honcho=honcho,
            log_path=log_path,
        )
        try:
            _wait(f"{stack.web}/readyz", honcho, log_path, status=200)
            _wait(f"{stack.flower}/healthcheck", honcho, log_path, status=200)
            _wait(stack.worker_metrics, honcho, log_path, status=200)
            yield stack
        finally:
            if stack.returncode is None and honcho.poll() is None:
                os.killpg(honcho.pid, signal.SIGKILL)
                honcho.wait(10)


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of one Prometheus sample (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}", 1)[0])) if "{" in line else {}
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_refund_over_http_succeeds_through_the_procfile_processes(
    stack: Stack, settings: Settings
) -> None:
    seeded = stack.emulator.admin.seed(1, amount=4200)
    sync = subprocess.run(
        [str(BIN / "refunds"), "payments", "sync"],
        env=stack.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(sync.stdout)["charges"]["inserted"] >= 1
    headers = auth(settings)
    stack.bearer = headers["Authorization"].split(" ", 1)[1]
    created = httpx.post(
        f"{stack.web}/v1/admin/refunds",
        headers=headers,
        json={"charge_id": seeded["charges"][0], "amount_cents": 1200},
        timeout=10,
    )
    assert created.status_code == 201, created.text
    stack.refund_id = created.json()["refund_id"]

    deadline = time.monotonic() + 20
    body: dict[str, object] = {}
    while time.monotonic() < deadline:
        body = httpx.get(
            f"{stack.web}/v1/admin/refunds/{stack.refund_id}", headers=headers, timeout=5
        ).json()
        if body["status"] == "succeeded":
            break
        time.sleep(0.1)
    assert body["status"] == "succeeded", body
    assert stack.emulator.admin.refunds(metadata_refund_id=stack.refund_id)[0]["amount"] == 1200


def test_flower_lists_the_refund_task_with_only_its_id_and_needs_the_login(stack: Stack) -> None:
    assert stack.refund_id, "needs the refund of the first test"
    deadline = time.monotonic() + 15
    mine: list[dict[str, object]] = []
    while time.monotonic() < deadline and not mine:
        response = httpx.get(f"{stack.flower}/api/tasks", auth=FLOWER_LOGIN, timeout=5)
        assert response.status_code == 200, response.text
        mine = [
            t
            for t in response.json().values()
            if t["name"] == "refunds.process" and stack.refund_id in str(t["args"])
        ]
        time.sleep(0.2)
    assert mine, "Flower never showed the refund's task"
    assert mine[0]["args"] == repr([stack.refund_id])
    assert mine[0]["kwargs"] == "{}"
    assert mine[0]["state"] == "SUCCESS"

    assert httpx.get(f"{stack.flower}/api/tasks", timeout=5).status_code == 401
    wrong = (FLOWER_LOGIN[0], "not-the-password")
    assert httpx.get(f"{stack.flower}/api/tasks", auth=wrong, timeout=5).status_code == 401
    assert httpx.get(f"{stack.flower}/", timeout=5).status_code == 401


def test_metrics_show_the_refund_from_web_and_worker(stack: Stack) -> None:
    web = httpx.get(f"{stack.web}/metrics", timeout=10)
    assert web.status_code == 200
    assert web.headers["content-type"].startswith("text/plain")
    text = web.text
    assert _sample(text, "refunds_initiations_total", outcome="created") >= 1
    assert (
        _sample(
            text,
            "refunds_http_requests_total",
            method="POST",
            route="/v1/admin/refunds",
            status="201",
        )
        >= 1
    )
    assert _sample(text, "refunds_tasks_published_total", task="refunds.process") >= 1
    assert _sample(text, "refunds_db_metrics_up") == 1
    assert _sample(text, "refunds_updated_last_24h", status="succeeded") >= 1
    assert _sample(text, "refunds_open", status="pending") == 0
    assert "refunds_oldest_open_age_seconds{" in text

    worker = httpx.get(stack.worker_metrics, timeout=10).text
    assert (
        _sample(worker, "refunds_worker_tasks_total", task="refunds.process", result="succeeded")
        >= 1
    )
    assert (
        _sample(
            worker,
            "refunds_stripe_request_duration_seconds_count",
            method="POST",
            endpoint="/v1/refunds",
            status="200",
        )
        >= 1
    )
    assert _sample(worker, "refunds_processed_total") >= 1
    assert _sample(worker, "refunds_stripe_budget_wait_seconds_count") >= 1


def test_metrics_add_up_every_gunicorn_worker_process(stack: Stack, settings: Settings) -> None:
    headers = auth(settings)
    missing = "rf_doesnotexist000000000000"
    n = 40

    def get(_: int) -> int:
        with httpx.Client(timeout=10) as client:  # a new connection each time
            return client.get(
                f"{stack.web}/v1/admin/refunds/{missing}", headers=headers
            ).status_code

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(get, range(n))) == {404}
    route = "/v1/admin/refunds/<path:refund_id>"
    # Each scrape is answered by whichever process accepts it; all must give the sum.
    seen = {
        _sample(
            httpx.get(f"{stack.web}/metrics", timeout=10).text,
            "refunds_http_requests_total",
            method="GET",
            route=route,
            status="404",
        )
        for _ in range(6)
    }
    assert seen == {float(n)}


def test_logs_mask_secrets_sent_in_request_ids(stack: Stack) -> None:
    for request_id in LEAKY_REQUEST_IDS:
        response = httpx.get(
            f"{stack.web}/v1/admin/refunds", headers={"X-Request-Id": request_id}, timeout=5
        )
        assert response.status_code == 401
        assert response.headers["X-Request-Id"] == request_id


def test_worker_health_sees_the_stack_worker(stack: Stack) -> None:
    result = subprocess.run(
        [str(BIN / "refunds"), "worker-health", "--this-host", "--timeout", "3"],
        env=stack.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "worker.1@" in result.stdout


def test_honcho_stops_every_process_cleanly(stack: Stack) -> None:
    started = time.monotonic()
    stack.stop()
    assert time.monotonic() - started < 30
    output = stack.output()
    for name in SERVICES:
        assert f"{name}.1 stopped (rc=0)" in output, output[-3000:]
    for url in (f"{stack.web}/healthz", f"{stack.flower}/healthcheck", stack.worker_metrics):
        with pytest.raises(httpx.TransportError):
            httpx.get(url, timeout=2)


def _records(output: str) -> list[tuple[str, dict[str, object]]]:
    records = []
    for line in output.splitlines():
        match = LINE.match(line)
        if match and match.group("text").startswith("{"):
            records.append((match.group("name"), json.loads(match.group("text"))))
    return records


def test_every_process_logs_json_lines_with_request_refund_and_task_ids(stack: Stack) -> None:
    assert stack.returncode is not None, "runs after the stack has stopped"
    records = _records(stack.output())
    by_process = {name.split(".")[0] for name, _ in records}
    assert by_process >= set(SERVICES)
    for _, record in records:
        assert {"time", "level", "logger", "message", "process_type"} <= record.keys()

    web_lines = [r for n, r in records if n == "web.1" and r.get("refund_id") == stack.refund_id]
    assert any(
        r.get("route") == "/v1/admin/refunds" and r.get("status") == 201 and r.get("request_id")
        for r in web_lines
    ), web_lines
    worker_lines = [
        r for n, r in records if n == "worker.1" and r.get("refund_id") == stack.refund_id
    ]
    assert worker_lines and all(r.get("task_id") for r in worker_lines), worker_lines


def test_no_token_secret_or_card_number_reaches_the_logs(stack: Stack) -> None:
    assert stack.returncode is not None, "runs after the stack has stopped"
    output = stack.output()
    secrets = {
        "bearer token": stack.bearer,
        "JWT_SECRET": stack.env["JWT_SECRET"],
        "STRIPE_API_KEY": stack.env["STRIPE_API_KEY"],
        "STRIPE_WEBHOOK_SECRET": stack.env["STRIPE_WEBHOOK_SECRET"],
        "Flower password": FLOWER_LOGIN[1],
        **{f"request id {rid!r}": part for rid, part in LEAKY_REQUEST_IDS.items()},
    }
    leaked = [name for name, value in secrets.items() if value and value in output]
    assert not leaked, f"in the logs: {leaked}"
    assert not re.search(r"eyJ[\w-]{10,}\.eyJ[\w-]{10,}\.", output), "a JWT in the logs"
    # The leaky request ids did reach the logs, masked: the redaction ran, not luck.
    masked = [r for _, r in _records(output) if "REDACTED" in str(r.get("request_id", ""))]
    assert len(masked) >= len(LEAKY_REQUEST_IDS)
