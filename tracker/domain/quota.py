"""Rate-limit arithmetic for Deepvue's per-key call quotas, shareable through a database.

Each window (second, minute, day) is read as sliding and counted in small buckets that never
under-count, so the state fits one row per bucket (docs/polling.md, "The call budget").
Pure: time (float seconds on a clock every sharer agrees on) is always passed in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "PLANS",
    "Grant",
    "QuotaLedger",
    "Usage",
    "Window",
    "calls_per_hour",
    "grantable",
    "plan_windows",
]

# Deepvue's published plans: (per second, per minute, per day) per API key.
PLANS: Mapping[str, tuple[int, int, int]] = {
    "starter": (1, 30, 1000),
    "business": (2, 100, 10000),
    "growth": (5, 500, 20000),
    "enterprise": (17, 1000, 50000),
}

# window name -> bucket number -> calls counted in that bucket
Usage = Mapping[str, Mapping[int, int]]


@dataclass(frozen=True)
class Window:
    name: str  # "second", "minute", "day"
    limit: int  # at most this many call starts...
    seconds: float  # ...in any interval of this length
    bucket: float  # width of one counting bucket
    margin: float = 0.0  # extra width, for the reserve-to-arrival delay

    def __post_init__(self) -> None:
        # A zero limit would block forever and a zero length would count nothing: both are
        # configuration mistakes better refused at start-up than discovered as a stall.
        if self.limit < 1:
            raise ValueError(f"window {self.name!r}: limit must be at least 1, got {self.limit}")
        if not (self.seconds > 0 and self.bucket > 0 and self.margin >= 0):
            raise ValueError(f"window {self.name!r}: lengths must be positive")

    def bucket_of(self, now: float) -> int:
        return math.floor(now / self.bucket)

    def first_counted_bucket(self, now: float) -> int:
        """The oldest bucket that may still hold a call inside the (widened) window."""
        return math.floor((now - self.seconds - self.margin) / self.bucket)

    def used(self, buckets: Mapping[int, int], now: float) -> int:
        first = self.first_counted_bucket(now)
        return sum(count for bucket, count in buckets.items() if bucket >= first)

    def free_at(self, buckets: Mapping[int, int], now: float) -> float:
        """When at least one more call fits in this window (`now` if one fits already)."""
        if self.used(buckets, now) < self.limit:
            return now
        first = self.first_counted_bucket(now)
        oldest = min(bucket for bucket, count in buckets.items() if bucket >= first and count)
        # The oldest bucket stops counting once first_counted_bucket(t) passes it; the
        # microsecond guards against float rounding landing just short of the boundary.
        return (oldest + 1) * self.bucket + self.seconds + self.margin + 1e-6


def plan_windows(
    per_second: int, per_minute: int, per_day: int, *, margin: float = 0.15
) -> list[Window]:
    """The three Deepvue windows; `margin` covers reserve-to-arrival delay and clock jitter."""
    return [
        Window("second", per_second, 1.0, 0.1, margin),
        Window("minute", per_minute, 60.0, 1.0, margin),
        Window("day", per_day, 86400.0, 60.0, margin),
    ]


def grantable(windows: Sequence[Window], usage: Usage, now: float, want: int) -> int:
    """How many of `want` calls may start at `now`."""
    room = min(window.limit - window.used(usage.get(window.name, {}), now) for window in windows)
    return max(0, min(want, room))


def wait_time(windows: Sequence[Window], usage: Usage, now: float) -> float:
    """Seconds until one more call fits in every window."""
    return max(
        max(window.free_at(usage.get(window.name, {}), now) for window in windows) - now, 0.0
    )


@dataclass(frozen=True)
class Grant:
    """Calls reserved at `at`, counted in one bucket per window."""

    granted: int
    at: float
    buckets: tuple[tuple[str, int], ...] = ()
    wait: float = 0.0  # when nothing was granted: seconds until something may be


@dataclass
class QuotaLedger:
    """An in-memory budget: the same arithmetic the database budget applies to its rows."""

    windows: Sequence[Window]
    usage: dict[str, dict[int, int]] = field(default_factory=dict)
    paused_until: float = -math.inf

    def reserve(self, now: float, want: int) -> Grant:
        if now < self.paused_until:
            return Grant(0, now, wait=self.paused_until - now)
        granted = grantable(self.windows, self.usage, now, want)
        if granted == 0:
            return Grant(0, now, wait=wait_time(self.windows, self.usage, now))
        buckets = tuple((w.name, w.bucket_of(now)) for w in self.windows)
        for name, bucket in buckets:
            per_window = self.usage.setdefault(name, {})
            per_window[bucket] = per_window.get(bucket, 0) + granted
        self._forget_old(now)
        return Grant(granted, now, buckets)

    def release(self, grant: Grant, unused: int) -> None:
        """Give back calls that were reserved but never made."""
        for name, bucket in grant.buckets:
            per_window = self.usage.get(name, {})
            if bucket in per_window:
                per_window[bucket] = max(0, per_window[bucket] - unused)

    def pause(self, now: float, seconds: float) -> None:
        """No call starts before now + seconds (extends a pause, never shortens it)."""
        if math.isfinite(seconds) and seconds > 0:
            self.paused_until = max(self.paused_until, now + seconds)

    def used(self, now: float) -> dict[str, tuple[int, int]]:
        return {w.name: (w.used(self.usage.get(w.name, {}), now), w.limit) for w in self.windows}

    def _forget_old(self, now: float) -> None:
        for window in self.windows:
            first = window.first_counted_bucket(now)
            per_window = self.usage.get(window.name, {})
            for bucket in [b for b in per_window if b < first]:
                del per_window[bucket]


def calls_per_hour(
    window: Window, buckets: Mapping[int, int], now: float, hours: int = 24
) -> list[tuple[float, int]]:
    """(hour start, calls counted) for the hour holding `now` and the `hours - 1` before it.

    Read from one window's buckets (the day window keeps a day of them, minute by minute),
    so the chart needs no bookkeeping of its own. A bucket counts towards the hour it
    starts in; `window.bucket` divides an hour for the windows the tracker uses.
    """
    current = math.floor(now / 3600)
    first = current - hours + 1
    totals = dict.fromkeys(range(first, current + 1), 0)
    for bucket, count in buckets.items():
        hour = math.floor(bucket * window.bucket / 3600)
        if hour in totals:
            totals[hour] += count
    return [(hour * 3600.0, totals[hour]) for hour in range(first, current + 1)]
