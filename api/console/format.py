"""How the console writes amounts, times and ages: UTC always, with the age beside it."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

#: Stripe's zero-decimal currencies: their amounts are already whole units.
ZERO_DECIMAL = frozenset(
    {"bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga"}
    | {"pyg", "rwf", "ugx", "vnd", "vuv", "xaf", "xof", "xpf"}
)
NONE = "\u2013"  # an en dash: "nothing here"
#: Stripe counts these in thousandths.
THREE_DECIMAL = frozenset({"bhd", "jod", "kwd", "omr", "tnd"})


def money(amount: int, currency: str) -> str:
    code = currency.lower()
    digits = 0 if code in ZERO_DECIMAL else 3 if code in THREE_DECIMAL else 2
    units = f"{amount:,}" if digits == 0 else f"{amount / 10**digits:,.{digits}f}"
    return f"{units} {code.upper()}"


def utc(moment: datetime | None) -> str:
    if moment is None:
        return NONE
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def duration(span: timedelta) -> str:
    """Two units at most, the way a person reads an age: 45 s, 3 min 20 s, 2 h 5 min, 3 d 4 h."""
    seconds = max(int(span.total_seconds()), 0)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h" if hours else f"{days} d"
    if hours:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    if minutes:
        return f"{minutes} min {secs} s" if secs else f"{minutes} min"
    return f"{secs} s"


def ago(moment: datetime, now: datetime) -> str:
    if moment > now + timedelta(seconds=1):
        return f"in {duration(moment - now)}"
    return f"{duration(now - moment)} ago"


def percent(rate: float | None) -> str:
    if rate is None:
        return NONE
    return f"{rate * 100:.1f} %"


def detail(value: Any) -> str:
    """An audit event's detail as JSON text; the template escapes it like any other text."""
    return json.dumps(value, ensure_ascii=False, default=str)
