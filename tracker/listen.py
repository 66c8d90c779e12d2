"""Instant pickup on PostgreSQL: LISTEN for the insert trigger's NOTIFY and wake the sweep.

The interval sweep stays as the safety net; this only makes a new row's first check happen
within milliseconds instead of at the next tick. The listener reconnects with backoff
after the database restarts, and wakes the sweep once on reconnecting in case a row
arrived while it was deaf.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import sqlalchemy as sa
import structlog

log = structlog.get_logger("tracker.listen")

WAKEUP_CHANNEL = "tracker_wakeup"
TRANSITIONS_CHANNEL = "tracker_transitions"


def libpq_url(database_url: str) -> str:
    """The SQLAlchemy URL as psycopg's own connection string."""
    return (
        sa.make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)
    )


async def listen_for_new_batches(
    database_url: str, wake: Callable[[], None], stop: asyncio.Event
) -> None:
    import psycopg

    delay = 1.0
    while not stop.is_set():
        try:
            async with await psycopg.AsyncConnection.connect(
                libpq_url(database_url), autocommit=True, connect_timeout=10
            ) as connection:
                await connection.execute(f"LISTEN {WAKEUP_CHANNEL}")
                log.info("listen.ready", channel=WAKEUP_CHANNEL)
                delay = 1.0
                wake()
                async for _ in connection.notifies():
                    wake()
        except psycopg.Error as error:
            first_line = (str(error).strip().splitlines() or [""])[0]
            log.warning(
                "listen.lost", error=f"{type(error).__name__}: {first_line}", retry_in=delay
            )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        delay = min(delay * 2, 60.0)
