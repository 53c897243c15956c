"""Stripe's asynchronous refund test cards, the events they cause, and signed webhook delivery."""

from __future__ import annotations

import pytest
import stripe

from emulator.testing import EmulatorProcess
from tests.emulator.helpers import Receiver, pay, wait_for


def event_types(client: stripe.StripeClient, **params: object) -> list[str]:
    listed = client.v1.events.list(params={"limit": 100, **params})  # type: ignore[arg-type]
    return [e.type for e in reversed(listed.data)]


def test_pending_refund_card_goes_pending_then_succeeded(client: stripe.StripeClient) -> None:
    pi = pay(client, 4000, "pm_card_pendingRefund")
    refund = client.v1.refunds.create(params={"payment_intent": pi.id, "amount": 1500})
    assert refund.status == "pending"
    # A pending refund already counts against what is left.
    assert client.v1.charges.retrieve(pi.latest_charge).amount_refunded == 1500
    wait_for(lambda: client.v1.refunds.retrieve(refund.id).status == "succeeded")
    assert event_types(client, type="refund.*") == ["refund.created", "refund.updated"]
    updated = client.v1.events.list(params={"type": "charge.refund.updated"}).data[0]
    assert updated.data.object.status == "succeeded"
    assert updated.data.previous_attributes.status == "pending"


def test_refund_fail_card_succeeds_then_fails_and_gives_the_amount_back(
    client: stripe.StripeClient,
) -> None:
    pi = pay(client, 4000, "pm_card_refundFail")
    refund = client.v1.refunds.create(params={"payment_intent": pi.id})
    assert refund.status == "succeeded"
    assert client.v1.charges.retrieve(pi.latest_charge).refunded is True
    failed = wait_for(lambda: (r := client.v1.refunds.retrieve(refund.id)).status == "failed" and r)
    assert failed.failure_reason == "expired_or_canceled_card"
    charge = client.v1.charges.retrieve(pi.latest_charge)
    assert (charge.amount_refunded, charge.refunded) == (0, False)
    types = event_types(client)
    assert {"refund.failed", "refund.updated", "charge.refund.updated"} <= set(types)
    # The money is refundable again.
    assert client.v1.refunds.create(params={"charge": charge.id, "amount": 4000}).amount == 4000


def test_admin_moves_refunds_on(client: stripe.StripeClient, emu: EmulatorProcess) -> None:
    emu.admin.config(pending_refund_delay=60)
    pending = client.v1.refunds.create(
        params={"payment_intent": pay(client, 1000, "pm_card_pendingRefund").id}
    )
    assert emu.admin.succeed_refund(pending.id)["status"] == "succeeded"
    normal = client.v1.refunds.create(params={"payment_intent": pay(client, 1000).id})
    failed = emu.admin.fail_refund(normal.id, "lost_or_stolen_card")
    assert (failed["status"], failed["failure_reason"]) == ("failed", "lost_or_stolen_card")
    assert emu.admin.stats()["refunds_by_status"] == {"succeeded": 1, "failed": 1}


def test_events_page_and_filter(client: stripe.StripeClient) -> None:
    for _ in range(4):
        pay(client)
    succeeded = client.v1.events.list(params={"type": "payment_intent.succeeded", "limit": 3})
    assert len(succeeded.data) == 3 and succeeded.has_more
    assert len(list(succeeded.auto_paging_iter())) == 4
    one = client.v1.events.retrieve(succeeded.data[0].id)
    assert one.type == "payment_intent.succeeded"
    assert one.data.object.object == "payment_intent"
    several = client.v1.events.list(
        params={"types": ["charge.succeeded", "payment_intent.created"], "limit": 100}
    )
    assert {e.type for e in several.data} == {"charge.succeeded", "payment_intent.created"}
    assert len(several.data) == 8


def test_webhooks_are_signed_so_construct_event_verifies_them(
    client: stripe.StripeClient, emu: EmulatorProcess, receiver: Receiver
) -> None:
    emu.admin.config(webhook_url=receiver.url, webhook_secret="whsec_test_secret")
    pi = pay(client, 1000, "pm_card_refundFail")
    client.v1.refunds.create(params={"payment_intent": pi.id, "metadata": {"refund_id": "r_hook"}})
    wanted = {
        "payment_intent.succeeded",
        "charge.succeeded",
        "refund.created",
        "charge.refunded",
        "refund.failed",
    }
    wait_for(lambda: wanted <= {e["type"] for e in receiver.events()})
    for delivery in receiver.deliveries:
        event = stripe.Webhook.construct_event(
            delivery["body"], delivery["headers"]["Stripe-Signature"], "whsec_test_secret"
        )
        assert event.object == "event"
        with pytest.raises(stripe.SignatureVerificationError):
            stripe.Webhook.construct_event(
                delivery["body"], delivery["headers"]["Stripe-Signature"], "whsec_other"
            )
    failed = next(e for e in receiver.events() if e["type"] == "refund.failed")
    assert failed["data"]["object"]["metadata"] == {"refund_id": "r_hook"}
    assert failed["data"]["previous_attributes"]["status"] == "succeeded"
    created = next(e for e in receiver.events() if e["type"] == "refund.created")
    assert created["request"]["id"].startswith("req_")
    assert created["request"]["idempotency_key"]  # the SDK sends one on every POST
    wait_for(lambda: emu.admin.stats()["webhooks"]["pending"] == 0)
    assert emu.admin.stats()["webhooks"]["delivered"] == len(receiver.deliveries)


def test_failed_deliveries_are_retried_with_backoff(
    client: stripe.StripeClient, emu: EmulatorProcess, receiver: Receiver
) -> None:
    emu.admin.config(webhook_url=receiver.url, webhook_retry_base=0.05)
    receiver.statuses = [500, 503]
    client.v1.payment_intents.create(params={"amount": 100, "currency": "usd"})
    wait_for(lambda: emu.admin.stats()["webhooks"]["delivered"] == 1)
    attempts = receiver.events()
    assert [e["type"] for e in attempts] == ["payment_intent.created"] * 3
    assert len({e["id"] for e in attempts}) == 1
    stats = emu.admin.stats()["webhooks"]
    assert (stats["failed_attempts"], stats["gave_up"]) == (2, 0)
    log = emu.admin.webhook_deliveries()["deliveries"]
    assert [(d["attempt"], d["status"], d["ok"]) for d in log] == [
        (1, 500, False),
        (2, 503, False),
        (3, 200, True),
    ]


def test_unreachable_webhook_endpoint_gives_up_without_blocking_the_api(
    client: stripe.StripeClient, emu: EmulatorProcess
) -> None:
    emu.admin.config(
        webhook_url="http://127.0.0.1:9/nowhere", webhook_retry_base=0.01, webhook_max_attempts=3
    )
    pay(client)
    wait_for(lambda: emu.admin.stats()["webhooks"]["gave_up"] == 3)  # 3 events, 3 attempts each
    assert emu.admin.stats()["webhooks"]["failed_attempts"] == 9
