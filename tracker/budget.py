"""Where the call budget lives: in memory (one process) or in the database (a cluster).

Both apply the same arithmetic (tracker.domain.quota.QuotaLedger). The database budget
takes its time from the database server, so instances on hosts with drifting clocks still
count in the same buckets, and it serialises reservations on the single
tracker_quota_state row.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from tracker.domain.quota import Grant, QuotaLedger, Window
from tracker.schema import quota_state, quota_usage


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
