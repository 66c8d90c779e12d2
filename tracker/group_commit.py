"""The write buffer: batch writes and lease keep-alives from concurrent workers, committed
together in one transaction while the previous one runs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime

import sqlalchemy as sa
import structlog

from tracker.db import describe_db_error
from tracker.store import BatchWrite, LeaseExtension, Store, WriteRefused, connection_lost

log = structlog.get_logger("tracker.sweep")


class GroupCommit:
    """Writes (and lease keep-alives) from concurrent workers, committed together while the
    previous commit runs.

    A worker awaits its own write and learns whether it still held its lease (or, with
    WriteRefused, that this one write could not be applied). While one
    transaction is in flight the next writes queue up and go in the following one, so
    commits stay few under load and immediate when idle.

    When the database is unreachable the group is retried with backoff for up to
    `outage_patience` seconds, so a restart of PostgreSQL delays transitions instead of
    losing them. Retrying is safe: every write is guarded by its lease token and the state
    it read, so a write that did commit before the connection dropped cannot apply twice.
    """

    def __init__(
        self,
        store: Store,
        clock: Callable[[], datetime],
        *,
        max_group: int = 256,
        outage_patience: float = 60.0,
    ) -> None:
        self._store = store
        self._clock = clock
        self._max_group = max_group
        self._outage_patience = outage_patience
        self._queue: list[tuple[BatchWrite | LeaseExtension, asyncio.Future[bool]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def write(self, write: BatchWrite | LeaseExtension) -> bool:
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queue.append((write, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        while self._queue:
            group = self._queue[: self._max_group]
            del self._queue[: self._max_group]
            try:
                applied = await self._apply_with_retry([write for write, _ in group])
            except Exception as error:
                for _, future in group:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, future), outcome in zip(group, applied, strict=True):
                if future.done():
                    continue
                if isinstance(outcome, WriteRefused):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)

    async def _apply_with_retry(
        self, writes: list[BatchWrite | LeaseExtension]
    ) -> list[bool | WriteRefused]:
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self._outage_patience
        delay = 0.5
        while True:
            try:
                return await asyncio.to_thread(self._store.apply, writes, self._clock())
            except sa.exc.DBAPIError as error:
                if not connection_lost(error) or loop.time() + delay > give_up_at:
                    raise
                log.warning(
                    "db.unreachable",
                    retry_in=delay,
                    writes=len(writes),
                    error=describe_db_error(error),
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
