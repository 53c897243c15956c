"""Fault injection: latency, rate limiting, 5xx, timeouts and connections dropped after applying."""

from __future__ import annotations

import threading
import time

import pytest
import requests
import stripe

from emulator.testing import EmulatorError, EmulatorProcess
from tests.emulator.helpers import pay


def test_latency_is_added_to_stripe_calls_only(
    client: stripe.StripeClient, emu: EmulatorProcess
) -> None:
    pi = pay(client)
    emu.admin.faults(latency_ms=400)
    started = time.perf_counter()
    client.v1.payment_intents.retrieve(pi.id)
    slow = time.perf_counter() - started
    started = time.perf_counter()
    emu.admin.stats()
    admin = time.perf_counter() - started
    emu.admin.clear_faults()
    started = time.perf_counter()
    client.v1.payment_intents.retrieve(pi.id)
    fast = time.perf_counter() - started
    assert 0.4 <= slow < 2.0
    assert admin < 0.3
    assert fast < 0.3


def test_fifty_requests_in_flight_at_once_are_served_concurrently(emu: EmulatorProcess) -> None:
    emu.admin.faults(latency_ms=500)
    statuses: list[int] = []
    lock = threading.Lock()

    def call() -> None:
        with requests.Session() as http:
            http.trust_env = False
            status = http.get(
                f"{emu.url}/v1/refunds", headers={"Authorization": "Bearer sk_test_load"}
            ).status_code
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=call) for _ in range(50)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    assert statuses == [200] * 50
    assert elapsed < 3.0  # one after the other would take 25 s


def test_rate_limit_answers_429_with_retry_after(
    client: stripe.StripeClient, emu: EmulatorProcess
) -> None:
    emu.admin.faults(rate_limit_rps=3)
    limited: list[stripe.RateLimitError] = []
    for _ in range(10):
        try:
            client.v1.refunds.list()
        except stripe.RateLimitError as exc:
            limited.append(exc)
    assert 4 <= len(limited) <= 7  # a burst of 3, plus what refills meanwhile
    assert all(e.http_status == 429 for e in limited)
    assert all(e.headers["Retry-After"] == "1" for e in limited)
    assert limited[0].json_body["error"]["code"] == "rate_limit"
    stats = emu.admin.stats()
    assert stats["rate_limited"] == len(limited)
    assert stats["responses"]["429"] == len(limited)
    time.sleep(0.4)
    client.v1.refunds.list()  # tokens refill


def test_fail_next_answers_errors_without_applying_anything(
    client: stripe.StripeClient, emu: EmulatorProcess
) -> None:
    pi = pay(client, 1000)
    emu.admin.faults(fail_next={"status": 503, "count": 2, "path_prefix": "/v1/refunds"})
    for _ in range(2):
        with pytest.raises(stripe.APIError) as excinfo:
            client.v1.refunds.create(
                params={"payment_intent": pi.id}, options={"idempotency_key": "k-5xx"}
            )
        assert excinfo.value.http_status == 503
        client.v1.charges.retrieve(pi.latest_charge)  # other paths are untouched
    assert emu.admin.stats()["refunds"] == 0
    refund = client.v1.refunds.create(
        params={"payment_intent": pi.id}, options={"idempotency_key": "k-5xx"}
    )
    assert refund.status == "succeeded"
    stats = emu.admin.stats()
    assert stats["faults_fired"] == {"fail_next": 2}
    assert stats["responses"]["503"] == 2
    assert emu.admin.get_faults()["fail_next"] is None


def test_fail_next_can_answer_429_and_500(
    client: stripe.StripeClient, emu: EmulatorProcess
) -> None:
    emu.admin.faults(fail_next={"status": 429, "count": 1})
    with pytest.raises(stripe.RateLimitError):
        client.v1.charges.list()
    emu.admin.faults(fail_next={"status": 500, "count": 1, "method": "GET"})
    with pytest.raises(stripe.APIError) as excinfo:
        client.v1.charges.list()
    assert excinfo.value.http_status == 500


def test_timeout_leaves_nothing_applied(emu: EmulatorProcess) -> None:
    impatient = emu.client(http_client=stripe.RequestsClient(timeout=0.3))
    pi = pay(impatient, 1000)
    emu.admin.faults(timeout_next={"count": 1, "seconds": 0.8, "path_prefix": "/v1/refunds"})
    started = time.perf_counter()
    with pytest.raises(stripe.APIConnectionError):
        impatient.v1.refunds.create(
            params={"payment_intent": pi.id}, options={"idempotency_key": "k-timeout"}
        )
    assert time.perf_counter() - started < 0.8
    time.sleep(0.7)  # the emulator gives up on the request without applying it
    assert emu.admin.stats()["refunds"] == 0
    assert emu.admin.stats()["faults_fired"] == {"timeout_next": 1}
    retry = impatient.v1.refunds.create(
        params={"payment_intent": pi.id}, options={"idempotency_key": "k-timeout"}
    )
    assert retry.amount == 1000


def test_drop_after_apply_creates_the_refund_but_the_client_sees_a_connection_error(
    client: stripe.StripeClient, emu: EmulatorProcess
) -> None:
    pi = pay(client, 1000)
    emu.admin.faults(drop_after_apply_next={"count": 1, "path_prefix": "/v1/refunds"})
    params = {"payment_intent": pi.id, "metadata": {"refund_id": "r_drop"}}
    with pytest.raises(stripe.APIConnectionError):
        client.v1.refunds.create(params=params, options={"idempotency_key": "k-drop"})  # type: ignore[arg-type]
    applied = emu.admin.refunds(metadata_refund_id="r_drop")
    assert len(applied) == 1
    assert client.v1.charges.retrieve(pi.latest_charge).refunded is True
    # The retry with the same key gets the refund that was made, not a second one.
    retry = client.v1.refunds.create(params=params, options={"idempotency_key": "k-drop"})  # type: ignore[arg-type]
    assert retry.id == applied[0]["id"]
    stats = emu.admin.stats()
    assert stats["refunds_by_metadata_refund_id"] == {"r_drop": 1}
    assert stats["faults_fired"] == {"drop_after_apply_next": 1}
    assert stats["idempotent_replays"] == 1


def test_faults_merge_show_and_clear(emu: EmulatorProcess) -> None:
    emu.admin.faults(latency_ms=5)
    shown = emu.admin.faults(fail_next={"status": 502, "count": 3})
    assert shown["latency_ms"] == 5
    assert shown["fail_next"] == {"count": 3, "path_prefix": None, "method": None, "status": 502}
    assert emu.admin.faults(latency_ms=None)["latency_ms"] == 0
    cleared = emu.admin.clear_faults()
    assert cleared == {
        "latency_ms": 0,
        "rate_limit_rps": None,
        "fail_next": None,
        "timeout_next": None,
        "drop_after_apply_next": None,
        "garble_after_apply_next": None,
    }
    for bad in (
        {"fail_next": {"status": 418}},
        {"latency_ms": -1},
        {"explode": True},
        {"timeout_next": {"count": "x"}},
    ):
        with pytest.raises(EmulatorError):
            emu.admin.faults(**bad)


def test_faults_fire_only_on_matching_requests(
    client: stripe.StripeClient, emu: EmulatorProcess
) -> None:
    pi = pay(client)
    emu.admin.faults(
        fail_next={"status": 500, "count": 1, "path_prefix": "/v1/refunds", "method": "POST"}
    )
    client.v1.refunds.list()
    client.v1.payment_intents.retrieve(pi.id)
    assert emu.admin.get_faults()["fail_next"]["count"] == 1
    assert emu.admin.stats()["faults_fired"] == {}
