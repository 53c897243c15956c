"""The overview's per-minute chart, drawn as inline SVG on the server: no script, no
build step, nothing for the Content-Security-Policy to allow."""

from __future__ import annotations

from dataclasses import dataclass

from shared.services.console_queries import MinuteBucket

WIDTH = 960
HEIGHT = 220
LEFT = 40
RIGHT = 10
TOP = 12
BOTTOM = 28


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    title: str


@dataclass(frozen=True)
class Tick:
    position: float
    label: str


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    left: int
    right_edge: int
    bottom_edge: int
    top: int
    bars: list[Bar]
    succeeded: str  # SVG polyline points
    failed: str
    y_ticks: list[Tick]
    x_ticks: list[Tick]
    total_initiated: int
    total_succeeded: int
    total_failed: int


def _nice_ceiling(value: int) -> int:
    """The smallest of 2, 4, 10, 20, 40, 100... that holds ``value``: round half-way ticks."""
    magnitude = 1
    while True:
        for step in (2, 4, 10):
            if value <= step * magnitude:
                return step * magnitude
        magnitude *= 10


def per_minute_chart(minutes: list[MinuteBucket]) -> Chart:
    plot_w = WIDTH - LEFT - RIGHT
    plot_h = HEIGHT - TOP - BOTTOM
    peak = max((max(m.initiated, m.succeeded, m.failed) for m in minutes), default=0)
    y_max = _nice_ceiling(peak)
    slot = plot_w / max(len(minutes), 1)

    def y(value: int) -> float:
        return round(TOP + plot_h - plot_h * value / y_max, 1)

    def centre(i: int) -> float:
        return round(LEFT + slot * i + slot / 2, 1)

    bars = []
    for i, m in enumerate(minutes):
        label = (
            f"{m.minute:%H:%M} UTC: {m.initiated} initiated, "
            f"{m.succeeded} succeeded, {m.failed} failed or canceled"
        )
        top = y(m.initiated)
        bars.append(
            Bar(
                x=round(LEFT + slot * i + slot * 0.15, 1),
                y=top,
                width=round(slot * 0.7, 1),
                height=round(TOP + plot_h - top, 1),
                title=label,
            )
        )
    succeeded = " ".join(f"{centre(i)},{y(m.succeeded)}" for i, m in enumerate(minutes))
    failed = " ".join(f"{centre(i)},{y(m.failed)}" for i, m in enumerate(minutes))
    y_ticks = [Tick(position=y(v), label=str(v)) for v in (y_max, y_max // 2, 0)]
    x_ticks = [
        Tick(position=centre(i), label=f"{minutes[i].minute:%H:%M}")
        for i in range(0, len(minutes), 15)
    ]
    if minutes:
        x_ticks.append(Tick(position=centre(len(minutes) - 1), label="now"))
    return Chart(
        width=WIDTH,
        height=HEIGHT,
        left=LEFT,
        right_edge=WIDTH - RIGHT,
        bottom_edge=TOP + plot_h,
        top=TOP,
        bars=bars,
        succeeded=succeeded,
        failed=failed,
        y_ticks=y_ticks,
        x_ticks=x_ticks,
        total_initiated=sum(m.initiated for m in minutes),
        total_succeeded=sum(m.succeeded for m in minutes),
        total_failed=sum(m.failed for m in minutes),
    )
