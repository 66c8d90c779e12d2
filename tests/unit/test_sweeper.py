"""The Sweeper in-process: MemoryBudget, the fake Deepvue at the httpx seam, a real SQLite store."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from structlog.testing import capture_logs

from tests.fake_deepvue import FakeDeepvue, completed, in_progress, open_clients, rate_limited
from tracker.budget import MemoryBudget, Throttle
from tracker.db import create_engine_for, upgrade_database
from tracker.domain.model import PollPolicy
from tracker.domain.quota import Grant, Window, plan_windows
from tracker.schema import batches
from tracker.store import BatchRow, Store
from tracker.sweep import Sweeper, SweepReport


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    engine = create_engine_for(f"sqlite:///{tmp_path}/tracker.db")
    upgrade_database(engine)
    yield Store(engine)
    engine.dispose()


class Harness:
    """Sweepers over `store`, the fake and `budget`, and what the tests look at."""

    def __init__(
        self, store: Store, fake: FakeDeepvue, budget: MemoryBudget, output_dir: Path
    ) -> None:
        self.store = store
        self.fake = fake
        self.budget = budget
        self.output_dir = output_dir
        self.throttle = Throttle(budget)
        self.stopping = asyncio.Event()

    @asynccontextmanager
    async def sweeper(self, **options: Any) -> AsyncIterator[Sweeper]:
        settings: dict[str, Any] = {
            "policy": PollPolicy(min_interval=3600, max_interval=3600, max_age=86400),
            "owner": "test-owner",
            "concurrency": 4,
            "lease_seconds": 60,
            "shutdown_grace": 5,
        }
        settings.update(options)
        async with open_clients(self.fake, self.throttle, self.output_dir) as (client, files):
            yield Sweeper(
                store=self.store,
                client=client,
                throttle=self.throttle,
                downloader=files,
                stopping=self.stopping,
                **settings,
            )

    async def sweep(self, **options: Any) -> SweepReport:
        async with self.sweeper(**options) as sweeper:
            return await asyncio.wait_for(sweeper.sweep(), 10)

    def rows(self) -> dict[str, BatchRow]:
        return {row.request_id: row for row in self.store.list_batches()}

    async def calls_used(self) -> int:
        return (await self.budget.usage())["day"][0]

    def paused_for(self) -> float:
        return self.throttle.paused_for()

    def stop(self) -> None:
        """What the daemon's signal handler does."""
        self.stopping.set()


@pytest.fixture
def fake() -> FakeDeepvue:
    return FakeDeepvue()


@pytest.fixture
def budget() -> MemoryBudget:
    return MemoryBudget(plan_windows(1000, 100000, 1000000))


@pytest.fixture
def harness(store: Store, fake: FakeDeepvue, budget: MemoryBudget, tmp_path: Path) -> Harness:
    return Harness(store, fake, budget, tmp_path / "out")


def _update_row(store: Store, request_id: str, **values: Any) -> None:
    engine = store.engine
    with engine.begin() as connection:
        connection.execute(
            sa.update(batches).where(batches.c.request_id == request_id).values(**values)
        )


async def _until(condition: Any) -> None:
    async with asyncio.timeout(10):
        while not condition():
            await asyncio.sleep(0.01)


def test_a_batch_goes_from_pending_to_completed_to_its_file_on_disk(
    harness: Harness, store: Store, fake: FakeDeepvue
) -> None:
    store.enqueue("b1")
    fake.script("b1", in_progress("b1"), completed("b1"))

    async def main() -> tuple[SweepReport, SweepReport]:
        first = await harness.sweep()
        _update_row(store, "b1", next_check_at=datetime.now(UTC) - timedelta(seconds=1))
        return first, await harness.sweep()

    first, second = asyncio.run(main())
    assert (first.claimed, first.checked, first.transitions, first.downloaded) == (1, 1, 1, 0)
    assert (second.checked, second.transitions, second.downloaded) == (1, 2, 1)
    row = harness.rows()["b1"]
    assert (row.state, row.checks, row.lease_owner) == ("downloaded", 2, None)
    assert row.file_path is not None
    assert Path(row.file_path).read_bytes() == b"id,b1\n"
    assert row.file_size == 6
    assert [(t.from_state, t.to_state) for t in store.history(row.id)] == [
        ("pending", "processing"),
        ("processing", "ready"),
        ("ready", "downloaded"),
    ]
    assert fake.status_calls == ["b1", "b1"]
    assert fake.file_requests == ["b1"]


def test_a_429_pause_hands_the_backlog_back(
    harness: Harness, store: Store, fake: FakeDeepvue
) -> None:
    store.enqueue_many(["a", "b", "c"])
    fake.script("a", rate_limited(retry_after="300"))

    with capture_logs() as logs:
        report = asyncio.run(harness.sweep(concurrency=1))

    assert report.paused
    # One call went out and drew the 429; the batch claimed beside it never started.
    assert fake.status_calls == ["a"]
    assert report.claimed == 2
    handed_back = [e for e in logs if e["event"] == "sweep.paused_handed_back"]
    assert [e["batches"] for e in handed_back] == [1]
    rows = harness.rows()
    rate_limited_row = rows["a"]
    assert rate_limited_row.lease_owner is None
    assert rate_limited_row.last_error == "rate limited by Deepvue"
    assert rate_limited_row.next_check_at is not None
    assert rate_limited_row.next_check_at - rate_limited_row.updated_at >= timedelta(seconds=290)
    for untouched in ("b", "c"):
        assert (rows[untouched].state, rows[untouched].checks) == ("pending", 0)
        assert rows[untouched].lease_owner is None
    # The permit reserved for the batch handed back went back to the budget.
    assert asyncio.run(harness.calls_used()) == 1
    assert harness.paused_for() == pytest.approx(300, abs=5)


def test_a_stop_during_a_sweep_hands_back_what_has_not_started(
    harness: Harness, store: Store, fake: FakeDeepvue
) -> None:
    store.enqueue_many(["a", "b", "c"])
    fake.latency = 0.3  # "a" is in flight when the stop comes

    async def main() -> SweepReport:
        async with harness.sweeper(concurrency=1) as sweeper:
            sweep = asyncio.create_task(sweeper.sweep())
            await _until(lambda: fake.status_in_flight == 1)
            harness.stop()
            return await asyncio.wait_for(sweep, 10)

    report = asyncio.run(main())
    assert fake.status_calls == ["a"]
    assert (report.claimed, report.checked) == (2, 1)
    rows = harness.rows()
    # The check in flight finished within the grace period; the one claimed ahead went back.
    assert (rows["a"].state, rows["a"].lease_owner) == ("processing", None)
    assert (rows["b"].state, rows["b"].checks, rows["b"].lease_owner) == ("pending", 0, None)
    assert (rows["c"].state, rows["c"].lease_owner) == ("pending", None)
    assert asyncio.run(harness.calls_used()) == 1


def test_concurrent_status_calls_never_exceed_the_worker_slots(
    harness: Harness, store: Store, fake: FakeDeepvue
) -> None:
    store.enqueue_many([f"open-{n}" for n in range(20)])
    fake.latency = 0.05

    report = asyncio.run(harness.sweep(concurrency=3))

    assert report.checked == 20
    assert fake.most_status_in_flight == 3


def test_a_lease_lost_during_the_download_is_a_conflict(
    harness: Harness, store: Store, fake: FakeDeepvue, tmp_path: Path
) -> None:
    store.enqueue("done-x")
    fake.held["done-x"] = asyncio.Event()

    async def main() -> SweepReport:
        async with harness.sweeper() as sweeper:
            sweep = asyncio.create_task(sweeper.sweep())
            await _until(lambda: fake.file_requests == ["done-x"])
            # Another instance takes the batch over while its file is on the way.
            _update_row(
                store,
                "done-x",
                lease_owner="someone-else",
                lease_token=batches.c.lease_token + 1,
            )
            fake.held["done-x"].set()
            return await asyncio.wait_for(sweep, 10)

    report = asyncio.run(main())
    assert (report.conflicts, report.downloaded) == (1, 0)
    row = harness.rows()["done-x"]
    assert (row.state, row.lease_owner, row.file_path) == ("ready", "someone-else", None)
    assert list((tmp_path / "out").iterdir()) == []


def test_an_auth_failure_pauses_the_throttle_and_penalises_no_batch(
    harness: Harness, store: Store, fake: FakeDeepvue, budget: MemoryBudget
) -> None:
    store.enqueue_many(["a", "b"])
    fake.authorize_override = lambda request: httpx.Response(
        401, json={"detail": "Invalid client_id or client_secret"}
    )

    report = asyncio.run(harness.sweep(concurrency=2))

    assert report.auth_failed
    assert (report.checked, report.transitions, report.errors) == (0, 0, 0)
    assert fake.status_calls == []
    for row in harness.rows().values():
        assert (row.state, row.checks, row.faults, row.lease_owner) == ("pending", 0, 0, None)
        assert row.last_error is None
    # Later sweeps stay quiet for the backoff period, here and (through the budget) elsewhere.
    assert harness.paused_for() == pytest.approx(30, abs=1)
    assert asyncio.run(budget.reserve(1)).granted == 0


def test_a_stop_while_the_claim_runs_hands_back_everything_it_claimed(
    harness: Harness,
    store: Store,
    fake: FakeDeepvue,
    budget: MemoryBudget,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store.enqueue_many(["a", "b"])
    reserve = budget.reserve

    async def reserve_then_stop(want: int) -> Grant:
        harness.stop()  # the signal arrives while the claim transaction runs
        return await reserve(want)

    monkeypatch.setattr(budget, "reserve", reserve_then_stop)

    report = asyncio.run(harness.sweep())

    assert report.claimed == 2
    assert fake.status_calls == []
    for row in harness.rows().values():
        assert (row.state, row.checks, row.lease_owner) == ("pending", 0, None)
    assert asyncio.run(harness.calls_used()) == 0


def test_a_sweep_paced_by_the_call_budget_claims_as_soon_as_a_permit_frees(
    store: Store, fake: FakeDeepvue, tmp_path: Path
) -> None:
    # Five calls per 0.25 s window, fifteen batches: three rounds, each waiting for the
    # window to free. Once the wait is over the pass claims at once; it must not then also
    # sit out the in-flight wait (up to a second) with nothing in flight.
    budget = MemoryBudget([Window("second", 5, 0.2, 0.05)])
    harness = Harness(store, fake, budget, tmp_path / "out")
    store.enqueue_many([f"open-{n}" for n in range(15)])

    started = time.monotonic()
    report = asyncio.run(harness.sweep(concurrency=8))
    took = time.monotonic() - started

    assert report.checked == 15
    # About 0.6 s here; a second of idling per round would make it 2.6 s or more.
    assert took < 1.8, f"{took:.2f} s for three rounds of a 0.25 s window"


def test_a_webhook_during_the_status_call_brings_the_next_check_forward(
    harness: Harness, store: Store, fake: FakeDeepvue
) -> None:
    """Deepvue answers "processing", completes, and its webhook lands before the sweep has
    written that answer back: the batch is checked again at once, not an hour later."""
    store.enqueue("b1")
    hints: list[set[str]] = []

    def processing_then_the_webhook(request: httpx.Request) -> httpx.Response:
        hints.append(store.bring_forward(["b1"], datetime.now(UTC), 30))
        fake.status_override = None
        fake.script("b1", completed("b1"))
        return in_progress("b1")

    fake.status_override = processing_then_the_webhook
    asyncio.run(harness.sweep())
    assert hints == [{"b1"}]
    row = harness.rows()["b1"]
    if row.state != "downloaded":
        # The sweep may end before the written batch is due to it again: due now, then.
        assert row.next_check_at is not None and row.next_check_at <= datetime.now(UTC)
        asyncio.run(harness.sweep())
    # The second check came at once, brought forward by the webhook.
    assert fake.status_calls == ["b1", "b1"]
    row = harness.rows()["b1"]
    assert row.state == "downloaded"
    marks = [(t.from_state, t.to_state, t.brought_forward) for t in store.history(row.id)]
    assert marks == [
        ("pending", "processing", False),
        ("processing", "ready", True),
        ("ready", "downloaded", False),
    ]
