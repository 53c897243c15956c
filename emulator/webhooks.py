"""Signed webhook delivery, off the request path.

Each event is POSTed as JSON to the configured URL with the header
``Stripe-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<payload>">``
keyed with the webhook secret, which is what ``stripe.Webhook.construct_event``
verifies. A non-2xx answer or a connection error is retried with exponential
backoff (``webhook_retry_base`` doubling) up to ``webhook_max_attempts``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from typing import Any

from .config import Config
from .faults import Stats
from .scheduler import Scheduler

log = logging.getLogger("emulator.webhooks")

WORKERS = 4


def sign(payload: bytes, secret: str, timestamp: int | None = None) -> str:
    """The ``Stripe-Signature`` header value for ``payload``."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode("utf-8"), f"{t}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


class WebhookDispatcher:
    def __init__(self, config: Config, scheduler: Scheduler, stats: Stats) -> None:
        self.config = config
        self.scheduler = scheduler
        self.stats = stats
        self.generation = 0
        self._queue: queue.Queue[tuple[int, dict[str, Any], int] | None] = queue.Queue()
        self._log: deque[dict[str, Any]] = deque(maxlen=1000)
        self._log_lock = threading.Lock()
        self._in_flight = 0
        # Never through a proxy from the environment: webhooks go where configured.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self._threads = [
            threading.Thread(target=self._work, name=f"emulator-webhook-{i}", daemon=True)
            for i in range(WORKERS)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, event: dict[str, Any]) -> None:
        """Queue ``event`` for delivery if a webhook URL is configured (never blocks)."""
        if self.config.webhook_url:
            with self._log_lock:
                self._in_flight += 1
            self._queue.put((self.generation, event, 1))

    def reset(self) -> None:
        """Drop queued and scheduled deliveries."""
        self.generation += 1
        with self._log_lock:
            self._log.clear()
            self._in_flight = 0

    def stop(self) -> None:
        for _ in self._threads:
            self._queue.put(None)

    def deliveries(self) -> list[dict[str, Any]]:
        with self._log_lock:
            return list(self._log)

    def pending(self) -> int:
        with self._log_lock:
            return self._in_flight

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            generation, event, attempt = item
            if generation != self.generation:
                self._done()
                continue
            try:
                self._attempt(generation, event, attempt)
            except Exception:  # a broken delivery must not kill the worker
                log.exception("webhook delivery crashed")
                self._done()

    def _attempt(self, generation: int, event: dict[str, Any], attempt: int) -> None:
        url = self.config.webhook_url
        if not url:
            self._done()
            return
        payload = json.dumps(event, indent=2).encode("utf-8")
        # Config.update admits only http(s) URLs.
        request = urllib.request.Request(  # noqa: S310
            url,
            data=payload,
            method="POST",
            headers={
                "Content-Type": "application/json; charset=utf-8",
                "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
                "Stripe-Signature": sign(payload, self.config.webhook_secret),
            },
        )
        status: int | None = None
        error: str | None = None
        try:
            with self._opener.open(request, timeout=self.config.webhook_timeout) as response:
                status = response.status
                response.read()
        except urllib.error.HTTPError as exc:
            status = exc.code
            exc.close()
        except (OSError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        ok = status is not None and 200 <= status < 300
        if generation != self.generation:
            # The emulator was reset while this was in flight: its counters are gone.
            self._done()
            return
        self._record(event, attempt, status, error, ok)
        if ok:
            self.stats.count_webhook("delivered")
            self._done()
            return
        self.stats.count_webhook("failed_attempts")
        if attempt >= self.config.webhook_max_attempts:
            self.stats.count_webhook("gave_up")
            self._done()
            return
        delay = self.config.webhook_retry_base * (2 ** (attempt - 1))
        self.scheduler.call_later(delay, lambda: self._queue.put((generation, event, attempt + 1)))

    def _done(self) -> None:
        with self._log_lock:
            self._in_flight = max(0, self._in_flight - 1)

    def _record(
        self, event: dict[str, Any], attempt: int, status: int | None, error: str | None, ok: bool
    ) -> None:
        with self._log_lock:
            self._log.append(
                {
                    "event": event["id"],
                    "type": event["type"],
                    "attempt": attempt,
                    "status": status,
                    "error": error,
                    "ok": ok,
                    "at": time.time(),
                }
            )
