"""The simulator's per-key rate limits: sliding windows of admitted calls."""

from __future__ import annotations

from collections import deque


class RateLimiter:
    """Independent sliding windows per API key; only admitted calls consume quota."""

    def __init__(self, limits: list[tuple[float, int]]) -> None:
        self._limits = limits
        self._hits: dict[str, list[deque[float]]] = {}

    @property
    def enabled(self) -> bool:
        return bool(self._limits)

    def allow(self, key: str, now: float) -> bool:
        queues = self._hits.get(key)
        if queues is None:
            queues = self._hits[key] = [deque() for _ in self._limits]
        for (window, limit), hits in zip(self._limits, queues, strict=True):
            cutoff = now - window
            while hits and hits[0] <= cutoff:
                hits.popleft()
            if len(hits) >= limit:
                return False
        for hits in queues:
            hits.append(now)
        return True
