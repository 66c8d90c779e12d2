"""Sweeper against a real database, with Deepvue and the file host faked at the httpx seam."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from tests.fake_deepvue import FakeDeepvue, completed, open_clients
from tracker.budget import MemoryBudget, Throttle
from tracker.domain.model import DownloadProblem, PollPolicy
from tracker.domain.quota import Grant, plan_windows
from tracker.metrics import Metrics
from tracker.store import Store
from tracker.sweep import Sweeper


class CountingBudget(MemoryBudget):
    """The real in-memory budget, counting how often it is asked."""

    reservations = 0

    async def reserve(self, want: int) -> Grant:
        self.reservations += 1
        return await super().reserve(want)


@asynccontextmanager
async def _sweeper(
    engine: sa.Engine,
    fake: FakeDeepvue,
    output_dir: Path,
    budget: MemoryBudget | None = None,
    *,
    stopping: asyncio.Event | None = None,
    shutdown_grace: float = 5,
    **options: Any,
) -> AsyncIterator[Sweeper]:
    """A real Sweeper over `engine`, its HTTP clients faked at the transport."""
    throttle = Throttle(budget or MemoryBudget(plan_windows(1000, 100000, 1000000)))
    async with open_clients(fake, throttle, output_dir) as (client, downloader):
        yield Sweeper(
            store=Store(engine),
            client=client,
            throttle=throttle,
            downloader=downloader,
            policy=PollPolicy(min_interval=3600, max_interval=3600, max_age=86400),
            owner="test-owner",
            stopping=stopping or asyncio.Event(),
            lease_seconds=60,
            shutdown_grace=shutdown_grace,
            **options,
        )


async def _until(condition: Callable[[], bool]) -> None:
    """Wait until `condition()` holds; fail after 10 s."""
    async with asyncio.timeout(10):
        while not condition():
            await asyncio.sleep(0.01)


def test_a_slow_download_does_not_hold_up_the_checks_of_other_batches(
    engine: sa.Engine, tmp_path: Path
) -> None:
    store = Store(engine)
    store.enqueue_many(["done-slow", *(f"open-{n}" for n in range(6)), "done-quick"])
    fake = FakeDeepvue()
    fake.held["done-slow"] = asyncio.Event()

    async def main() -> None:
        async with _sweeper(
            engine, fake, tmp_path / "out", concurrency=1, download_concurrency=2
        ) as sweeper:
            sweep = asyncio.create_task(sweeper.sweep())
            # With one worker slot, every other batch is checked while the first one's
            # file is still on its way.
            await _until(lambda: len(fake.status_calls) == 8 and "done-quick" in fake.file_requests)
            assert "done-slow" in fake.file_requests
            assert not sweep.done()
            fake.held["done-slow"].set()
            report = await asyncio.wait_for(sweep, 10)
        assert report.checked == 8
        assert report.downloaded == 2

    asyncio.run(main())
    states = store.count_by_state()
    assert states == {"downloaded": 2, "processing": 6}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "done-quick.csv",
        "done-slow.csv",
    ]


def test_checks_wait_for_a_download_slot_instead_of_claiming_more(
    engine: sa.Engine, tmp_path: Path
) -> None:
    store = Store(engine)
    store.enqueue_many(["done-a", "done-b", "open-1"])
    fake = FakeDeepvue()
    fake.held["done-a"] = asyncio.Event()

    async def main() -> None:
        async with _sweeper(
            engine, fake, tmp_path / "out", concurrency=1, download_concurrency=1
        ) as sweeper:
            sweep = asyncio.create_task(sweeper.sweep())
            await _until(lambda: fake.status_calls == ["done-a", "done-b"])
            # done-b is ready and waits for the only download slot, in the only worker
            # slot: open-1 is not claimed until the slot frees.
            await asyncio.sleep(0.2)
            assert fake.status_calls == ["done-a", "done-b"]
            assert fake.file_requests == ["done-a"]
            fake.held["done-a"].set()
            report = await asyncio.wait_for(sweep, 10)
        assert fake.status_calls == ["done-a", "done-b", "open-1"]
        assert report.downloaded == 2

    asyncio.run(main())
    assert store.count_by_state() == {"downloaded": 2, "processing": 1}


def test_stopping_hands_back_a_batch_whose_download_never_started(
    engine: sa.Engine, tmp_path: Path
) -> None:
    store = Store(engine)
    store.enqueue_many(["done-a", "done-b"])
    fake = FakeDeepvue()
    fake.held["done-a"] = asyncio.Event()

    async def main() -> None:
        stopping = asyncio.Event()
        async with _sweeper(
            engine,
            fake,
            tmp_path / "out",
            stopping=stopping,
            shutdown_grace=0.3,
            concurrency=2,
            download_concurrency=1,
        ) as sweeper:
            sweep = asyncio.create_task(sweeper.sweep())
            await _until(lambda: len(fake.status_calls) == 2)
            await asyncio.sleep(0.1)
            stopping.set()
            await asyncio.wait_for(sweep, 10)

    asyncio.run(main())
    rows = {row.request_id: row for row in store.list_batches()}
    # Both were found complete; neither file arrived, so both are ready again, unleased,
    # for the next sweep, and no temp file is left behind.
    assert {rid: (row.state, row.lease_owner) for rid, row in rows.items()} == {
        "done-a": ("ready", None),
        "done-b": ("ready", None),
    }
    assert list((tmp_path / "out").iterdir()) == []


def test_a_fetch_cut_off_earlier_leaves_no_temp_file_after_the_next(
    engine: sa.Engine, tmp_path: Path
) -> None:
    store = Store(engine)
    store.enqueue_many(["done-again", "done-fresh"])
    # What a kill -9 mid-download leaves: the batch recorded ready, its temp file behind.
    with engine.begin() as connection:
        connection.execute(
            sa.text("UPDATE tracker_batches SET state = 'ready' WHERE request_id = 'done-again'")
        )
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    stale = output_dir / ".done-again.csv.0123456789ab.part"
    stale.write_bytes(b"half a fi")
    fake = FakeDeepvue()

    async def main() -> None:
        async with _sweeper(engine, fake, output_dir, concurrency=2) as sweeper:
            report = await asyncio.wait_for(sweeper.sweep(), 10)
        assert report.downloaded == 2

    asyncio.run(main())
    assert sorted(p.name for p in output_dir.iterdir()) == ["done-again.csv", "done-fresh.csv"]


def test_out_of_permits_with_work_in_flight_the_sweep_waits_instead_of_asking_again(
    engine: sa.Engine, tmp_path: Path
) -> None:
    store = Store(engine)
    store.enqueue_many([f"open-{n}" for n in range(9)])
    budget = CountingBudget(plan_windows(3, 1000, 100000))
    fake = FakeDeepvue()
    fake.latency = 0.3  # calls still in flight when the permits run out

    async def main() -> None:
        async with _sweeper(
            engine, fake, tmp_path / "out", budget, concurrency=4, max_quota_wait=5.0
        ) as sweeper:
            report = await asyncio.wait_for(sweeper.sweep(), 10)
        assert report.checked == 9

    asyncio.run(main())
    # Three calls a second: three seconds' worth of windows, not a busy loop of refusals.
    assert budget.reservations < 40
    assert store.count_by_state() == {"processing": 9}


def test_a_batch_falling_due_during_a_long_download_is_checked_before_it_ends(
    engine: sa.Engine, tmp_path: Path
) -> None:
    """The sweep a long file keeps going looks again for due batches (reading only)."""
    store = Store(engine)
    store.enqueue("done-slow")
    fake = FakeDeepvue()
    fake.held["done-slow"] = asyncio.Event()

    async def main() -> None:
        async with _sweeper(engine, fake, tmp_path / "out", concurrency=2) as sweeper:
            sweep = asyncio.create_task(sweeper.sweep())
            await _until(lambda: "done-slow" in fake.file_requests)
            await asyncio.to_thread(store.enqueue, "open-late")
            await _until(lambda: "open-late" in fake.status_calls)
            assert not sweep.done(), "checked by this sweep, while the file still downloads"
            fake.held["done-slow"].set()
            report = await asyncio.wait_for(sweep, 10)
        assert (report.checked, report.downloaded) == (2, 1)

    asyncio.run(main())
    assert store.count_by_state() == {"downloaded": 1, "processing": 1}


def _set_row(engine: sa.Engine, request_id: str, **values: object) -> None:
    assignments = ", ".join(f"{column} = :{column}" for column in values)
    with engine.begin() as connection:
        connection.execute(
            sa.text(f"UPDATE tracker_batches SET {assignments} WHERE request_id = :rid"),
            {"rid": request_id, **values},
        )


def test_a_ready_batch_refused_again_and_again_fails_and_its_group_still_commits(
    engine: sa.Engine, tmp_path: Path
) -> None:
    """ready -> rejected is not a transition; it once failed every write of its group."""
    store = Store(engine)
    store.enqueue_many(["invalid-was-ready", "open-1", "open-2"])
    _set_row(engine, "invalid-was-ready", state="ready", rejections=2)
    fake = FakeDeepvue()

    async def main() -> None:
        async with _sweeper(engine, fake, tmp_path / "out", concurrency=3) as sweeper:
            report = await sweeper.sweep()
        assert (report.checked, report.errors) == (3, 0)

    asyncio.run(main())
    rows = {row.request_id: row for row in store.list_batches()}
    assert {name: row.state for name, row in rows.items()} == {
        "invalid-was-ready": "failed",
        "open-1": "processing",
        "open-2": "processing",
    }
    failed = rows["invalid-was-ready"]
    assert failed.lease_owner is None and failed.last_error is not None
    assert "HTTP 400" in failed.last_error
    assert [(t.from_state, t.to_state) for t in store.history(failed.id)] == [("ready", "failed")]


def _refuse_writes_to(engine: sa.Engine, request_id: str) -> None:
    """The database refuses any change of this row's state or checks (a trigger), as it
    would a value out of its column's range."""
    with engine.begin() as connection:
        if engine.dialect.name == "sqlite":
            connection.execute(
                sa.text(
                    "CREATE TRIGGER refuse_one AFTER UPDATE OF state, checks ON tracker_batches "
                    f"WHEN NEW.request_id = '{request_id}' "
                    "BEGIN SELECT RAISE(ABORT, 'value out of range for this row'); END"
                )
            )
            return
        connection.execute(
            sa.text(
                "CREATE FUNCTION refuse_one() RETURNS trigger AS $$ BEGIN "
                "RAISE EXCEPTION 'value out of range for this row' USING ERRCODE = '22003'; "
                "END $$ LANGUAGE plpgsql"
            )
        )
        connection.execute(
            sa.text(
                "CREATE TRIGGER refuse_one BEFORE UPDATE OF state, checks ON tracker_batches "
                f"FOR EACH ROW WHEN (NEW.request_id = '{request_id}') EXECUTE FUNCTION refuse_one()"
            )
        )


def test_a_write_the_database_refuses_fails_alone_and_its_batch_is_handed_back(
    engine: sa.Engine, tmp_path: Path
) -> None:
    store = Store(engine)
    store.enqueue_many(["open-refused", "open-1", "open-2"])
    _refuse_writes_to(engine, "open-refused")
    fake = FakeDeepvue()

    async def main() -> None:
        async with _sweeper(engine, fake, tmp_path / "out", concurrency=3) as sweeper:
            report = await sweeper.sweep()
        assert (report.checked, report.errors) == (3, 1)

    asyncio.run(main())
    rows = {row.request_id: row for row in store.list_batches()}
    assert {name: (row.state, row.checks) for name, row in rows.items()} == {
        "open-refused": ("pending", 0),
        "open-1": ("processing", 1),
        "open-2": ("processing", 1),
    }
    refused = rows["open-refused"]
    assert refused.lease_owner is None
    assert refused.last_error is not None and "out of range" in refused.last_error
    # Looked at again only after a long while: the same write would be refused again.
    assert refused.next_check_at is not None and refused.next_check_at > refused.updated_at


def test_a_download_problem_is_counted_by_what_went_wrong(
    engine: sa.Engine, tmp_path: Path
) -> None:
    store = Store(engine)
    store.enqueue_many(["done-fine", "done-elsewhere"])
    fake = FakeDeepvue()
    # A file on a host the downloader may not fetch from: refused, the batch fails.
    fake.script("done-elsewhere", completed("done-elsewhere", "https://elsewhere.test/x.csv"))
    metrics = Metrics()

    async def main() -> None:
        async with _sweeper(engine, fake, tmp_path / "out", concurrency=2, metrics=metrics) as s:
            await s.sweep()

    asyncio.run(main())
    assert store.count_by_state() == {"downloaded": 1, "failed": 1}
    problems = {
        problem.value: metrics.registry.get_sample_value(
            "tracker_download_problems_total", {"problem": problem.value}
        )
        for problem in DownloadProblem
    }
    assert problems == {problem.value: 0 for problem in DownloadProblem} | {"refused": 1}
    assert metrics.registry.get_sample_value("tracker_download_seconds_count") == 1
