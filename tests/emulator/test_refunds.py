"""Refunds: Stripe's amount checks and error codes, charge bookkeeping, lists and the admin view."""

from __future__ import annotations

import pytest
import stripe

from emulator.testing import EmulatorProcess
from tests.emulator.helpers import pay


def refund_error(client: stripe.StripeClient, **params: object) -> stripe.InvalidRequestError:
    with pytest.raises(stripe.InvalidRequestError) as excinfo:
        client.v1.refunds.create(params=params)  # type: ignore[arg-type]
    return excinfo.value


def test_full_refund_by_payment_intent_refunds_what_is_left(client: stripe.StripeClient) -> None:
    pi = pay(client, 5000)
    refund = client.v1.refunds.create(
        params={"payment_intent": pi.id, "metadata": {"refund_id": "r_full"}}
    )
    assert refund.object == "refund"
    assert refund.amount == 5000
    assert refund.status == "succeeded"
    assert refund.charge == pi.latest_charge
    assert refund.payment_intent == pi.id
    assert refund.metadata["refund_id"] == "r_full"
    charge = client.v1.charges.retrieve(pi.latest_charge)
    assert charge.amount_refunded == 5000
    assert charge.refunded is True
    assert refund_error(client, charge=pi.latest_charge).code == "charge_already_refunded"


def test_partial_refunds_add_up_and_over_refund_is_amount_too_large(
    client: stripe.StripeClient,
) -> None:
    pi = pay(client, 1000)
    client.v1.refunds.create(
        params={"charge": pi.latest_charge, "amount": 300, "reason": "requested_by_customer"}
    )
    err = refund_error(client, charge=pi.latest_charge, amount=701)
    assert err.http_status == 400
    assert err.code == "amount_too_large"
    assert err.param == "amount"
    assert "($7.00)" in str(err.user_message)
    last = client.v1.refunds.create(params={"charge": pi.latest_charge})
    assert last.amount == 700
    charge = client.v1.charges.retrieve(pi.latest_charge)
    assert (charge.amount_refunded, charge.refunded) == (1000, True)
    types = [e.type for e in client.v1.events.list(params={"limit": 100}).data]
    assert types.count("refund.created") == 2
    assert types.count("charge.refunded") == 2


@pytest.mark.parametrize("amount", [0, -5, "12.5", "abc"])
def test_amount_must_be_a_positive_integer(client: stripe.StripeClient, amount: object) -> None:
    pi = pay(client)
    err = refund_error(client, charge=pi.latest_charge, amount=amount)
    assert err.code == "parameter_invalid_integer"
    assert err.param == "amount"


def test_charge_or_payment_intent_exactly_one(client: stripe.StripeClient) -> None:
    pi = pay(client)
    assert refund_error(client, amount=100).code == "parameter_missing"
    assert (
        refund_error(client, charge=pi.latest_charge, payment_intent=pi.id).code
        == "parameters_exclusive"
    )


def test_unknown_reason_is_refused(client: stripe.StripeClient) -> None:
    err = refund_error(client, charge=pay(client).latest_charge, reason="changed_mind")
    assert err.http_status == 400
    assert err.param == "reason"
    assert "duplicate, fraudulent, or requested_by_customer" in str(err.user_message)


def test_unknown_charge_or_payment_intent_is_404_resource_missing(
    client: stripe.StripeClient,
) -> None:
    for params in ({"charge": "ch_nope"}, {"payment_intent": "pi_nope"}):
        err = refund_error(client, **params)
        assert err.http_status == 404
        assert err.code == "resource_missing"
        assert err.param == next(iter(params))


def test_payment_intent_without_a_successful_charge_cannot_be_refunded(
    client: stripe.StripeClient,
) -> None:
    pi = client.v1.payment_intents.create(params={"amount": 1000, "currency": "usd"})
    assert refund_error(client, payment_intent=pi.id).code == "payment_intent_unexpected_state"
    with pytest.raises(stripe.CardError) as excinfo:
        pay(client, 1000, "pm_card_chargeDeclined")
    failed_charge = excinfo.value.error.charge
    assert refund_error(client, charge=failed_charge).http_status == 400


def test_charged_back_charge_is_charge_disputed_but_an_inquiry_allows_refunds(
    client: stripe.StripeClient, emu: EmulatorProcess
) -> None:
    disputed = pay(client, 1000, "pm_card_createDispute")
    err = refund_error(client, charge=disputed.latest_charge)
    assert err.code == "charge_disputed"
    inquiry = pay(client, 1000, "pm_card_createDisputeInquiry")
    assert client.v1.refunds.create(params={"payment_intent": inquiry.id}).status == "succeeded"
    normal = pay(client, 1000)
    emu.admin.dispute_charge(normal.latest_charge)
    assert client.v1.charges.retrieve(normal.latest_charge).disputed is True
    assert refund_error(client, payment_intent=normal.id).code == "charge_disputed"


def test_refund_lists_filter_by_charge_and_payment_intent_and_page(
    client: stripe.StripeClient,
) -> None:
    a, b = pay(client, 10_000), pay(client, 10_000)
    a_refunds = [
        client.v1.refunds.create(params={"charge": a.latest_charge, "amount": 100}).id
        for _ in range(12)
    ]
    client.v1.refunds.create(params={"payment_intent": b.id, "amount": 100})
    by_charge = client.v1.refunds.list(params={"charge": a.latest_charge, "limit": 5})
    assert by_charge.has_more is True
    assert [r.id for r in by_charge.auto_paging_iter()] == a_refunds[::-1]
    by_pi = client.v1.refunds.list(params={"payment_intent": b.id})
    assert len(by_pi.data) == 1 and by_pi.has_more is False
    assert len(list(client.v1.refunds.list(params={"limit": 3}).auto_paging_iter())) == 13
    retrieved = client.v1.refunds.retrieve(a_refunds[0], params={"expand": ["charge"]})
    assert retrieved.charge.id == a.latest_charge


def test_admin_counts_refunds_per_metadata_refund_id(
    client: stripe.StripeClient, emu: EmulatorProcess
) -> None:
    pi = pay(client, 3000)
    for refund_id in ("r_1", "r_2", "r_2"):
        client.v1.refunds.create(
            params={"payment_intent": pi.id, "amount": 100, "metadata": {"refund_id": refund_id}}
        )
    stats = emu.admin.stats()
    assert stats["refunds"] == 3
    assert stats["refunds_by_metadata_refund_id"] == {"r_1": 1, "r_2": 2}
    assert stats["refunds_by_status"] == {"succeeded": 3}
    assert [r["metadata"]["refund_id"] for r in emu.admin.refunds(metadata_refund_id="r_2")] == [
        "r_2",
        "r_2",
    ]
    assert len(emu.admin.refunds()) == 3


def test_refund_metadata_update_emits_refund_updated(client: stripe.StripeClient) -> None:
    pi = pay(client)
    refund = client.v1.refunds.create(params={"payment_intent": pi.id, "metadata": {"a": "1"}})
    updated = client.v1.refunds.update(refund.id, params={"metadata": {"b": "2"}})
    assert updated.metadata.to_dict() == {"a": "1", "b": "2"}
    assert client.v1.events.list(params={"type": "refund.updated"}).data[
        0
    ].data.previous_attributes.metadata.to_dict() == {"a": "1"}
