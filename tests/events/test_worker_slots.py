"""How many of a worker's threads may deliver webhooks at once."""

from __future__ import annotations

from types import SimpleNamespace

from worker import webhook_tasks


def _worker(concurrency: int, queues: list[str]) -> SimpleNamespace:
    amqp = SimpleNamespace(queues=SimpleNamespace(consume_from={q: None for q in queues}))
    return SimpleNamespace(concurrency=concurrency, app=SimpleNamespace(amqp=amqp))


def free_slots() -> int:
    taken = 0
    while webhook_tasks._slots.acquire(blocking=False):
        taken += 1
    for _ in range(taken):
        webhook_tasks._slots.release()
    return taken


def test_half_the_pool_beside_refunds_all_of_it_in_a_worker_of_its_own(events_env) -> None:
    webhook_tasks._size_slots(sender=_worker(8, ["refunds", "refunds.reconcile",
                                                 "refunds.webhooks"]))
    assert free_slots() == 4
    webhook_tasks._size_slots(sender=_worker(8, ["refunds.webhooks"]))
    assert free_slots() == 8
    webhook_tasks._size_slots(sender=_worker(1, ["refunds", "refunds.webhooks"]))
    assert free_slots() == 1
