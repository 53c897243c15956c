"""A broker that accepts connections but never answers cannot hold a POST.

The API enqueues after its commit, inside the request. Before the enqueue's Redis
client had its own timeouts and retry count pinned, such a broker held this POST for
whatever redis-py defaults to (no timeout at all in older releases, 5 s in 8.x: this
test failed at 5.1 s; it now answers in about 2 s). The refund is committed either way
and the reconciler enqueues it later.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shared.adapters.celery_app import (
    ENQUEUE_CONNECT_TIMEOUT_SECONDS,
    ENQUEUE_RETRIES,
    ENQUEUE_SOCKET_TIMEOUT_SECONDS,
)
from shared.domain.models import Refund
from tests.support import auth, seed_payment, wait_for_http, web_process

#: What a POST may take with the broker silent: every try's timeouts, plus a margin.
BOUND_SECONDS = (ENQUEUE_RETRIES + 1) * max(
    ENQUEUE_CONNECT_TIMEOUT_SECONDS, ENQUEUE_SOCKET_TIMEOUT_SECONDS
) + 1.5


@pytest.fixture
def silent_broker() -> Iterator[str]:
    """A listener that completes TCP handshakes (the kernel does, from the backlog) and
    never reads or answers: a hung Redis, or one behind a black-holing firewall."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"


def test_a_silent_broker_cannot_hold_a_post_and_the_refund_is_still_created(
    service_env: dict[str, str], log_dir: Path, settings, db, silent_broker: str
) -> None:
    env = {**service_env, "REDIS_URL": silent_broker}
    env.pop("CELERY_BROKER_URL", None)
    web, url = web_process(env, log_dir, workers=1)
    _, charge = seed_payment(db, amount=1_000)
    db.commit()
    with web:
        wait_for_http(f"{url}/healthz", proc=web.proc)
        start = time.monotonic()
        resp = httpx.post(
            f"{url}/v1/admin/refunds",
            json={"charge_id": charge.id, "amount_cents": 100},
            headers=auth(settings),
            timeout=60,
        )
        elapsed = time.monotonic() - start
    assert resp.status_code == 201, resp.text
    assert elapsed < BOUND_SECONDS, f"the POST took {elapsed:.1f}s"
    refund = db.get(Refund, resp.json()["refund_id"])
    assert refund is not None and refund.status == "pending"  # the reconciler's to enqueue
