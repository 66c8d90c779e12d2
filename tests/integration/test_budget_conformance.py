"""MemoryBudget and DatabaseBudget (SQLite, PostgreSQL) give the same answers to the same calls.

The database budget takes its time from the database, so no clock can be handed in: the
windows are a day and a week long, counted in day-wide buckets, so nothing rolls out of them
while a test runs, and the only answers that depend on the time (how long to wait) are
compared to within a few seconds.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from typing import Any

import pytest

from tracker.budget import Budget, DatabaseBudget, MemoryBudget
from tracker.db import create_engine_for, upgrade_database
from tracker.domain.quota import Grant, Window

DAY = 86400.0
WINDOWS = [Window("day", 5, DAY, DAY), Window("week", 8, 7 * DAY, DAY)]


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def budget(request: pytest.FixtureRequest) -> Iterator[Budget]:
    if request.param == "memory":
        yield MemoryBudget(WINDOWS)
        return
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    engine = create_engine_for(url)
    if request.param == "sqlite":
        upgrade_database(engine)
    yield DatabaseBudget(engine, WINDOWS)
    engine.dispose()


def _granted(grant: Grant) -> tuple[int, Any]:
    """What a grant says, with a refusal's wait rounded to what no clock skew can move."""
    if grant.granted:
        return grant.granted, None
    return 0, "paused" if grant.wait < DAY / 2 else "out of quota"


def test_reservations_and_releases_count_alike(budget: Budget) -> None:
    async def scenario() -> list[Any]:
        answers: list[Any] = []
        first = await budget.reserve(3)
        answers.append(_granted(first))
        second = await budget.reserve(10)  # the day window has room for 2 more
        answers.append(_granted(second))
        refused = await budget.reserve(1)
        answers.append(_granted(refused))
        answers.append(await budget.usage())
        await budget.release(first, 2)
        answers.append(await budget.usage())
        await budget.release(refused, 1)  # a refusal holds nothing to give back
        answers.append(await budget.usage())
        third = await budget.reserve(4)  # room for 2 more in the day window
        answers.append(_granted(third))
        answers.append(await budget.usage())
        # More than was granted: the bucket the calls share never goes below 0.
        await budget.release(second, 100)
        answers.append(await budget.usage())
        return answers

    assert asyncio.run(scenario()) == [
        (3, None),
        (2, None),
        (0, "out of quota"),
        {"day": (5, 5), "week": (5, 8)},
        {"day": (3, 5), "week": (3, 8)},
        {"day": (3, 5), "week": (3, 8)},
        (2, None),
        {"day": (5, 5), "week": (5, 8)},
        {"day": (0, 5), "week": (0, 8)},
    ]


def test_a_refusal_says_when_the_oldest_call_leaves_the_window(budget: Budget) -> None:
    async def scenario() -> Grant:
        for _ in range(5):
            await budget.reserve(1)
        return await budget.reserve(1)

    refused = asyncio.run(scenario())
    assert refused.granted == 0
    assert refused.buckets == ()
    # The day-wide bucket of these calls stops counting a day after it ends.
    assert DAY < refused.wait <= 2 * DAY + 1


def test_pauses_extend_never_shorten_and_ignore_nonsense(budget: Budget) -> None:
    async def scenario() -> tuple[Grant, Grant, dict[str, tuple[int, int]]]:
        await budget.reserve(1)
        await budget.pause(30.0)
        paused = await budget.reserve(1)
        await budget.pause(10.0)  # shorter: the 30 s pause stands
        await budget.pause(math.nan)
        await budget.pause(-5.0)
        still = await budget.reserve(2)
        return paused, still, await budget.usage()

    paused, still, usage = asyncio.run(scenario())
    assert paused.granted == still.granted == 0
    assert 25.0 < paused.wait <= 30.0
    assert 25.0 < still.wait <= paused.wait
    # A refused reservation counts nothing.
    assert usage == {"day": (1, 5), "week": (1, 8)}


def test_snapshot_shows_the_ledger_and_the_pause(budget: Budget) -> None:
    async def scenario() -> tuple[dict[str, tuple[int, int]], float, dict[str, tuple[int, int]]]:
        grant = await budget.reserve(4)
        await budget.release(grant, 1)
        await budget.pause(60.0)
        ledger, now = await budget.snapshot()
        return ledger.used(now), ledger.paused_until - now, await budget.usage()

    used, pause_left, usage = asyncio.run(scenario())
    assert used == usage == {"day": (3, 5), "week": (3, 8)}
    assert 55.0 < pause_left <= 60.0


def test_a_fresh_budget_has_nothing_used_and_no_pause(budget: Budget) -> None:
    async def scenario() -> tuple[dict[str, tuple[int, int]], float]:
        ledger, now = await budget.snapshot()
        return await budget.usage(), ledger.paused_until - now

    usage, pause_left = asyncio.run(scenario())
    assert usage == {"day": (0, 5), "week": (0, 8)}
    assert pause_left < 0
