"""The call budget: where it lives (in memory for one process, or in the database for a
cluster), and the Throttle that paces this process's calls against it.

Both apply the same arithmetic (tracker.domain.quota.QuotaLedger). The database budget
takes its time from the database server, so instances on hosts with drifting clocks still
count in the same buckets, and it serialises reservations on the single
tracker_quota_state row.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from tracker.domain.quota import Grant, QuotaLedger, Window
from tracker.schema import quota_state, quota_usage

# The longest wait for a permit that a call sleeps through by default; beyond it the throttle
# raises CallsPaused, so that the caller can hand its batch back instead of holding it.
DEFAULT_LONGEST_WAIT = 5.0
# Never sleep less than this in the throttle loop: float rounding can leave a wait of 1e-12 s,
# which a clock might not advance past, turning the loop into a spin.
_MIN_SLEEP = 0.001


class Budget(Protocol):
    async def reserve(self, want: int) -> Grant: ...

    async def release(self, grant: Grant, unused: int) -> None: ...

    async def pause(self, seconds: float) -> None: ...

    async def usage(self) -> dict[str, tuple[int, int]]: ...

    async def snapshot(self) -> tuple[QuotaLedger, float]:
        """The ledger as it stands, and the budget's own clock (for the schedule)."""
        ...


class MemoryBudget:
    """A budget private to this process (tests, simulations)."""

    def __init__(self, windows: Sequence[Window], clock: Callable[[], float] = time.time) -> None:
        self.ledger = QuotaLedger(windows)
        self._clock = clock

    async def reserve(self, want: int) -> Grant:
        return self.ledger.reserve(self._clock(), want)

    async def release(self, grant: Grant, unused: int) -> None:
        self.ledger.release(grant, unused)

    async def pause(self, seconds: float) -> None:
        self.ledger.pause(self._clock(), seconds)

    async def usage(self) -> dict[str, tuple[int, int]]:
        return self.ledger.used(self._clock())

    async def snapshot(self) -> tuple[QuotaLedger, float]:
        return self.ledger, self._clock()


class DatabaseBudget:
    """The budget shared by every instance using this database; survives restarts."""

    def __init__(self, engine: sa.Engine, windows: Sequence[Window]) -> None:
        self._engine = engine
        self._windows = tuple(windows)
        self._postgres = engine.dialect.name == "postgresql"
        # Built once: a reservation runs these for every claim, and building and
        # cache-keying fresh statements cost more CPU than running them.
        usage = quota_usage.c
        self._usage_query = sa.select(usage.bucket, usage.used).where(
            usage.window_name == sa.bindparam("window_name"),
            usage.bucket >= sa.bindparam("first_bucket"),
        )
        insert = (postgresql.insert if self._postgres else sqlite.insert)(quota_usage)
        self._count_usage = insert.on_conflict_do_update(
            index_elements=["window_name", "bucket"],
            set_={"used": usage.used + insert.excluded.used},
        )
        self._forget_usage = quota_usage.delete().where(
            usage.window_name == sa.bindparam("window_name"),
            usage.bucket < sa.bindparam("first_bucket"),
        )

    async def reserve(self, want: int) -> Grant:
        return await asyncio.to_thread(self.reserve_now, want)

    async def release(self, grant: Grant, unused: int) -> None:
        if unused > 0 and grant.buckets:
            await asyncio.to_thread(self._release, grant, unused)

    async def pause(self, seconds: float) -> None:
        await asyncio.to_thread(self._pause, seconds)

    async def usage(self) -> dict[str, tuple[int, int]]:
        return await asyncio.to_thread(self.usage_now)

    async def snapshot(self) -> tuple[QuotaLedger, float]:
        return await asyncio.to_thread(self.snapshot_now)

    def snapshot_now(self) -> tuple[QuotaLedger, float]:
        with self._engine.begin() as connection:
            return self._load(connection, lock=False)

    def reserve_now(self, want: int) -> Grant:
        with self._engine.begin() as connection:
            ledger, now = self._load(connection, lock=True)
            grant = ledger.reserve(now, want)
            if grant.granted:
                self._count(connection, grant)
                self._forget_old(connection, now)
        return grant

    def usage_now(self) -> dict[str, tuple[int, int]]:
        with self._engine.begin() as connection:
            ledger, now = self._load(connection, lock=False)
        return ledger.used(now)

    def _now(self, connection: sa.Connection) -> float:
        if self._postgres:
            return float(
                connection.execute(
                    sa.text("SELECT EXTRACT(EPOCH FROM clock_timestamp())")
                ).scalar_one()
            )
        # SQLite lives on one host: its clock is the shared clock.
        return time.time()

    def _load(self, connection: sa.Connection, *, lock: bool) -> tuple[QuotaLedger, float]:
        query = sa.select(quota_state.c.paused_until).where(quota_state.c.id == 1)
        if lock:
            # Reservations take turns on this row (SQLite's BEGIN IMMEDIATE already does).
            query = query.with_for_update()
        paused_until = connection.execute(query).scalar_one_or_none()
        now = self._now(connection)
        ledger = QuotaLedger(self._windows)
        if paused_until is not None:
            ledger.paused_until = paused_until
        for window in self._windows:
            rows = connection.execute(
                self._usage_query,
                {"window_name": window.name, "first_bucket": window.first_counted_bucket(now)},
            )
            ledger.usage[window.name] = {bucket: used for bucket, used in rows}
        return ledger, now

    def _count(self, connection: sa.Connection, grant: Grant) -> None:
        for name, bucket in grant.buckets:
            connection.execute(
                self._count_usage, {"window_name": name, "bucket": bucket, "used": grant.granted}
            )

    def _forget_old(self, connection: sa.Connection, now: float) -> None:
        for window in self._windows:
            connection.execute(
                self._forget_usage,
                {"window_name": window.name, "first_bucket": window.first_counted_bucket(now)},
            )

    def _release(self, grant: Grant, unused: int) -> None:
        with self._engine.begin() as connection:
            for name, bucket in grant.buckets:
                connection.execute(
                    quota_usage.update()
                    .where(quota_usage.c.window_name == name, quota_usage.c.bucket == bucket)
                    .values(
                        used=sa.case(
                            (quota_usage.c.used > unused, quota_usage.c.used - unused), else_=0
                        )
                    )
                )

    def _pause(self, seconds: float) -> None:
        with self._engine.begin() as connection:
            ledger, now = self._load(connection, lock=True)
            ledger.pause(now, seconds)
            connection.execute(
                quota_state.update()
                .where(quota_state.c.id == 1)
                .values(paused_until=ledger.paused_until)
            )


class CallsPaused(Exception):
    """No call may start for `seconds` more: longer than the throttle's `longest_wait`.

    Raised instead of sleeping through a 429's pause (here or, through the shared budget,
    in another instance) or a long wait for the quota, so that a worker does not sit on a
    claimed batch meanwhile. Nothing was sent and nothing counted: the batch may be handed
    back untouched. `Throttle.wait_time()` says when to try again.
    """

    def __init__(self, seconds: float) -> None:
        super().__init__(f"API calls paused for {seconds:.1f} s more")
        self.seconds = seconds


@dataclass
class _Reservation:
    reserved_at: float
    grant: Grant
    left: int


class Throttle:
    """Paces this process's status calls against a (possibly cluster-wide) Budget.

    The sweep reserves permits for the batches it is about to claim; each status call then
    takes one. Permits are used within `permit_ttl` of being reserved or given back: the
    budget counted them at reservation time, and a permit used much later could push a
    window over its limit. A 429 pauses the whole budget, not just this process.

    `acquire()` sleeps through short waits (the per-second window); a wait longer than
    `longest_wait` (a pause, or a spent minute or day) raises CallsPaused instead.
    Create it inside the event loop that uses it.
    """

    def __init__(
        self,
        budget: Budget,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        permit_ttl: float = 0.1,
        longest_wait: float = DEFAULT_LONGEST_WAIT,
    ) -> None:
        self._budget = budget
        self._monotonic = monotonic
        self._sleep = sleep
        self._permit_ttl = permit_ttl
        self._longest_wait = longest_wait
        self._paused_until = -math.inf
        self._free_at = -math.inf  # when the budget said the next permit may come
        self._pool: list[_Reservation] = []

    async def reserve(self, want: int) -> int:
        """Reserve up to `want` permits for calls about to start; how many were granted."""
        await self._expire_pool()
        now = self._monotonic()
        if want <= 0 or now < self._paused_until:
            return 0
        grant = await self._budget.reserve(want)
        if grant.granted == 0:
            self._free_at = self._monotonic() + grant.wait
            return 0
        self._pool.append(_Reservation(self._monotonic(), grant, grant.granted))
        return grant.granted

    async def give_back(self, count: int = 1) -> None:
        """Return reserved permits that will not be used (a batch needed no status call)."""
        while count > 0 and self._pool:
            reservation = self._pool[0]
            returned = min(count, reservation.left)
            reservation.left -= returned
            count -= returned
            if reservation.left == 0:
                self._pool.pop(0)
            await self._budget.release(reservation.grant, returned)

    @property
    def longest_wait(self) -> float:
        """The longest wait `acquire()` sleeps through rather than raising CallsPaused."""
        return self._longest_wait

    def check_paused(self) -> None:
        """Raise CallsPaused if this process's own pause outlasts `longest_wait` (no I/O)."""
        left = self._paused_until - self._monotonic()
        if left > self._longest_wait:
            raise CallsPaused(left)

    async def acquire(self) -> None:
        """Wait until a call may start and take its permit.

        Raises CallsPaused, having taken nothing, when the wait would be longer than
        `longest_wait`: the pool's permits then go back to the budget, since none of them
        could be used in time.
        """
        while True:
            await self._expire_pool()
            now = self._monotonic()
            if now < self._paused_until:
                await self._wait(self._paused_until - now)
                continue
            if self._pool:
                self._pool[0].left -= 1
                if self._pool[0].left == 0:
                    self._pool.pop(0)
                return
            grant = await self._budget.reserve(1)
            if grant.granted:
                return
            # The budget may be paused by another instance: its wait covers that too.
            self._free_at = self._monotonic() + grant.wait
            await self._wait(grant.wait)

    async def _wait(self, seconds: float) -> None:
        if seconds > self._longest_wait:
            await self._return_pool()
            raise CallsPaused(seconds)
        await self._sleep(max(seconds, _MIN_SLEEP))

    async def pause(self, seconds: float) -> None:
        """No call starts before now + seconds, in this process and in every other one."""
        if not math.isfinite(seconds) or seconds <= 0:
            return  # an infinite pause would stop the service for good; NaN means nothing
        self._paused_until = max(self._paused_until, self._monotonic() + seconds)
        await self._budget.pause(seconds)

    def paused_for(self) -> float:
        """Seconds left of this process's pause (0.0 when not paused).

        A pause that another instance put on the shared budget is learnt by asking the
        budget for a permit; it shows in `wait_time()`.
        """
        return max(self._paused_until - self._monotonic(), 0.0)

    def wait_time(self) -> float:
        """Seconds until a permit may be had, as last heard from the budget."""
        now = self._monotonic()
        return max(self._paused_until - now, self._free_at - now, 0.0)

    async def usage(self) -> dict[str, tuple[int, int]]:
        return await self._budget.usage()

    async def snapshot(self) -> tuple[QuotaLedger, float]:
        """The budget's ledger as it stands, and the budget's own clock (for the schedule)."""
        return await self._budget.snapshot()

    async def _expire_pool(self) -> None:
        now = self._monotonic()
        while self._pool and now - self._pool[0].reserved_at > self._permit_ttl:
            expired = self._pool.pop(0)
            await self._budget.release(expired.grant, expired.left)

    async def _return_pool(self) -> None:
        while self._pool:
            unused = self._pool.pop(0)
            await self._budget.release(unused.grant, unused.left)
