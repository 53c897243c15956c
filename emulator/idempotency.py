"""Stripe's ``Idempotency-Key`` semantics for POST requests.

- The first request with a key runs; its status and body are saved.
- A later request with the same key, endpoint and parameters gets the saved
  answer back byte for byte, with ``Idempotent-Replayed: true``.
- The same key with other parameters, or on another endpoint, is refused with
  400 ``idempotency_error``.
- While the first request is still running, another with the same key is
  refused with 409 ``idempotency_key_in_use`` (the SDK retries 409s), so two
  concurrent requests can never both run.
- Keys belong to one API key and are forgotten after ``ttl`` seconds.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import StripeError

MAX_KEY_LENGTH = 255


@dataclass
class Entry:
    method: str
    path: str
    params_digest: str
    created: float
    done: bool = False
    status: int = 0
    body: bytes = b""
    request_id: str = ""
    headers: dict[str, str] = field(default_factory=dict)


class IdempotencyStore:
    def __init__(
        self, ttl: Callable[[], float], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, str], Entry] = OrderedDict()

    def begin(
        self, api_key: str, key: str, method: str, path: str, params: dict[str, Any]
    ) -> tuple[bool, Entry]:
        """Claim ``key`` for this request.

        Returns ``(True, entry)`` when the caller must run the request and then
        call ``finish`` or ``abandon``; ``(False, entry)`` when ``entry`` holds a
        saved answer to replay. Raises the Stripe errors described above.
        """
        if len(key) > MAX_KEY_LENGTH:
            raise StripeError(
                400,
                f"Invalid Idempotency-Key: keys can be at most {MAX_KEY_LENGTH} characters long.",
                saved=False,
            )
        digest = json.dumps(params, sort_keys=True, separators=(",", ":"))
        now = self._clock()
        with self._lock:
            self._purge(now)
            entry = self._entries.get((api_key, key))
            if entry is not None and entry.done and now - entry.created >= self._ttl():
                del self._entries[(api_key, key)]
                entry = None
            if entry is not None:
                if (entry.method, entry.path) != (method, path):
                    raise StripeError(
                        400,
                        "Keys for idempotent requests can only be used for the same endpoint they "
                        "were first used "
                        f"for ('{entry.method} {entry.path}' vs '{method} {path}'). Try using a "
                        "key other than "
                        f"'{key}' if you meant to execute a different request.",
                        type="idempotency_error",
                        saved=False,
                    )
                if entry.params_digest != digest:
                    raise StripeError(
                        400,
                        "Keys for idempotent requests can only be used with the same parameters "
                        "they were first "
                        f"used with. Try using a key other than '{key}' if you meant to execute a "
                        "different request.",
                        type="idempotency_error",
                        saved=False,
                    )
                if not entry.done:
                    raise StripeError(
                        409,
                        "There is currently another in-progress request using this Idempotent Key "
                        "(that probably "
                        "means you submitted twice, and the other request is still going through): "
                        f"{key}. Please try again later.",
                        code="idempotency_key_in_use",
                        saved=False,
                    )
                return False, entry
            entry = Entry(method=method, path=path, params_digest=digest, created=now)
            self._entries[(api_key, key)] = entry
            return True, entry

    def finish(
        self, entry: Entry, status: int, body: bytes, request_id: str, headers: dict[str, str]
    ) -> None:
        with self._lock:
            entry.status = status
            entry.body = body
            entry.request_id = request_id
            entry.headers = headers
            entry.done = True

    def abandon(self, api_key: str, key: str, entry: Entry) -> None:
        """Forget a claim whose request did not begin executing (validation error, fault)."""
        with self._lock:
            if self._entries.get((api_key, key)) is entry:
                del self._entries[(api_key, key)]

    def forget_all(self) -> int:
        with self._lock:
            count = len(self._entries)
            self._entries.clear()
            return count

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _purge(self, now: float) -> None:
        ttl = self._ttl()
        entries = self._entries
        while entries:
            first_key = next(iter(entries))
            first = entries[first_key]
            if now - first.created < ttl:
                break
            if not first.done:
                break
            del entries[first_key]
