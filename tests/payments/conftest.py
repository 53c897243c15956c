"""A Stripe emulator and a gunicorn pointed at each other, for this package's tests.

The emulator signs its webhooks with the service's STRIPE_WEBHOOK_SECRET and POSTs
them to this gunicorn's /v1/webhooks/stripe; the gunicorn (and ``refunds payments
sync``) reach Stripe through STRIPE_API_BASE = the emulator.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import stripe

from tests.support import ServiceProcess, free_port, wait_for_http, web_process


@dataclass(frozen=True)
class Stack:
    env: dict[str, str]  # what the service's processes see
    api_url: str
    emulator_url: str
    webhook_secret: str

    def stripe(self) -> stripe.StripeClient:
        """The official SDK, talking to the emulator as the service does."""
        return stripe.StripeClient(
            self.env["STRIPE_API_KEY"],
            base_addresses={"api": self.emulator_url},
            http_client=stripe.RequestsClient(timeout=10),
        )

    def admin(self, method: str, path: str, json: object = None) -> dict:
        url = f"{self.emulator_url}/_emulator{path}"
        response = httpx.request(method, url, json=json, timeout=30)
        response.raise_for_status()
        return response.json()


@pytest.fixture(scope="module")
def stack(service_env: dict[str, str], log_dir: Path) -> Iterator[Stack]:
    emulator_port = free_port()
    emulator_url = f"http://127.0.0.1:{emulator_port}"
    env = {**service_env, "STRIPE_API_BASE": emulator_url}
    web, api_url = web_process(env, log_dir, workers=2)
    secret = env["STRIPE_WEBHOOK_SECRET"]
    emulator = ServiceProcess(
        "emulator",
        [
            sys.executable, "-m", "emulator", "--port", str(emulator_port),
            "--webhook-url", f"{api_url}/v1/webhooks/stripe", "--webhook-secret", secret,
        ],
        env,
        log_dir,
    )
    with web, emulator:
        wait_for_http(f"{api_url}/healthz", proc=web.proc)
        wait_for_http(f"{emulator_url}/_emulator/health", proc=emulator.proc)
        yield Stack(env=env, api_url=api_url, emulator_url=emulator_url, webhook_secret=secret)
        emulator.stop()
        # Everything is committed by now: SIGQUIT is gunicorn's quick shutdown, which
        # spares the module the graceful timeout.
        if web.proc is not None and web.proc.poll() is None:
            os.killpg(web.proc.pid, signal.SIGQUIT)
