"""One emulator process for the emulator's own tests, wiped before each test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import stripe

from emulator.testing import EmulatorProcess
from tests.emulator.helpers import Receiver

# Short so the asynchronous test cards settle quickly.
REFUND_DELAY = 0.3


@pytest.fixture(scope="session")
def emu() -> Iterator[EmulatorProcess]:
    with EmulatorProcess(
        pending_refund_delay=REFUND_DELAY, failing_refund_delay=REFUND_DELAY
    ) as process:
        yield process


@pytest.fixture(autouse=True)
def _clean(emu: EmulatorProcess) -> Iterator[None]:
    emu.admin.reset()
    yield
    emu.admin.reset()
    emu.admin.config(
        webhook_url=None,
        webhook_secret="whsec_local",
        pending_refund_delay=REFUND_DELAY,
        failing_refund_delay=REFUND_DELAY,
        idempotency_ttl=86400,
        webhook_retry_base=0.5,
        webhook_max_attempts=5,
    )


@pytest.fixture
def client(emu: EmulatorProcess) -> stripe.StripeClient:
    return emu.client("sk_test_emulator_tests")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()
