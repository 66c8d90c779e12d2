"""Store.bring_forward: a webhook delivery moves the next check of the batches it names."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from tracker.domain.model import Decision
from tracker.domain.states import ACTIVE_STATES, TERMINAL_STATES, State
from tracker.schema import batches
from tracker.store import BatchRow, BatchWrite, Store

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
LATER = NOW + timedelta(hours=1)
SPACING = 30.0


def _track(store: Store, request_id: str, **values: Any) -> BatchRow:
    """A batch as the daemon leaves it between checks, with `values` set."""
    store.enqueue(request_id, label="hints")
    values = {"next_check_at": LATER, "checks": 2, "api_status": 200, **values}
    with store.engine.begin() as connection:
        connection.execute(
            batches.update().where(batches.c.request_id == request_id).values(**values)
        )
    row = store.get(request_id)
    assert row is not None
    return row


def _row(store: Store, request_id: str) -> BatchRow:
    row = store.get(request_id)
    assert row is not None
    return row


def test_moves_only_the_unfinished_tracked_batches_named(engine: sa.Engine) -> None:
    store = Store(engine)
    unfinished = {state: _track(store, f"on-{state}", state=state.value) for state in ACTIVE_STATES}
    finished = {
        state: _track(store, f"off-{state}", state=state.value, finished_at=NOW - timedelta(1))
        for state in TERMINAL_STATES
    }
    bystander = _track(store, "not-named")
    named = {row.request_id for row in (*unfinished.values(), *finished.values())}

    moved = store.bring_forward(named | {"unknown-1", "unknown-2"}, NOW, SPACING)

    assert moved == {row.request_id for row in unfinished.values()}
    for before in unfinished.values():
        # Only the next check and the hint's time change: state, counters, file, lease stay.
        expected = dataclasses.replace(before, next_check_at=NOW, hinted_at=NOW)
        assert _row(store, before.request_id) == expected
    for before in (*finished.values(), bystander):
        assert _row(store, before.request_id) == before


def test_nothing_named_nothing_done(engine: sa.Engine) -> None:
    store = Store(engine)
    before = _track(store, "abc123")
    assert store.bring_forward(set(), NOW, SPACING) == set()
    assert store.bring_forward(["unknown"], NOW, SPACING) == set()
    assert _row(store, "abc123") == before


def test_at_most_one_early_check_per_spacing(engine: sa.Engine) -> None:
    store = Store(engine)
    _track(store, "abc123")
    assert store.bring_forward(["abc123"], NOW, SPACING) == {"abc123"}
    # The early check ran and scheduled the next one; deliveries keep coming.
    with engine.begin() as connection:
        connection.execute(batches.update().values(next_check_at=LATER))
    soon = NOW + timedelta(seconds=SPACING - 1)
    assert store.bring_forward(["abc123"], soon, SPACING) == set()
    row = _row(store, "abc123")
    assert (row.next_check_at, row.hinted_at) == (LATER, NOW)
    # Once the spacing has passed, a delivery brings it forward again.
    again = NOW + timedelta(seconds=SPACING)
    assert store.bring_forward(["abc123", "abc123"], again, SPACING) == {"abc123"}
    row = _row(store, "abc123")
    assert (row.next_check_at, row.hinted_at) == (again, again)


def test_a_batch_already_due_is_left_as_it_is(engine: sa.Engine) -> None:
    """Its check is as early as it gets; no hint is spent on it."""
    store = Store(engine)
    never_checked = _track(store, "new-1", next_check_at=None)
    overdue = _track(store, "due-1", next_check_at=NOW - timedelta(minutes=5))
    exactly = _track(store, "due-2", next_check_at=NOW)
    assert store.bring_forward(["new-1", "due-1", "due-2"], NOW, SPACING) == set()
    for before in (never_checked, overdue, exactly):
        assert _row(store, before.request_id) == before


def test_a_leased_batch_is_moved_and_keeps_its_lease(engine: sa.Engine) -> None:
    store = Store(engine)
    _track(store, "abc123", next_check_at=NOW + timedelta(seconds=1))
    [claimed] = store.claim_due("worker-a", 10, 60, NOW + timedelta(seconds=2))
    before = _row(store, "abc123")
    assert before.lease_owner == "worker-a"
    with engine.begin() as connection:
        connection.execute(batches.update().values(next_check_at=LATER))
    before = _row(store, "abc123")

    assert store.bring_forward(["abc123"], NOW + timedelta(seconds=3), SPACING) == {"abc123"}

    at = NOW + timedelta(seconds=3)
    assert _row(store, "abc123") == dataclasses.replace(before, next_check_at=at, hinted_at=at)
    # The lease still keeps every other worker off it.
    assert store.claim_due("worker-b", 10, 60, NOW + timedelta(seconds=4)) == []
    assert claimed.lease_token == before.lease_token


def test_many_ids_in_one_call(engine: sa.Engine) -> None:
    store = Store(engine)
    tracked = [f"batch-{n}" for n in range(300)]
    store.enqueue_many(tracked)
    with engine.begin() as connection:
        connection.execute(batches.update().values(next_check_at=LATER))
    named = set(tracked[::2]) | {f"unknown-{n}" for n in range(200)}
    assert store.bring_forward(named, NOW, SPACING) == set(tracked[::2])
    rows = {row.request_id: row for row in store.list_batches()}
    assert {rid for rid, row in rows.items() if row.next_check_at == NOW} == set(tracked[::2])


def test_an_unfinished_batch_keeps_its_state_after_the_move(engine: sa.Engine) -> None:
    """A hint never decides: the next claim sees the batch as it was, only due now."""
    store = Store(engine)
    _track(store, "abc123", state=State.PROCESSING.value)
    store.bring_forward(["abc123"], NOW, SPACING)
    [claimed] = store.claim_due("worker-a", 10, 60, NOW)
    assert (claimed.request_id, claimed.state, claimed.checks) == ("abc123", State.PROCESSING, 2)


@pytest.mark.postgres
def test_a_move_wakes_the_daemons_on_postgresql(pg_url: str) -> None:
    import psycopg

    from tracker.db import create_engine_for

    engine = create_engine_for(pg_url)
    try:
        store = Store(engine)
        _track(store, "abc123")
        dsn = pg_url.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(dsn, autocommit=True) as listener:
            listener.execute("LISTEN tracker_wakeup")
            assert store.bring_forward(["unknown"], NOW, SPACING) == set()
            assert list(listener.notifies(timeout=0.5, stop_after=1)) == []
            assert store.bring_forward(["abc123"], NOW, SPACING) == {"abc123"}
            heard = list(listener.notifies(timeout=5, stop_after=1))
        assert [n.channel for n in heard] == ["tracker_wakeup"]
    finally:
        engine.dispose()


def test_a_hint_during_the_status_call_is_kept_for_after_it(engine: sa.Engine) -> None:
    """The delivery lands while the batch's status call is in flight (claimed, due, leased):
    the worker's write must not bury it under the next polling interval."""
    store = Store(engine)
    _track(store, "abc123", state=State.PROCESSING.value, next_check_at=NOW)
    [claimed] = store.claim_due("worker-a", 10, 60, NOW)
    hint_at = NOW + timedelta(seconds=1)

    assert store.bring_forward(["abc123"], hint_at, SPACING) == {"abc123"}
    row = _row(store, "abc123")
    assert (row.hinted_at, row.next_check_at, row.lease_owner) == (hint_at, NOW, "worker-a")

    # The call answered "still processing" before the completion: polling alone would wait.
    written_at = NOW + timedelta(seconds=2)
    decision = Decision(
        to_state=State.PROCESSING, next_check_at=LATER, checked=True, api_status=200
    )
    store.apply([BatchWrite(claimed, decision)], written_at)

    row = _row(store, "abc123")
    assert (row.state, row.checks, row.lease_owner) == ("processing", 3, None)
    assert row.next_check_at == hint_at
    [again] = store.claim_due("worker-b", 10, 60, written_at)
    assert (again.request_id, again.brought_forward) == ("abc123", True)


def test_a_hint_before_the_claim_is_not_counted_again(engine: sa.Engine) -> None:
    """The hint that made the batch due is spent by the check it brought forward."""
    store = Store(engine)
    _track(store, "abc123", state=State.PROCESSING.value)
    assert store.bring_forward(["abc123"], NOW, SPACING) == {"abc123"}
    [claimed] = store.claim_due("worker-a", 10, 60, NOW + timedelta(seconds=1))
    decision = Decision(
        to_state=State.PROCESSING, next_check_at=LATER, checked=True, api_status=200
    )
    store.apply([BatchWrite(claimed, decision)], NOW + timedelta(seconds=2))
    assert _row(store, "abc123").next_check_at == LATER


def test_a_hint_during_a_download_keeps_its_backoff(engine: sa.Engine) -> None:
    """Only a status call decides from a hint; a ready batch's download retry keeps its time."""
    store = Store(engine)
    _track(store, "abc123", state=State.READY.value, next_check_at=NOW)
    [claimed] = store.claim_due("worker-a", 10, 60, NOW)
    assert store.bring_forward(["abc123"], NOW + timedelta(seconds=1), SPACING) == {"abc123"}
    decision = Decision(to_state=State.READY, next_check_at=LATER, download_attempts=1)
    store.apply([BatchWrite(claimed, decision)], NOW + timedelta(seconds=2))
    assert _row(store, "abc123").next_check_at == LATER


def test_an_in_flight_hint_counts_against_the_spacing(engine: sa.Engine) -> None:
    store = Store(engine)
    _track(store, "abc123", state=State.PROCESSING.value, next_check_at=NOW)
    store.claim_due("worker-a", 10, 60, NOW)
    assert store.bring_forward(["abc123"], NOW + timedelta(seconds=1), SPACING) == {"abc123"}
    assert store.bring_forward(["abc123"], NOW + timedelta(seconds=2), SPACING) == set()


def test_a_batch_due_but_not_leased_is_left_as_it_is(engine: sa.Engine) -> None:
    """An expired lease is nobody's call in flight: the batch is due and will be claimed."""
    store = Store(engine)
    _track(store, "abc123", state=State.PROCESSING.value, next_check_at=NOW)
    store.claim_due("worker-a", 10, 60, NOW)
    after_the_lease = NOW + timedelta(seconds=61)
    assert store.bring_forward(["abc123"], after_the_lease, SPACING) == set()


def test_the_transition_a_brought_forward_check_made_is_marked(engine: sa.Engine) -> None:
    store = Store(engine)
    hinted = _track(store, "hinted", state=State.PROCESSING.value)
    polled = _track(store, "polled", state=State.PROCESSING.value, next_check_at=NOW)
    assert store.bring_forward(["hinted"], NOW, SPACING) == {"hinted"}
    claimed = store.claim_due("worker-a", 10, 60, NOW + timedelta(seconds=1))
    assert {b.request_id: b.brought_forward for b in claimed} == {"hinted": True, "polled": False}
    ready = Decision(to_state=State.READY, next_check_at=NOW, checked=True, api_status=200)
    store.apply([BatchWrite(batch, ready) for batch in claimed], NOW + timedelta(seconds=2))
    assert [t.brought_forward for t in store.history(hinted.id)] == [True]
    assert [t.brought_forward for t in store.history(polled.id)] == [False]
