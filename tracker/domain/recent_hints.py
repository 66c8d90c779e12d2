"""The request_ids a webhook listener asked the database about lately, to ask once.

Within `TRACKER_POLL_MIN_INTERVAL` of asking, the database's answer for an id cannot change
in a way a hint matters to: a batch brought forward is not brought forward again that soon
(Store.bring_forward's spacing), a finished one stays finished, one already due is checked
anyway, and an id inserted later is checked at once. So a flood of deliveries naming the
same batches costs one database write per id and spacing, and the rest is HTTP handling.
Pure: the caller passes the (monotonic) time.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection

__all__ = ["RecentlyAsked"]


class RecentlyAsked:
    """Ids asked within the last `spacing` seconds, at most `capacity` of them."""

    def __init__(self, spacing: float, capacity: int = 100_000) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self._spacing = max(spacing, 0.0)
        self._capacity = capacity
        self._asked_at: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._asked_at)

    def claim(self, request_ids: Collection[str], now: float) -> set[str]:
        """The ids not asked within the spacing, now counted as asked at `now`.

        Claimed before the database is asked, so that deliveries arriving together ask
        once; `forget` them if the asking failed.
        """
        self._expire(now)
        fresh = {request_id for request_id in request_ids if request_id not in self._asked_at}
        for request_id in fresh:
            self._asked_at[request_id] = now
        while len(self._asked_at) > self._capacity:
            # The oldest go first: ids are kept in the order they were asked.
            self._asked_at.popitem(last=False)
        return fresh

    def forget(self, request_ids: Collection[str]) -> None:
        for request_id in request_ids:
            self._asked_at.pop(request_id, None)

    def _expire(self, now: float) -> None:
        while self._asked_at:
            oldest, asked_at = next(iter(self._asked_at.items()))
            if now - asked_at < self._spacing:
                return
            del self._asked_at[oldest]
