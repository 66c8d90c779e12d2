"""The overview's calls-per-hour chart as plain geometry for an inline SVG.

Server-side: the page needs no script, and the CSP forbids inline styles, which CSS bars
would need for their heights. SVG's own attributes (x, y, height) are not styles.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

WIDTH = 480
PLOT_HEIGHT = 100  # the tallest bar; below it, a line of hour labels
HEIGHT = PLOT_HEIGHT + 20
TICK_EVERY = 6  # hours between labels


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    title: str  # "13:00 UTC: 42 calls", shown on hover
    tick: str | None  # the hour under the bar, every few bars


def hour_bars(hourly: Sequence[tuple[datetime, int]]) -> list[Bar]:
    """One bar per hour, scaled to the busiest; an idle hour still shows a 1-unit stub."""
    if not hourly:
        return []
    slot = WIDTH / len(hourly)
    busiest = max(calls for _, calls in hourly) or 1
    bars = []
    for index, (start, calls) in enumerate(hourly):
        height = max(1.0, round(PLOT_HEIGHT * calls / busiest, 1))
        bars.append(
            Bar(
                x=round(index * slot + 1, 1),
                y=round(PLOT_HEIGHT - height, 1),
                width=round(slot - 2, 1),
                height=height,
                title=f"{start:%H}:00 UTC: {calls} call{'s' if calls != 1 else ''}",
                tick=f"{start:%H}:00" if index % TICK_EVERY == 0 else None,
            )
        )
    return bars
