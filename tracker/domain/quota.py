"""Rate-limit arithmetic for Deepvue's per-key call quotas.

Deepvue limits each API key per second, per minute and per day, each window checked on its
own, and does not say whether it counts fixed or sliding windows. A sliding log is the
conservative reading: if no interval of a window's length ever holds more than `limit` call
starts, then no fixed window of that length can either, wherever its boundaries fall.

Pure: the caller passes the time (float seconds from a monotonic clock) into every method.
Time must not go backwards between calls, since entries that have left a window are dropped.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["PLANS", "SlidingWindowQuota", "Window", "plan_windows"]

# Float slack when deciding that a start has left its window: `now + wait_time(now)` can land
# a rounding error short of the exact boundary, and a caller that waited as told must then be
# let through rather than be told to wait another 4e-16 s. A nanosecond loosens no real limit.
_EPSILON = 1e-9

# Deepvue's published plans: (per second, per minute, per day) per API key.
PLANS: Mapping[str, tuple[int, int, int]] = {
    "starter": (1, 30, 1000),
    "business": (2, 100, 10000),
    "growth": (5, 500, 20000),
    "enterprise": (17, 1000, 50000),
}


@dataclass(frozen=True)
class Window:
    limit: int  # at most this many call starts...
    seconds: float  # ...in any interval of this length
    name: str  # "second", "minute", "day": the key in `usage()`

    def __post_init__(self) -> None:
        # A zero limit would block forever and a zero length would count nothing: both are
        # configuration mistakes better refused at start-up than discovered as a stall.
        if self.limit < 1:
            raise ValueError(f"window {self.name!r}: limit must be at least 1, got {self.limit}")
        if not self.seconds > 0:
            raise ValueError(f"window {self.name!r}: seconds must be > 0, got {self.seconds}")


def plan_windows(per_second: int, per_minute: int, per_day: int) -> list[Window]:
    return [
        Window(limit=per_second, seconds=1.0, name="second"),
        Window(limit=per_minute, seconds=60.0, name="minute"),
        Window(limit=per_day, seconds=86400.0, name="day"),
    ]


class _Log:
    """The start times of the most recent calls of one window.

    Only the newest `limit` starts can ever decide anything (the oldest of them is the one
    that must leave before another call fits), so the deque is capped at `limit`: memory stays
    bounded even if the caller records calls the quota did not allow.
    """

    def __init__(self, window: Window) -> None:
        self.window = window
        self.starts: deque[float] = deque(maxlen=window.limit)

    def active(self, now: float) -> int:
        # A start at t counts while now - t < seconds: half-open (now - seconds, now], so two
        # starts exactly `seconds` apart never share a window of that length.
        while self.starts and now - self.starts[0] >= self.window.seconds - _EPSILON:
            self.starts.popleft()
        return len(self.starts)

    def wait_time(self, now: float) -> float:
        if self.active(now) < self.window.limit:
            return 0.0
        # Full: the next call fits once the oldest start has left the window.
        return max(self.starts[0] + self.window.seconds - now, 0.0)


class SlidingWindowQuota:
    """Several windows (say per second, minute and day), each enforced independently."""

    def __init__(self, windows: Sequence[Window]) -> None:
        if not windows:
            raise ValueError("a quota needs at least one window")
        names = [w.name for w in windows]
        if len(set(names)) != len(names):
            raise ValueError(f"window names must be unique, got {names}")
        self._logs = [_Log(w) for w in windows]

    @property
    def windows(self) -> list[Window]:
        return [log.window for log in self._logs]

    def wait_time(self, now: float) -> float:
        """0.0 if a call may start now, else seconds until one may.

        Waiting for the slowest window is enough: while nobody records, windows only empty.
        """
        return max(log.wait_time(now) for log in self._logs)

    def record(self, now: float) -> None:
        """A call started at `now` (recorded even if over quota: the server counts it too)."""
        for log in self._logs:
            log.active(now)
            log.starts.append(now)

    def capacity(self, now: float) -> int:
        """How many calls could start right now, back to back."""
        return max(min(log.window.limit - log.active(now) for log in self._logs), 0)

    def usage(self, now: float) -> dict[str, tuple[int, int]]:
        """Window name -> (calls started within it, its limit)."""
        return {log.window.name: (log.active(now), log.window.limit) for log in self._logs}
