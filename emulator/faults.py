"""Fault injection (``/_emulator/faults``) and the request counters (``/_emulator/stats``)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

#: ``fail_next`` answers: Stripe's own errors (5xx, 429, a 409 ``lock_timeout``) and what a
#: proxy in between may say instead (408, 400 without a Stripe error body).
FAIL_STATUSES = (500, 502, 503, 429, 409, 408, 400)


class FaultError(ValueError):
    pass


def _count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise FaultError(f"{name} must be an integer >= 0")
    return value


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise FaultError(f"{name} must be a number >= 0")
    return float(value)


def _prefix(value: Any, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.startswith("/"):
        raise FaultError(f"{name} must be a path starting with /")
    return value


def _method(value: Any, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or value.upper() not in ("GET", "POST", "DELETE"):
        raise FaultError(f"{name} must be GET, POST or DELETE")
    return value.upper()


class _Countdown:
    """``count`` more matching requests get this fault."""

    def __init__(self, spec: Any, name: str, **fields: Any) -> None:
        if not isinstance(spec, dict):
            raise FaultError(f"{name} must be an object")
        known = {"count", "path_prefix", "method"} | set(fields)
        unknown = set(spec) - known
        if unknown:
            raise FaultError(f"unknown field(s) in {name}: {', '.join(sorted(unknown))}")
        self.count = _count(spec.get("count", 1), f"{name}.count")
        self.path_prefix = _prefix(spec.get("path_prefix"), f"{name}.path_prefix")
        self.method = _method(spec.get("method"), f"{name}.method")
        self.extra = fields

    def matches(self, method: str, path: str) -> bool:
        if self.count <= 0:
            return False
        if self.path_prefix is not None and not path.startswith(self.path_prefix):
            return False
        return self.method is None or self.method == method

    def as_dict(self) -> dict[str, Any]:
        out = {"count": self.count, "path_prefix": self.path_prefix, "method": self.method}
        out.update(self.extra)
        return out


class Faults:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.clear()

    def clear(self) -> None:
        with self._lock:
            self.latency_ms = 0.0
            self.rate_limit_rps: float | None = None
            self._tokens = 0.0
            self._last_refill = time.monotonic()
            self.fail_next: _Countdown | None = None
            self.timeout_next: _Countdown | None = None
            self.drop_after_apply_next: _Countdown | None = None
            self.garble_after_apply_next: _Countdown | None = None

    def update(self, spec: Any) -> None:
        """Merge ``spec`` into the current faults; a field set to null is cleared."""
        if not isinstance(spec, dict):
            raise FaultError("body must be a JSON object")
        known = {
            "latency_ms",
            "rate_limit_rps",
            "fail_next",
            "timeout_next",
            "drop_after_apply_next",
            "garble_after_apply_next",
        }
        unknown = set(spec) - known
        if unknown:
            raise FaultError(f"unknown fault(s): {', '.join(sorted(unknown))}")
        changes: dict[str, Any] = {}
        if "latency_ms" in spec:
            changes["latency_ms"] = (
                0.0 if spec["latency_ms"] is None else _number(spec["latency_ms"], "latency_ms")
            )
        if "rate_limit_rps" in spec:
            value = spec["rate_limit_rps"]
            if value is not None:
                value = _number(value, "rate_limit_rps")
                if value <= 0:
                    raise FaultError("rate_limit_rps must be > 0 (or null to turn it off)")
            changes["rate_limit_rps"] = value
        if spec.get("fail_next") is not None:
            fail = spec["fail_next"]
            status = fail.get("status", 500) if isinstance(fail, dict) else None
            if status not in FAIL_STATUSES:
                raise FaultError(
                    "fail_next.status must be one of " + ", ".join(map(str, FAIL_STATUSES))
                )
            changes["fail_next"] = _Countdown(fail, "fail_next", status=status)
        elif "fail_next" in spec:
            changes["fail_next"] = None
        if spec.get("timeout_next") is not None:
            timeout = spec["timeout_next"]
            seconds = _number(
                timeout.get("seconds", 30) if isinstance(timeout, dict) else None,
                "timeout_next.seconds",
            )
            changes["timeout_next"] = _Countdown(timeout, "timeout_next", seconds=seconds)
        elif "timeout_next" in spec:
            changes["timeout_next"] = None
        if spec.get("drop_after_apply_next") is not None:
            changes["drop_after_apply_next"] = _Countdown(
                spec["drop_after_apply_next"], "drop_after_apply_next"
            )
        elif "drop_after_apply_next" in spec:
            changes["drop_after_apply_next"] = None
        if spec.get("garble_after_apply_next") is not None:
            changes["garble_after_apply_next"] = _Countdown(
                spec["garble_after_apply_next"], "garble_after_apply_next"
            )
        elif "garble_after_apply_next" in spec:
            changes["garble_after_apply_next"] = None
        with self._lock:
            for name, value in changes.items():
                setattr(self, name, value)
            if "rate_limit_rps" in changes and changes["rate_limit_rps"] is not None:
                self._tokens = max(1.0, changes["rate_limit_rps"])
                self._last_refill = time.monotonic()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "latency_ms": self.latency_ms,
                "rate_limit_rps": self.rate_limit_rps,
                "fail_next": self.fail_next.as_dict()
                if self.fail_next and self.fail_next.count
                else None,
                "timeout_next": self.timeout_next.as_dict()
                if self.timeout_next and self.timeout_next.count
                else None,
                "drop_after_apply_next": (
                    self.drop_after_apply_next.as_dict()
                    if self.drop_after_apply_next and self.drop_after_apply_next.count
                    else None
                ),
                "garble_after_apply_next": (
                    self.garble_after_apply_next.as_dict()
                    if self.garble_after_apply_next and self.garble_after_apply_next.count
                    else None
                ),
            }

    def latency(self) -> float:
        return self.latency_ms / 1000.0

    def take_rate_token(self) -> bool:
        """Token bucket of ``rate_limit_rps`` tokens a second, burst ``max(1, rps)``."""
        with self._lock:
            rps = self.rate_limit_rps
            if rps is None:
                return True
            now = time.monotonic()
            capacity = max(1.0, rps)
            self._tokens = min(capacity, self._tokens + (now - self._last_refill) * rps)
            self._last_refill = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return True
            return False

    def _take(self, name: str, method: str, path: str) -> _Countdown | None:
        with self._lock:
            fault = getattr(self, name)
            if fault is None or not fault.matches(method, path):
                return None
            fault.count -= 1
            return fault

    def take_fail(self, method: str, path: str) -> int | None:
        fault = self._take("fail_next", method, path)
        return fault.extra["status"] if fault else None

    def take_timeout(self, method: str, path: str) -> float | None:
        fault = self._take("timeout_next", method, path)
        return fault.extra["seconds"] if fault else None

    def take_drop(self, method: str, path: str) -> bool:
        return self._take("drop_after_apply_next", method, path) is not None

    def take_garble(self, method: str, path: str) -> bool:
        return self._take("garble_after_apply_next", method, path) is not None


class Stats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.clear()

    def clear(self) -> None:
        with self._lock:
            self.requests: Counter[str] = Counter()
            self.responses: Counter[str] = Counter()
            self.faults_fired: Counter[str] = Counter()
            self.rate_limited = 0
            self.idempotent_replays = 0
            self.idempotency_key_in_use = 0
            self.idempotency_errors = 0
            self.webhooks: Counter[str] = Counter()

    def count_request(self, route: str) -> None:
        with self._lock:
            self.requests[route] += 1

    def count_response(self, status: str) -> None:
        """``status`` is the HTTP status, or ``"closed"`` for a connection closed unanswered."""
        with self._lock:
            self.responses[status] += 1

    def count_fault(self, name: str) -> None:
        with self._lock:
            self.faults_fired[name] += 1

    def count(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)

    def count_webhook(self, outcome: str) -> None:
        with self._lock:
            self.webhooks[outcome] += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": dict(self.requests),
                "requests_total": sum(self.requests.values()),
                "responses": dict(self.responses),
                "rate_limited": self.rate_limited,
                "faults_fired": dict(self.faults_fired),
                "idempotent_replays": self.idempotent_replays,
                "idempotency_key_in_use": self.idempotency_key_in_use,
                "idempotency_errors": self.idempotency_errors,
                "webhooks": {
                    "delivered": self.webhooks["delivered"],
                    "failed_attempts": self.webhooks["failed_attempts"],
                    "gave_up": self.webhooks["gave_up"],
                },
            }
