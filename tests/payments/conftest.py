"""A Stripe emulator and a gunicorn pointed at each other, for this package's tests.

The emulator signs its webhooks with the service's STRIPE_WEBHOOK_SECRET and POSTs
them to this gunicorn's /v1/webhooks/stripe; the gunicorn (and ``refunds payments
sync``) reach Stripe through STRIPE_API_BASE = the emulator.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import stripe

from emulator.testing import Admin, EmulatorProcess
from tests.support import wait_for_http, web_process, worker_process


@dataclass(frozen=True)
class Stack:
    env: dict[str, str]  # what the service's processes see
    api_url: str
    emulator: EmulatorProcess
    webhook_secret: str

    @property
    def admin(self) -> Admin:
        return self.emulator.admin

    @property
    def webhook_url(self) -> str:
        return f"{self.api_url}/v1/webhooks/stripe"

    def stripe(self) -> stripe.StripeClient:
        """The official SDK, talking to the emulator as the service does."""
        return self.emulator.client(
            self.env["STRIPE_API_KEY"], http_client=stripe.RequestsClient(timeout=10)
        )


@pytest.fixture(scope="module")
def stack(service_env: dict[str, str], log_dir: Path) -> Iterator[Stack]:
    secret = service_env["STRIPE_WEBHOOK_SECRET"]
    with EmulatorProcess(webhook_secret=secret, env=service_env) as emulator:
        env = {**service_env, "STRIPE_API_BASE": emulator.url}
        web, api_url = web_process(env, log_dir, workers=2)
        # Refund events and snapshots that need Stripe are applied by a worker (SPEC 3.3).
        worker = worker_process({**env, "RETRY_BASE_SECONDS": "0.2", "RETRY_MAX_SECONDS": "1"},
                                log_dir, name="worker-payments", concurrency=4)
        with web, worker:
            wait_for_http(f"{api_url}/healthz", proc=web.proc)
            stack = Stack(env=env, api_url=api_url, emulator=emulator, webhook_secret=secret)
            emulator.admin.config(webhook_url=stack.webhook_url)
            yield stack
            emulator.admin.config(webhook_url=None)
            # Everything is committed by now: SIGQUIT is gunicorn's quick shutdown, which
            # spares the module the graceful timeout.
            if web.proc is not None and web.proc.poll() is None:
                os.killpg(web.proc.pid, signal.SIGQUIT)
