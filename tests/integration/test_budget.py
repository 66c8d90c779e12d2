"""The database budget: one quota for every process on the database, kept across restarts."""

from __future__ import annotations

import asyncio
import threading

import sqlalchemy as sa

from tracker.budget import DatabaseBudget
from tracker.domain.quota import plan_windows


def test_budget_is_shared_and_survives_a_restart(engine: sa.Engine) -> None:
    windows = plan_windows(1000, 1000, 50)
    first = DatabaseBudget(engine, windows)
    assert first.reserve_now(30).granted == 30
    # A "restarted" process (a new object on the same database) sees the day's count.
    second = DatabaseBudget(engine, windows)
    assert second.usage_now()["day"] == (30, 50)
    assert second.reserve_now(40).granted == 20
    refused = second.reserve_now(1)
    assert refused.granted == 0
    assert refused.wait > 3600


def test_concurrent_reservations_never_overspend(engine: sa.Engine) -> None:
    budget = DatabaseBudget(engine, plan_windows(1000, 1000, 100))
    granted: list[int] = []

    def worker() -> None:
        for _ in range(20):
            granted.append(budget.reserve_now(3).granted)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(granted) == 100


def test_release_and_pause(engine: sa.Engine) -> None:
    budget = DatabaseBudget(engine, plan_windows(10, 100, 1000))

    async def scenario() -> None:
        grant = await budget.reserve(5)
        assert grant.granted == 5
        await budget.release(grant, 3)
        assert (await budget.usage())["minute"] == (2, 100)
        await budget.pause(30)
        paused = await budget.reserve(1)
        assert paused.granted == 0
        assert 25 < paused.wait <= 30

    asyncio.run(scenario())
