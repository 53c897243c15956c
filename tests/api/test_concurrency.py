"""Money safety under concurrency (SPEC 3.1): requests racing for one payment, over real
HTTP, on a gunicorn with four processes, can never together refund more than was captured.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from shared.domain.models import RELEASED_STATUSES, Refund
from tests.api.helpers import REFUNDS, all_at_once
from tests.support import auth, seed_payment, wait_for_http, web_process


@pytest.fixture(scope="module")
def busy_api(service_env: dict[str, str], log_dir: Path) -> Iterator[str]:
    """Four processes, so racing requests are served by different interpreters and
    different database connections, as in production."""
    web, url = web_process(service_env, log_dir, workers=4)
    with web:
        wait_for_http(f"{url}/healthz", proc=web.proc)
        yield url


def race(url: str, settings, bodies: list[dict]) -> list[httpx.Response]:
    headers = auth(settings)

    def send(i: int) -> httpx.Response:
        # One client per thread: separate connections, spread over the processes.
        with httpx.Client(base_url=url, timeout=30) as c:
            return c.post(REFUNDS, json=bodies[i], headers=headers)

    return all_at_once(len(bodies), send)


def held_amounts(db, payment_id: str) -> list[int]:
    db.expire_all()
    rows = db.execute(
        select(Refund.amount, Refund.status).where(Refund.payment_id == payment_id)
    ).all()
    return [amount for amount, status in rows if status not in RELEASED_STATUSES]


def outcomes(answers: list[httpx.Response]) -> Counter[tuple[int, str]]:
    return Counter(
        (r.status_code, "" if r.status_code == 201 else r.json()["error"]) for r in answers
    )


def test_concurrent_full_refunds_create_exactly_one(busy_api, settings, db) -> None:
    payment, charge = seed_payment(db, amount=10_000)

    answers = race(busy_api, settings, [{"charge_id": charge.id, "full": True}] * 20)

    assert outcomes(answers) == {(201, ""): 1, (409, "already_refunded"): 19}
    [won] = [r.json() for r in answers if r.status_code == 201]
    assert won["amount_cents"] == 10_000
    assert held_amounts(db, payment.id) == [10_000]


def test_concurrent_partial_refunds_never_exceed_the_captured_amount(
    busy_api, settings, db
) -> None:
    payment, charge = seed_payment(db, amount=10_000)
    # The same payment named three ways: each lookup path must take the same lock.
    names = [charge.id, payment.stripe_payment_intent_id, payment.id]
    bodies = [{"charge_id": names[i % 3], "amount_cents": 1_000} for i in range(30)]

    answers = race(busy_api, settings, bodies)

    counts = outcomes(answers)
    assert counts[(201, "")] == 10, counts
    refused = {key: n for key, n in counts.items() if key[0] != 201}
    assert sum(refused.values()) == 20
    assert set(refused) <= {(409, "already_refunded"), (422, "amount_exceeds_refundable")}
    held = held_amounts(db, payment.id)
    assert len(held) == 10 and sum(held) == 10_000


def test_concurrent_mixed_amounts_fill_the_payment_without_overshoot(
    busy_api, settings, db
) -> None:
    payment, charge = seed_payment(db, amount=10_000)
    bodies = [{"charge_id": charge.id, "amount_cents": 700 + 37 * i} for i in range(24)]
    bodies += [{"charge_id": charge.id, "full": True}] * 4

    answers = race(busy_api, settings, bodies)

    assert {r.status_code for r in answers} <= {201, 409, 422}
    accepted = sum(r.json()["amount_cents"] for r in answers if r.status_code == 201)
    held = held_amounts(db, payment.id)
    assert sum(held) == accepted <= 10_000
    if any(r.status_code == 201 for r, b in zip(answers, bodies, strict=True) if "full" in b):
        assert accepted == 10_000  # a full refund that won took exactly what was left
