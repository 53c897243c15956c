"""The admin API, seeding speed, and the process life cycle."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import stripe

from emulator.testing import EmulatorError, EmulatorProcess
from tests.emulator.helpers import pay


def test_seed_creates_twenty_thousand_payments_fast(
    client: stripe.StripeClient, emu: EmulatorProcess
) -> None:
    started = time.perf_counter()
    seeded = emu.admin.seed(20_000, amount=1500, metadata={"batch": "bench"})
    elapsed = time.perf_counter() - started
    assert elapsed < 3.0
    assert seeded["count"] == 20_000
    assert len(seeded["payment_intents"]) == len(seeded["charges"]) == 20_000
    assert len(set(seeded["charges"])) == 20_000
    pi = client.v1.payment_intents.retrieve(seeded["payment_intents"][-1])
    assert (pi.status, pi.amount_received, pi.latest_charge) == (
        "succeeded",
        1500,
        seeded["charges"][-1],
    )
    assert pi.metadata["batch"] == "bench"
    charge = client.v1.charges.retrieve(seeded["charges"][0])
    assert (charge.status, charge.amount_captured, charge.payment_intent) == (
        "succeeded",
        1500,
        seeded["payment_intents"][0],
    )
    refund = client.v1.refunds.create(params={"charge": seeded["charges"][123], "amount": 500})
    assert refund.status == "succeeded"
    stats = emu.admin.stats()
    assert (stats["payment_intents"], stats["charges"], stats["events"]) == (
        20_000,
        20_000,
        1 + 1,
    )  # refund + charge.refunded
    # Lists still page by index, not by scanning.
    page = client.v1.payment_intents.list(
        params={"limit": 100, "starting_after": seeded["payment_intents"][10_000]}
    )
    assert [p.id for p in page.data] == seeded["payment_intents"][9_900:10_000][::-1]


def test_seed_with_a_test_card_and_events(
    client: stripe.StripeClient, emu: EmulatorProcess
) -> None:
    seeded = emu.admin.seed(2, payment_method="pm_card_pendingRefund", events=True)
    assert client.v1.refunds.create(params={"charge": seeded["charges"][0]}).status == "pending"
    assert len(client.v1.events.list(params={"type": "payment_intent.succeeded"}).data) == 2
    with pytest.raises(EmulatorError):
        emu.admin.seed(1, payment_method="pm_card_chargeDeclined")
    with pytest.raises(EmulatorError):
        emu.admin.seed(-1)


def test_stats_count_requests_by_route(client: stripe.StripeClient, emu: EmulatorProcess) -> None:
    pi = pay(client)
    client.v1.payment_intents.retrieve(pi.id)
    client.v1.refunds.create(params={"payment_intent": pi.id})
    stats = emu.admin.stats()
    assert stats["requests"] == {
        "POST /v1/payment_intents": 1,
        "GET /v1/payment_intents/{id}": 1,
        "POST /v1/refunds": 1,
    }
    assert stats["requests_total"] == 3
    assert stats["responses"] == {"200": 3}
    assert emu.admin.reset_stats()["requests_total"] == 0
    assert emu.admin.stats()["refunds"] == 1  # objects survive a stats reset


def test_reset_wipes_objects_but_keeps_config(
    client: stripe.StripeClient, emu: EmulatorProcess
) -> None:
    emu.admin.config(pending_refund_delay=7)
    pi = pay(client)
    emu.admin.faults(latency_ms=1)
    emu.admin.reset()
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.payment_intents.retrieve(pi.id)
    assert emu.admin.get_faults()["latency_ms"] == 0
    assert emu.admin.stats()["events"] == 0
    assert emu.admin.get_config()["pending_refund_delay"] == 7


def test_config_is_validated(emu: EmulatorProcess) -> None:
    for bad in (
        {"webhook_url": "ftp://x"},
        {"pending_refund_delay": -1},
        {"nope": 1},
        {"webhook_secret": ""},
    ):
        with pytest.raises(EmulatorError):
            emu.admin.config(**bad)
    with pytest.raises(EmulatorError):
        emu.admin.request("GET", "no-such-thing")


def test_process_prints_its_port_and_exits_cleanly_on_sigterm_and_sigint() -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        proc = subprocess.Popen(
            [sys.executable, "-m", "emulator", "--port", "0"], stdout=subprocess.PIPE, text=True
        )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.startswith("stripe emulator listening on http://127.0.0.1:")
            assert int(line.rsplit(":", 1)[1]) > 0
            proc.send_signal(sig)
            assert proc.wait(timeout=5) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


def test_emulator_process_context_manager_stops_the_process() -> None:
    with EmulatorProcess(webhook_secret="whsec_x") as emu:
        assert emu.admin.get_config()["webhook_secret"] == "whsec_x"
        process = emu.process
        assert process is not None and process.poll() is None
    assert process.returncode == 0
