"""Callers of ``POST /v1/admin/refunds`` that behave as a careful client should.

A request whose outcome is unknown (a 5xx, a timeout, a dropped connection) is sent
again with the same ``Idempotency-Key`` and body until the service gives a definite
answer, so a refund is never asked for twice by accident. Every answer is kept in a
``Ledger``, which the oracle (``tests.chaos.oracle``) holds against the database and
Stripe at the end.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

REFUNDS = "/v1/admin/refunds"


def fingerprint(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Answer:
    """The definite answer to one request (``status`` None: none came before the deadline)."""

    sub: str
    key: str
    body: dict[str, Any]
    status: int | None
    error: str | None = None
    refund_id: str | None = None
    amount: int | None = None
    replayed: bool = False
    raw: str = ""
    tries: int = 1


@dataclass
class Ledger:
    """Every answer every client got, safe to fill from many threads."""

    answers: list[Answer] = field(default_factory=list)
    unknown_outcomes: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, answer: Answer) -> None:
        with self._lock:
            self.answers.append(answer)

    def note_unknown(self, what: str) -> None:
        with self._lock:
            self.unknown_outcomes[what] += 1

    def acknowledged(self) -> dict[str, Answer]:
        """refund id -> the first 201 that named it."""
        found: dict[str, Answer] = {}
        for answer in self.answers:
            if answer.status == 201 and answer.refund_id not in found:
                found[answer.refund_id] = answer  # type: ignore[index]
        return found

    def unanswered(self) -> list[Answer]:
        """Requests still without a definite answer, newest attempt per key."""
        answered = {(a.sub, a.key, fingerprint(a.body)) for a in self.answers if a.status}
        pending: dict[tuple[str, str, str], Answer] = {}
        for a in self.answers:
            ident = (a.sub, a.key, fingerprint(a.body))
            if a.status is None and ident not in answered:
                pending[ident] = a
        return list(pending.values())

    def statuses(self) -> Counter[str]:
        return Counter(
            "no answer" if a.status is None else
            str(a.status) if a.status == 201 else f"{a.status} {a.error}"
            for a in self.answers
        )


class RefundClient:
    """One caller (one ``sub``) with its own HTTP connection; not shared between threads."""

    def __init__(
        self, api_url: str, token: str, sub: str, ledger: Ledger, *,
        give_up_after: float = 60.0, timeout: float = 10.0,
    ) -> None:
        self.sub = sub
        self.ledger = ledger
        self.give_up_after = give_up_after
        self._headers = {"Authorization": f"Bearer {token}"}
        self._http = httpx.Client(base_url=api_url, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def create(self, body: dict[str, Any], key: str) -> Answer:
        """POST until a definite answer (< 500) or ``give_up_after`` seconds; record it."""
        deadline = time.monotonic() + self.give_up_after
        tries = 0
        while True:
            tries += 1
            try:
                resp = self._http.post(
                    REFUNDS, json=body, headers={**self._headers, "Idempotency-Key": key}
                )
            except httpx.TransportError as exc:
                self.ledger.note_unknown(type(exc).__name__)
            else:
                if resp.status_code < 500:
                    answer = self._answer(body, key, resp, tries)
                    self.ledger.add(answer)
                    return answer
                self.ledger.note_unknown(f"http {resp.status_code}")
            if time.monotonic() > deadline:
                answer = Answer(self.sub, key, body, None, tries=tries)
                self.ledger.add(answer)
                return answer
            time.sleep(min(2.0, 0.1 * 2 ** min(tries, 5)))

    def _answer(self, body: dict[str, Any], key: str, resp: httpx.Response, tries: int) -> Answer:
        data = resp.json()
        replayed = resp.headers.get("Idempotent-Replayed") == "true"
        if resp.status_code == 201:
            return Answer(self.sub, key, body, 201, refund_id=data["refund_id"],
                          amount=data["amount_cents"], replayed=replayed, raw=resp.text,
                          tries=tries)
        return Answer(self.sub, key, body, resp.status_code, error=data.get("error"),
                      raw=resp.text, tries=tries)
