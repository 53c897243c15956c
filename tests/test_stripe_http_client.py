"""The Stripe client's HTTP (``StripeHttpClient``, libcurl) against the emulator: what the
SDK reads from an answer, the time bound, and no create sent twice behind the worker's back."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import stripe

from emulator.testing import EmulatorProcess
from shared.adapters.stripe_gateway import ErrorKind, StripeHttpClient, classify_error
from tests.emulator.helpers import pay


@pytest.fixture(scope="module")
def emu() -> Iterator[EmulatorProcess]:
    with EmulatorProcess() as process:
        yield process


@pytest.fixture
def client(emu: EmulatorProcess) -> Iterator[stripe.StripeClient]:
    emu.admin.reset()
    yield emu.client("sk_test_http_client", http_client=StripeHttpClient(timeout=1.0))
    emu.admin.reset()


def _create(client: stripe.StripeClient, pi: stripe.PaymentIntent, refund_id: str) -> str:
    answer = client.raw_request("post", "/v1/refunds", payment_intent=pi.id, amount=1,
                                metadata={"refund_id": refund_id},
                                idempotency_key=f"key-{refund_id}")
    return str(answer.data["id"])


def test_answers_headers_and_errors_reach_the_sdk(
    client: stripe.StripeClient, emu: EmulatorProcess
) -> None:
    pi = pay(client, 1000)
    assert _create(client, pi, "r_one").startswith("re_")
    emu.admin.faults(rate_limit_rps=1)
    with pytest.raises(stripe.RateLimitError) as caught:
        for _ in range(5):
            client.v1.refunds.list()
    # The SDK and classify_error look headers up in either case.
    assert caught.value.headers["retry-after"] == caught.value.headers["Retry-After"] == "1"
    assert classify_error(caught.value).retry_after == 1.0
    emu.admin.clear_faults()
    with pytest.raises(stripe.InvalidRequestError) as refused:  # more than is left
        client.raw_request("post", "/v1/refunds", payment_intent=pi.id, amount=2000,
                           idempotency_key="key-too-much")
    assert classify_error(refused.value).kind is ErrorKind.DEFINITE


def test_the_timeout_bounds_the_whole_call(
    client: stripe.StripeClient, emu: EmulatorProcess
) -> None:
    emu.admin.faults(latency_ms=3_000)
    started = time.perf_counter()
    with pytest.raises(stripe.APIConnectionError, match="timed out") as caught:
        client.v1.refunds.list()
    assert time.perf_counter() - started < 2.0
    assert classify_error(caught.value).kind is ErrorKind.TRANSIENT


def test_a_create_on_a_reused_connection_that_dies_is_not_sent_again(
    client: stripe.StripeClient, emu: EmulatorProcess
) -> None:
    """libcurl resends a request on its own when a reused connection dies before any
    answer. For a create the worker must decide that, after a lookup (SPEC 6): the
    client reports the loss instead."""
    pi = pay(client, 1000)
    _create(client, pi, "r_warm")  # the thread's connection is now a reused one
    emu.admin.faults(drop_after_apply_next={"count": 1, "method": "POST",
                                            "path_prefix": "/v1/refunds"})
    with pytest.raises(stripe.APIConnectionError) as caught:
        _create(client, pi, "r_dropped")
    assert classify_error(caught.value).kind is ErrorKind.TRANSIENT
    stats = emu.admin.stats()
    assert stats["requests"]["POST /v1/refunds"] == 2  # the warm one and the dropped one
    assert stats["refunds_by_metadata_refund_id"] == {"r_warm": 1, "r_dropped": 1}


def test_threads_share_one_client(client: stripe.StripeClient, emu: EmulatorProcess) -> None:
    pi = pay(client, 1000)
    made: list[str] = []
    errors: list[BaseException] = []

    def create(i: int) -> None:
        try:
            made.append(_create(client, pi, f"r_thread_{i}"))
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(made)) == 16
