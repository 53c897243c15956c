"""How the console writes amounts, ages and its chart: pure functions, no browser."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from api.console import format as fmt
from api.console.chart import per_minute_chart
from shared.services.console_queries import MinuteBucket

NOW = datetime(2026, 11, 26, 13, 40, 5, tzinfo=UTC)


@pytest.mark.parametrize(
    ("amount", "currency", "shown"),
    [(123456, "usd", "1,234.56 USD"), (5, "eur", "0.05 EUR"), (1500, "jpy", "1,500 JPY"),
     (1500, "kwd", "1.500 KWD")],
)
def test_money_uses_the_currency_s_minor_unit(amount: int, currency: str, shown: str) -> None:
    assert fmt.money(amount, currency) == shown


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(0, "0 s"), (59, "59 s"), (60, "1 min"), (200, "3 min 20 s"), (7500, "2 h 5 min"),
     (7200, "2 h"), (3 * 86400 + 4 * 3600 + 5, "3 d 4 h")],
)
def test_durations_read_like_a_person_says_them(seconds: int, shown: str) -> None:
    assert fmt.duration(timedelta(seconds=seconds)) == shown


def test_times_are_utc_with_a_relative_age() -> None:
    berlin = NOW.astimezone(ZoneInfo("Europe/Berlin"))
    assert fmt.utc(berlin) == "2026-11-26 13:40:05 UTC"
    assert fmt.iso(berlin) == "2026-11-26T13:40:05Z"
    assert fmt.ago(NOW - timedelta(minutes=5), NOW) == "5 min ago"
    assert fmt.ago(NOW + timedelta(minutes=2), NOW) == "in 2 min"


def test_chart_scales_to_the_busiest_minute_and_keeps_every_minute() -> None:
    minutes = [MinuteBucket(minute=NOW.replace(second=0) - timedelta(minutes=59 - i),
                            initiated=i % 7, succeeded=i % 5, failed=1 if i == 30 else 0)
               for i in range(60)]
    chart = per_minute_chart(minutes)
    assert [t.label for t in chart.y_ticks] == ["10", "5", "0"]  # 6 is the peak: 10 holds it
    assert len(chart.bars) == 60 and len(chart.failed.split()) == 60
    assert chart.total_initiated == sum(m.initiated for m in minutes)
    tallest = min(bar.y for bar in chart.bars)
    assert all(chart.top <= bar.y <= chart.bottom_edge for bar in chart.bars)
    assert tallest > chart.top  # 6 of 10: not the full height
    assert [t.label for t in chart.x_ticks][-1] == "now"
    assert "12:41 UTC: 0 initiated" in chart.bars[0].title
