"""The database's clock, as this process sees it.

Several hosts share one PostgreSQL, and their own clocks may disagree by minutes. Whatever
instances compare with each other (leases, due times, the maximum age) is measured on the
database's clock instead: read from the database at every heartbeat and carried forward
in between with the monotonic clock, which no step or slew of the host's clock moves.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta


class DatabaseClock:
    """Now, on the database's clock, to within a round trip of the last reading."""

    def __init__(
        self, database_now: datetime, *, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self._monotonic = monotonic
        self._read_at = monotonic()
        self._reading = database_now.astimezone(UTC)

    def sync(self, database_now: datetime) -> None:
        """Take a fresh reading (the database's now, as a statement just returned it)."""
        self._read_at = self._monotonic()
        self._reading = database_now.astimezone(UTC)

    def now(self) -> datetime:
        # The reading was taken before it reached us, so this lags the database by up to a
        # round trip: the safe side, since a lagging clock never sees a live lease as expired.
        return self._reading + timedelta(seconds=self._monotonic() - self._read_at)
