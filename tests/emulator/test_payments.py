"""PaymentIntents, charges, payment methods, auth and the API's shapes, through the official SDK."""

from __future__ import annotations

import pytest
import requests
import stripe

from emulator.testing import EmulatorProcess
from tests.emulator.helpers import pay


def test_confirmed_visa_payment_succeeds_with_a_succeeded_charge(
    client: stripe.StripeClient,
) -> None:
    pi = pay(client, 2500, metadata={"order": "o_1"})
    assert pi.object == "payment_intent"
    assert pi.status == "succeeded"
    assert pi.amount_received == 2500
    assert pi.livemode is False
    assert pi.metadata["order"] == "o_1"
    charge = client.v1.charges.retrieve(pi.latest_charge)
    assert charge.status == "succeeded"
    assert charge.paid is True
    assert charge.amount == charge.amount_captured == 2500
    assert charge.amount_refunded == 0
    assert charge.refunded is False
    assert charge.disputed is False
    assert charge.payment_intent == pi.id
    assert charge.currency == "usd"
    assert charge.payment_method_details.card.last4 == "4242"


def test_create_then_confirm_in_two_steps(client: stripe.StripeClient) -> None:
    pi = client.v1.payment_intents.create(params={"amount": 700, "currency": "eur"})
    assert pi.status == "requires_payment_method"
    assert pi.latest_charge is None
    confirmed = client.v1.payment_intents.confirm(
        pi.id, params={"payment_method": "pm_card_mastercard"}
    )
    assert confirmed.status == "succeeded"
    again = client.v1.payment_intents.retrieve(pi.id, params={"expand": ["latest_charge"]})
    assert again.latest_charge.id == confirmed.latest_charge
    assert again.latest_charge.payment_method_details.card.brand == "mastercard"


def test_declined_card_is_a_402_card_error_and_leaves_a_failed_charge(
    client: stripe.StripeClient,
) -> None:
    with pytest.raises(stripe.CardError) as excinfo:
        pay(client, 1000, "pm_card_chargeDeclinedInsufficientFunds")
    err = excinfo.value
    assert err.http_status == 402
    assert err.code == "card_declined"
    assert err.error.decline_code == "insufficient_funds"
    pi_id = err.error.payment_intent.id
    pi = client.v1.payment_intents.retrieve(pi_id)
    assert pi.status == "requires_payment_method"
    assert pi.last_payment_error.decline_code == "insufficient_funds"
    charge = client.v1.charges.retrieve(pi.latest_charge)
    assert charge.status == "failed"
    assert charge.paid is False
    assert charge.amount_captured == 0
    types = [e.type for e in client.v1.events.list(params={"limit": 100}).data]
    assert "charge.failed" in types
    assert "payment_intent.payment_failed" in types


def test_dispute_card_makes_a_disputed_charge_and_a_dispute_event(
    client: stripe.StripeClient,
) -> None:
    pi = pay(client, 1500, "pm_card_createDispute")
    charge = client.v1.charges.retrieve(pi.latest_charge)
    assert pi.status == "succeeded"
    assert charge.disputed is True
    events = client.v1.events.list(params={"type": "charge.dispute.created"}).data
    assert len(events) == 1
    assert events[0].data.object.charge == charge.id
    assert events[0].data.object.status == "needs_response"


def test_cancel_requires_an_uncompleted_payment_intent(client: stripe.StripeClient) -> None:
    open_pi = client.v1.payment_intents.create(params={"amount": 500, "currency": "usd"})
    canceled = client.v1.payment_intents.cancel(
        open_pi.id, params={"cancellation_reason": "abandoned"}
    )
    assert canceled.status == "canceled"
    assert (
        client.v1.events.list(params={"type": "payment_intent.canceled"}).data[0].data.object.id
        == open_pi.id
    )
    with pytest.raises(stripe.InvalidRequestError) as excinfo:
        client.v1.payment_intents.cancel(pay(client).id)
    assert excinfo.value.code == "payment_intent_unexpected_state"


def test_list_pages_newest_first_and_auto_paging_reads_everything(
    client: stripe.StripeClient,
) -> None:
    ids = [
        client.v1.payment_intents.create(params={"amount": 100 + i, "currency": "usd"}).id
        for i in range(23)
    ]
    first = client.v1.payment_intents.list(params={"limit": 5})
    assert first.object == "list"
    assert first.url == "/v1/payment_intents"
    assert first.has_more is True
    assert [p.id for p in first.data] == ids[::-1][:5]
    walked = [p.id for p in client.v1.payment_intents.list(params={"limit": 5}).auto_paging_iter()]
    assert walked == ids[::-1]
    # Backwards from the oldest: the SDK yields oldest to newest.
    back = client.v1.payment_intents.list(params={"limit": 4, "ending_before": ids[0]})
    assert [p.id for p in back.data] == ids[1:5][::-1]
    assert [p.id for p in back.auto_paging_iter()] == ids[1:]


def test_charges_list_filters_by_payment_intent(client: stripe.StripeClient) -> None:
    pis = [pay(client, 1000 + i) for i in range(3)]
    listed = client.v1.charges.list(params={"payment_intent": pis[1].id})
    assert [c.id for c in listed.data] == [pis[1].latest_charge]
    assert len(client.v1.charges.list(params={"limit": 100}).data) == 3


def test_legacy_charge_with_a_test_token(client: stripe.StripeClient) -> None:
    charge = client.v1.charges.create(
        params={"amount": 900, "currency": "usd", "source": "tok_visa"}
    )
    assert charge.status == "succeeded"
    assert charge.payment_intent is None
    with pytest.raises(stripe.CardError):
        client.v1.charges.create(
            params={"amount": 900, "currency": "usd", "source": "tok_chargeDeclined"}
        )


def test_payment_method_from_a_test_card_number(client: stripe.StripeClient) -> None:
    pm = client.v1.payment_methods.create(
        params={
            "type": "card",
            "card": {"number": "4000000000007726", "exp_month": 12, "exp_year": 2034},
        }
    )
    pi = pay(client, 1200, pm.id)
    refund = client.v1.refunds.create(params={"payment_intent": pi.id})
    assert refund.status == "pending"  # 4000000000007726 is the pending-refund card


def test_unknown_parameters_and_missing_objects_are_refused(client: stripe.StripeClient) -> None:
    with pytest.raises(stripe.InvalidRequestError) as excinfo:
        client.v1.payment_intents.create(params={"amount": 100, "currency": "usd", "amout": 5})  # type: ignore[typeddict-unknown-key]
    assert excinfo.value.code == "parameter_unknown"
    assert excinfo.value.param == "amout"
    with pytest.raises(stripe.InvalidRequestError) as excinfo:
        client.v1.payment_intents.retrieve("pi_missing")
    assert excinfo.value.http_status == 404
    assert excinfo.value.code == "resource_missing"
    with pytest.raises(stripe.InvalidRequestError) as excinfo:
        pay(client, 100, "pm_does_not_exist")
    assert excinfo.value.code == "resource_missing"


def test_api_keys_are_checked_and_every_answer_has_a_request_id(emu: EmulatorProcess) -> None:
    with requests.Session() as http:
        http.trust_env = False
        missing = http.get(f"{emu.url}/v1/charges")
        assert missing.status_code == 401
        assert missing.json()["error"]["type"] == "invalid_request_error"
        assert missing.headers["Request-Id"].startswith("req_")
        live = http.get(
            f"{emu.url}/v1/charges", headers={"Authorization": "Bearer sk_live_abcdefgh1234"}
        )
        assert live.status_code == 401
        ok = http.get(f"{emu.url}/v1/charges", headers={"Authorization": "Bearer sk_test_abc"})
        assert ok.status_code == 200
        assert ok.headers["Request-Id"].startswith("req_")
        assert ok.json() == {"object": "list", "data": [], "has_more": False, "url": "/v1/charges"}
        basic = http.get(f"{emu.url}/v1/charges", auth=("rk_test_abc", ""))
        assert basic.status_code == 200
        unknown = http.get(f"{emu.url}/v1/nothing", headers={"Authorization": "Bearer sk_test_abc"})
        assert unknown.status_code == 404
        assert "Unrecognized request URL" in unknown.json()["error"]["message"]
    with pytest.raises(stripe.AuthenticationError):
        emu.client("sk_live_nope").v1.charges.list()


def test_expand_brackets_form_and_nested_metadata_from_a_raw_form_body(
    emu: EmulatorProcess,
) -> None:
    with requests.Session() as http:
        http.trust_env = False
        auth = {"Authorization": "Bearer sk_test_raw"}
        pi = http.post(
            f"{emu.url}/v1/payment_intents",
            data="amount=1000&currency=usd&payment_method=pm_card_visa&confirm=true&metadata[a]=1&expand[]=latest_charge",
            headers={**auth, "Content-Type": "application/x-www-form-urlencoded"},
        ).json()
        assert pi["metadata"] == {"a": "1"}
        assert pi["latest_charge"]["object"] == "charge"
