"""The console's tests run a real browser against the real pipeline.

Debian's Chromium (installed here with apt-get when it is missing; never a browser
download) driven by Playwright; a Stripe emulator, a gunicorn with two processes and
a Celery worker, all on this run's Postgres database and Redis database number. No
beat runs, so a refund nobody enqueues stays where a test put it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from emulator.testing import Admin, EmulatorProcess
from shared.adapters.celery_app import REFUNDS_QUEUE
from shared.adapters.config import Settings
from shared.domain.models import Charge, Payment, RefundEvent, new_id
from tests.conftest import RUN_ID, _admin_execute
from tests.support import (
    create_database,
    free_port,
    token,
    wait_for_http,
    web_process,
    worker_process,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
# Screenshots go to a scratch folder; CONSOLE_SCREENSHOTS=docs refreshes the README's copies.
_SHOTS = os.environ.get("CONSOLE_SCREENSHOTS")
DOCS = (
    Path(__file__).resolve().parents[2] / _SHOTS
    if _SHOTS
    else Path(tempfile.gettempdir()) / f"refunds-console-shots-{os.getpid()}"
)
FLOWER_URL = "http://flower.internal.example:5555"
OPERATOR = "oncall@example.com"

#: Settings of every process of the stack (production defaults in brackets).
STACK_SETTINGS = {
    "FLOWER_URL": FLOWER_URL,  # [unset: no link]
    "STUCK_AFTER_SECONDS": "3",  # [300]
    "STUCK_ALERT_SECONDS": "3",  # [3600]
    "RETRY_BASE_SECONDS": "0.1",  # [2]
    "RETRY_MAX_SECONDS": "0.3",  # [300]
    "MAX_ATTEMPTS": "2",  # [8]
    "STRIPE_TIMEOUT_SECONDS": "2",  # [10]
    "CLAIM_LEASE_SECONDS": "15",  # [90]: a killed worker's refund waits this long
    "STRIPE_MAX_RPS": "500",  # [25]
    "APPROVAL_THRESHOLD_CENTS": "20000",  # [unset: off]; other tests refund less than this
}


def _install_chromium() -> str | None:
    """Install Debian's chromium if it is missing; the reason it cannot be, or None."""
    if CHROMIUM.exists():
        return None
    if shutil.which("apt-get") is None:
        return "no /usr/bin/chromium and no apt-get to install Debian's chromium package"
    if os.geteuid() != 0:
        return "no /usr/bin/chromium, and installing Debian's chromium package needs root"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
        done = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=900, check=False
        )
        if done.returncode != 0:
            return f"`{' '.join(argv)}` failed: {done.stderr.strip()[-300:]}"
    if not CHROMIUM.exists():
        return "apt-get installed chromium, yet /usr/bin/chromium is absent"
    return None


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    reason = _install_chromium()
    if reason is not None:
        pytest.skip(reason)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed: pip install -e '.[dev]'")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@dataclass
class Stack:
    url: str  # the gunicorn: API and console
    emulator: EmulatorProcess
    settings: Settings

    @property
    def admin(self) -> Admin:
        return self.emulator.admin

    def token(self, *, scopes: tuple[str, ...] = ("refunds:read", "refunds:write"),
              sub: str = OPERATOR, ttl: int = 3600) -> str:
        return token(self.settings, scopes=scopes, sub=sub, ttl=ttl)

    def create_refund(self, charge_id: str, amount: int, reason: str | None = None) -> str:
        """POST /v1/admin/refunds over HTTP, as a support tool would."""
        response = httpx.post(
            f"{self.url}/v1/admin/refunds",
            json={"charge_id": charge_id, "amount_cents": amount, "reason": reason},
            headers={"Authorization": f"Bearer {self.token(sub='support@example.com')}"},
            timeout=10,
        )
        assert response.status_code == 201, response.text
        return str(response.json()["refund_id"])


@pytest.fixture(scope="module")
def console_database(service_env: dict[str, str]) -> Iterator[str]:
    """A database of the console tests' own: the overview and the stuck list count every
    refund, and other modules leave refunds pending in the run's shared database."""
    name = f"refunds_test_{RUN_ID}_console"
    url = create_database(name)
    yield url
    _admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def db(console_database: str) -> Iterator[Session]:
    engine = create_engine(console_database)
    with Session(engine, expire_on_commit=False) as session:
        yield session
    engine.dispose()


@pytest.fixture(scope="module")
def stack(
    service_env: dict[str, str], console_database: str, settings: Settings, log_dir: Path
) -> Iterator[Stack]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with EmulatorProcess(
        webhook_url=f"{url}/v1/webhooks/stripe",
        webhook_secret=service_env["STRIPE_WEBHOOK_SECRET"],
        pending_refund_delay=1.0,
        failing_refund_delay=1.0,
    ) as emulator:
        env = {**service_env, **STACK_SETTINGS, "STRIPE_API_BASE": emulator.url,
               "DATABASE_URL": console_database}
        # Start from an empty queue: tasks earlier modules' API calls left in this run's
        # Redis would be worked here, against an emulator that never saw their charges.
        redis.Redis.from_url(service_env["REDIS_URL"]).delete(REFUNDS_QUEUE)
        web, _ = web_process(env, log_dir, workers=2, port=port)
        worker = worker_process(env, log_dir, name="console-worker", concurrency=2)
        with web, worker:
            wait_for_http(f"{url}/healthz", proc=web.proc)
            yield Stack(url=url, emulator=emulator, settings=settings)


def seed_charge(stack: Stack, db: Session, *, amount: int = 5_000,
                payment_method: str = "pm_card_visa") -> str:
    """A succeeded payment at the emulator, stored as `refunds payments sync` would."""
    seeded = stack.admin.seed(1, amount=amount, payment_method=payment_method)
    payment = Payment(id=new_id("pay"), stripe_payment_intent_id=seeded["payment_intents"][0],
                      amount=amount, currency="usd", status="succeeded")
    db.add(payment)
    db.flush()
    charge_id = str(seeded["charges"][0])
    db.add(Charge(id=charge_id, payment_id=payment.id, amount=amount, currency="usd",
                  status="succeeded"))
    db.commit()
    return charge_id


def sign_in(page: Any, stack: Stack, bearer: str, path: str = "/console/") -> Any:
    """Open a console page, get sent to the sign-in form, paste the token; the response."""
    page.goto(f"{stack.url}{path}")
    assert "/console/login" in page.url
    page.fill("#token", bearer)
    with page.expect_response(lambda r: r.request.method == "POST") as answer:
        page.click("form[action='/console/login'] button[type=submit]")
    page.wait_for_load_state()
    return answer.value


def events_of(db: Session, refund_id: str) -> list[RefundEvent]:
    db.expire_all()
    return list(db.scalars(
        select(RefundEvent).where(RefundEvent.refund_id == refund_id).order_by(RefundEvent.id)
    ))


def wait_until(check: Callable[[], Any], *, timeout: float, what: str) -> Any:
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, "no CSRF field on the page"
    return found.group(1)
