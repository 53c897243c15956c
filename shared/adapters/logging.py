"""Structured logs: one JSON object per line on stdout, for every process.

Each line carries ``request_id``, ``refund_id`` and ``task_id`` when the code that
logs runs inside a request or a task (``log_context`` / ``bind``), and passes
through ``redact`` last, so a bearer token, a Stripe or webhook secret, a password
in a URL or a card number never reaches the output, whoever wrote the log call.

The web (gunicorn, including its own logger), the worker and beat call
``configure`` (or hand ``dict_config`` to gunicorn) once at start.
"""

from __future__ import annotations

import logging
import logging.config
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from typing import Any

from pythonjsonlogger.json import JsonFormatter

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
refund_id_var: ContextVar[str | None] = ContextVar("refund_id", default=None)
task_id_var: ContextVar[str | None] = ContextVar("task_id", default=None)

_CONTEXT = {"request_id": request_id_var, "refund_id": refund_id_var, "task_id": task_id_var}

#: Environment variables whose values are secrets; their literal values are redacted too.
SECRET_ENV_VARS = (
    "JWT_SECRET", "STRIPE_API_KEY", "STRIPE_WEBHOOK_SECRET", "CONSOLE_SECRET_KEY", "METRICS_TOKEN",
)
MIN_LITERAL_SECRET = 8
REDACTED = "[REDACTED]"

# Libraries whose INFO lines are noise at night.
QUIET_LOGGERS = (
    "urllib3",
    "stripe",
    "kombu",
    "amqp",
    "tornado.access",
    "alembic.runtime.migration",
    # Celery's "Task ... received" and "... succeeded in" lines: two lines a refund that
    # the task's own line ("refund sent", with refund_id and task_id) and the task events
    # (Flower) already tell. Failures and retries are still logged, at WARNING and above.
    "celery.worker.strategy",
    "celery.app.trace",
)


# --------------------------------------------------------------------------- context


def bind(**ids: str | None) -> dict[str, Token[str | None]]:
    """Set request_id / refund_id / task_id for the rest of this thread's work."""
    return {name: _CONTEXT[name].set(value) for name, value in ids.items()}


def unbind(tokens: dict[str, Token[str | None]]) -> None:
    for name, token in tokens.items():
        _CONTEXT[name].reset(token)


@contextmanager
def log_context(**ids: str | None) -> Iterator[None]:
    """``with log_context(refund_id=r.id): ...`` - every line logged inside carries the id."""
    tokens = bind(**ids)
    try:
        yield
    finally:
        unbind(tokens)


class ContextFilter(logging.Filter):
    """Copies the bound ids onto each record (an explicit ``extra=`` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in _CONTEXT.items():
            value = var.get()
            if value is not None and getattr(record, name, None) is None:
                setattr(record, name, value)
        return True


# --------------------------------------------------------------------------- redaction

# 13-19 digits, maybe grouped by spaces or dashes, not part of an id or a decimal number.
_CARD_CANDIDATE = re.compile(r"(?<!\w)(?<!\d\.)(?:\d[ -]?){12,18}\d(?!\w)(?!\.\d)")
# Found in every text the pattern above matches, and searched for first: without the
# lookarounds it costs a third as much, and most lines hold no such run of digits.
_CARD_SHAPE = re.compile(r"\d[\d -]{11,}\d")
# Each pattern with a substring that every match contains (None: always run it), tested
# first: most lines hold none of them, and the regexes were most of the cost of a line.
# A needle is only given where case folding cannot defeat it (no i, k or s: Unicode
# folds other characters onto those).
_PATTERNS: tuple[tuple[re.Pattern[str], str, str | None], ...] = (
    # The whole value of an Authorization header, whatever its scheme.
    (
        re.compile(
            r"(?i)(authorization[\"']?\s*[:=]\s*[\"']?)(?:(?:bearer|basic|token)\s+)?[^\s\"',;]+"
        ),
        rf"\1{REDACTED}",
        "uthor",
    ),
    (re.compile(r"(?i)\bbearer\s+[A-Za-z0-9\-._~+/]+=*"), f"Bearer {REDACTED}", "bearer"),
    # A JWT anywhere (header.payload.signature, base64url).
    (re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"), REDACTED, "eyJ"),
    # Stripe secret and restricted keys, webhook signing secrets.
    (re.compile(r"\b(sk|rk)_[A-Za-z0-9_]+"), rf"\1_{REDACTED}", "k_"),
    (re.compile(r"\bwhsec_[A-Za-z0-9_]+"), f"whsec_{REDACTED}", "whsec_"),
    # The password in scheme://user:password@host.
    (
        re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/@\"']*:)[^\s@/\"']+@"),
        rf"\1{REDACTED}@",
        "://",
    ),
)


def _luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _mask_card(match: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", match.group(0))
    return "[REDACTED_PAN]" if 13 <= len(digits) <= 19 and _luhn_valid(digits) else match.group(0)


def _literal_secrets() -> tuple[str, ...]:
    values = [os.environ.get(name, "") for name in SECRET_ENV_VARS]
    for pair in os.environ.get("FLOWER_BASIC_AUTH", "").split(","):
        values.append(pair.partition(":")[2])
    return tuple(sorted({v for v in values if len(v) >= MIN_LITERAL_SECRET}, key=len, reverse=True))


def redact(text: str, literals: tuple[str, ...] = ()) -> str:
    """``text`` with anything that looks like a credential or a card number masked."""
    for literal in literals:
        text = text.replace(literal, REDACTED)
    folded = text.lower()
    for pattern, replacement, needle in _PATTERNS:
        if needle is None or needle in (folded if pattern.flags & re.IGNORECASE else text):
            text = pattern.sub(replacement, text)
    return _CARD_CANDIDATE.sub(_mask_card, text) if _CARD_SHAPE.search(text) else text


# --------------------------------------------------------------------------- formatting


class RedactingJsonFormatter(JsonFormatter):
    """python-json-logger's formatter; the finished line is redacted as a whole, so
    messages, extras and tracebacks are all covered."""

    def __init__(self, *args: Any, process_type: str = "app", **kwargs: Any) -> None:
        kwargs.setdefault("rename_fields", {"levelname": "level", "name": "logger"})
        kwargs.setdefault("static_fields", {"process_type": process_type})
        super().__init__("%(levelname)s %(name)s %(message)s", *args, **kwargs)
        self._literals = _literal_secrets()

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        log_data["time"] = datetime.fromtimestamp(record.created, tz=UTC).isoformat(
            timespec="milliseconds"
        )
        super().add_fields(log_data, record, message_dict)
        log_data.setdefault("pid", record.process)

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record), self._literals)


def dict_config(process_type: str, level: str | None = None) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` dict: everything to one JSON handler on stdout."""
    level = (level or os.environ.get("LOG_LEVEL") or "INFO").upper()
    if level not in logging.getLevelNamesMapping():
        sys.exit(f"configuration error: LOG_LEVEL: unknown level {level!r} (use INFO, DEBUG...)")
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"context": {"()": ContextFilter}},
        "formatters": {"json": {"()": RedactingJsonFormatter, "process_type": process_type}},
        "handlers": {
            "stdout": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stdout",
                "formatter": "json",
                "filters": ["context"],
            }
        },
        "root": {"level": level, "handlers": ["stdout"]},
        "loggers": {
            # gunicorn's own loggers: their handlers replaced, the error log's level left to
            # gunicorn; the access log is off because the app writes a richer line per request.
            "gunicorn.error": {"handlers": [], "propagate": True},
            "gunicorn.access": {"handlers": [], "propagate": True, "level": "WARNING"},
            **{name: {"level": "WARNING"} for name in QUIET_LOGGERS},
        },
    }


def configure(process_type: str, level: str | None = None) -> None:
    """Send every log record of this process to stdout as redacted JSON lines."""
    logging.config.dictConfig(dict_config(process_type, level))
    logging.captureWarnings(True)
