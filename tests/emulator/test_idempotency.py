"""Idempotency-Key: replay, mismatch, concurrency, scoping and expiry."""

from __future__ import annotations

import threading
import time

import pytest
import requests
import stripe

from emulator.testing import EmulatorProcess
from tests.emulator.helpers import pay


def raw_post(
    emu: EmulatorProcess, path: str, data: dict[str, object], key: str, api_key: str = "sk_test_raw"
) -> requests.Response:
    with requests.Session() as http:
        http.trust_env = False
        return http.post(
            f"{emu.url}{path}",
            data=data,
            headers={"Authorization": f"Bearer {api_key}", "Idempotency-Key": key},
        )


def test_same_key_and_params_replays_the_stored_answer_exactly(
    emu: EmulatorProcess, client: stripe.StripeClient
) -> None:
    pi = pay(client, 2000)
    params = {"charge": pi.latest_charge, "amount": "500", "metadata[refund_id]": "r_1"}
    first = raw_post(emu, "/v1/refunds", params, "key-1")
    second = raw_post(emu, "/v1/refunds", params, "key-1")
    assert first.status_code == second.status_code == 200
    assert second.content == first.content
    assert second.headers["Idempotent-Replayed"] == "true"
    assert second.headers["Original-Request"] == first.headers["Request-Id"]
    assert "Idempotent-Replayed" not in first.headers
    assert emu.admin.stats()["refunds_by_metadata_refund_id"] == {"r_1": 1}
    assert client.v1.charges.retrieve(pi.latest_charge).amount_refunded == 500


def test_sdk_retry_with_the_same_key_gets_the_same_refund(
    client: stripe.StripeClient, emu: EmulatorProcess
) -> None:
    pi = pay(client, 2000)
    params = {"payment_intent": pi.id, "amount": 700, "metadata": {"refund_id": "r_sdk"}}
    a = client.v1.refunds.create(params=params, options={"idempotency_key": "refund-r_sdk"})  # type: ignore[arg-type]
    b = client.v1.refunds.create(params=params, options={"idempotency_key": "refund-r_sdk"})  # type: ignore[arg-type]
    assert a.id == b.id
    assert emu.admin.stats()["idempotent_replays"] == 1


def test_same_key_with_other_params_or_endpoint_is_an_idempotency_error(
    emu: EmulatorProcess, client: stripe.StripeClient
) -> None:
    pi = pay(client, 2000)
    client.v1.refunds.create(
        params={"charge": pi.latest_charge, "amount": 100}, options={"idempotency_key": "k"}
    )
    with pytest.raises(stripe.IdempotencyError) as excinfo:
        client.v1.refunds.create(
            params={"charge": pi.latest_charge, "amount": 200}, options={"idempotency_key": "k"}
        )
    assert excinfo.value.http_status == 400
    assert excinfo.value.json_body["error"]["type"] == "idempotency_error"
    assert "same parameters" in str(excinfo.value.user_message)
    with pytest.raises(stripe.IdempotencyError) as excinfo:
        client.v1.payment_intents.create(
            params={"amount": 100, "currency": "usd"}, options={"idempotency_key": "k"}
        )
    assert "same endpoint" in str(excinfo.value.user_message)
    assert client.v1.charges.retrieve(pi.latest_charge).amount_refunded == 100


def test_keys_are_scoped_to_the_api_key(emu: EmulatorProcess, client: stripe.StripeClient) -> None:
    pi = pay(client, 2000)
    params = {"charge": pi.latest_charge, "amount": "100"}
    one = raw_post(emu, "/v1/refunds", params, "shared", api_key="sk_test_one").json()
    two = raw_post(emu, "/v1/refunds", params, "shared", api_key="sk_test_two").json()
    assert one["id"] != two["id"]


def test_business_errors_are_saved_but_validation_errors_are_not(
    emu: EmulatorProcess, client: stripe.StripeClient
) -> None:
    pi = pay(client, 1000)
    too_large = {"charge": pi.latest_charge, "amount": "5000"}
    assert (
        raw_post(emu, "/v1/refunds", too_large, "k-large").json()["error"]["code"]
        == "amount_too_large"
    )
    replay = raw_post(emu, "/v1/refunds", too_large, "k-large")
    assert replay.headers.get("Idempotent-Replayed") == "true"
    bad = {"charge": pi.latest_charge, "amount": "x"}
    assert (
        raw_post(emu, "/v1/refunds", bad, "k-bad").json()["error"]["code"]
        == "parameter_invalid_integer"
    )
    fixed = raw_post(emu, "/v1/refunds", {"charge": pi.latest_charge, "amount": "10"}, "k-bad")
    assert fixed.status_code == 200
    assert "Idempotent-Replayed" not in fixed.headers


def test_concurrent_requests_with_one_key_create_exactly_one_refund(
    emu: EmulatorProcess, client: stripe.StripeClient
) -> None:
    pi = pay(client, 2000)
    emu.admin.faults(latency_ms=300)  # the first request stays in flight while the others arrive
    params = {"payment_intent": pi.id, "amount": "300", "metadata[refund_id]": "r_once"}
    answers: list[requests.Response] = []
    lock = threading.Lock()

    def send() -> None:
        response = raw_post(emu, "/v1/refunds", params, "concurrent-key")
        with lock:
            answers.append(response)

    threads = [threading.Thread(target=send) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = sorted(r.status_code for r in answers)
    assert statuses.count(200) >= 1
    assert 409 in statuses
    assert set(statuses) <= {200, 409}
    conflicts = [r.json()["error"] for r in answers if r.status_code == 409]
    assert all(e["code"] == "idempotency_key_in_use" for e in conflicts)
    assert emu.admin.stats()["refunds_by_metadata_refund_id"] == {"r_once": 1}
    ids = {r.json()["id"] for r in answers if r.status_code == 200}
    assert len(ids) == 1


def test_forgotten_or_expired_keys_run_again(
    emu: EmulatorProcess, client: stripe.StripeClient
) -> None:
    pi = pay(client, 2000)
    params = {"charge": pi.latest_charge, "amount": "100"}
    first = raw_post(emu, "/v1/refunds", params, "k-forget").json()["id"]
    assert emu.admin.forget_idempotency_keys() >= 1
    second = raw_post(emu, "/v1/refunds", params, "k-forget").json()["id"]
    assert first != second
    emu.admin.config(idempotency_ttl=0.2)
    third = raw_post(emu, "/v1/refunds", params, "k-ttl").json()["id"]
    time.sleep(0.3)
    fourth = raw_post(emu, "/v1/refunds", params, "k-ttl").json()["id"]
    assert third != fourth
    assert emu.admin.stats()["refunds"] == 4
