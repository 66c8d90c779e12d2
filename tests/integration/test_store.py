"""The store on SQLite and PostgreSQL: raw inserts, claims, leases, guarded transitions."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from tracker.domain.model import Decision, Tracked
from tracker.domain.states import State
from tracker.schema import batches
from tracker.store import (
    BatchWrite,
    LeaseExtension,
    OperatorResult,
    Store,
    StoredFile,
    WriteRefused,
)

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def raw_insert(engine: sa.Engine, request_id: str) -> None:
    """Exactly what another application runs: no other column named."""
    with engine.begin() as connection:
        connection.execute(
            sa.text("INSERT INTO tracker_batches (request_id) VALUES (:rid)"), {"rid": request_id}
        )


def test_bare_insert_gets_server_defaults(engine: sa.Engine) -> None:
    raw_insert(engine, "abc123")
    row = Store(engine).get("abc123")
    assert row is not None
    assert row.state == "pending"
    assert row.checks == 0
    assert row.next_check_at is None
    assert row.lease_token == 0
    assert row.created_at.tzinfo is not None
    assert abs(row.created_at - datetime.now(UTC)) < timedelta(minutes=5)


def test_state_is_constrained(engine: sa.Engine) -> None:
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as connection:
        connection.execute(
            sa.text("INSERT INTO tracker_batches (request_id, state) VALUES ('x1', 'bogus')")
        )


def test_enqueue_reports_duplicates(engine: sa.Engine) -> None:
    store = Store(engine)
    assert store.enqueue("dup1", label="first") is True
    assert store.enqueue("dup1", label="second") is False
    row = store.get("dup1")
    assert row is not None and row.label == "first"


def test_claim_leases_due_rows_once(engine: sa.Engine) -> None:
    store = Store(engine)
    for n in range(5):
        store.enqueue(f"due{n}")
    first = store.claim_due("a", 3, 60, NOW)
    second = store.claim_due("b", 10, 60, NOW)
    assert [b.request_id for b in first] == ["due0", "due1", "due2"]
    assert [b.request_id for b in second] == ["due3", "due4"]
    assert store.claim_due("c", 10, 60, NOW) == []
    assert all(b.lease_token == 1 for b in first + second)


def test_not_yet_due_rows_are_not_claimed(engine: sa.Engine) -> None:
    store = Store(engine)
    store.enqueue("later")
    with engine.begin() as connection:
        connection.execute(
            sa.text("UPDATE tracker_batches SET next_check_at = :t"),
            {"t": (NOW + timedelta(minutes=1)).replace(tzinfo=None)},
        )
    assert store.claim_due("a", 10, 60, NOW) == []
    assert [b.request_id for b in store.claim_due("a", 10, 60, NOW + timedelta(minutes=2))] == [
        "later"
    ]


def test_expired_lease_is_reclaimed_and_fences_the_old_owner(engine: sa.Engine) -> None:
    store = Store(engine)
    store.enqueue("lease1")
    [old] = store.claim_due("old-owner", 1, 30, NOW)
    # Still leased: nobody else gets it.
    assert store.claim_due("new-owner", 1, 30, NOW + timedelta(seconds=10)) == []
    [new] = store.claim_due("new-owner", 1, 30, NOW + timedelta(seconds=31))
    assert new.lease_token == old.lease_token + 1

    processing = Decision(State.PROCESSING, NOW + timedelta(minutes=1), checked=True)
    # The old owner wakes up: its write is refused, the new owner's lands.
    assert store.apply([BatchWrite(old, processing)], NOW) == [False]
    assert store.apply([BatchWrite(new, processing)], NOW) == [True]
    assert store.apply([LeaseExtension(old, 30)], NOW) == [False]
    row = store.get("lease1")
    assert row is not None and row.state == "processing" and row.lease_owner is None
    assert len(store.history(row.id)) == 1


def test_apply_records_a_consistent_transition_chain(engine: sa.Engine) -> None:
    store = Store(engine)
    store.enqueue("chain1")

    def step(to_state: State, **extra: object) -> None:
        [batch] = store.claim_due("w", 1, 60, NOW + timedelta(hours=1))
        decision = Decision(to_state, None, checked=True, api_status=200, **extra)  # type: ignore[arg-type]
        file = StoredFile("/x/chain1.csv", 10, "ab" * 32) if to_state is State.DOWNLOADED else None
        assert store.apply([BatchWrite(batch, decision, file=file)], NOW) == [True]

    step(State.PROCESSING)
    step(State.PROCESSING)  # no change of state: no transition row
    step(State.READY)
    step(State.DOWNLOADED, detail="saved")
    row = store.get("chain1")
    assert row is not None
    assert row.state == "downloaded" and row.finished_at is not None
    assert row.file_sha256 == "ab" * 32 and row.checks == 4
    chain = [(t.from_state, t.to_state) for t in store.history(row.id)]
    assert chain == [("pending", "processing"), ("processing", "ready"), ("ready", "downloaded")]
    # A finished batch is never claimed again.
    assert store.claim_due("w", 10, 60, NOW + timedelta(days=1)) == []


def test_an_illegal_transition_fails_alone_and_its_batch_is_handed_back(engine: sa.Engine) -> None:
    store = Store(engine, refused_retry=600)
    store.enqueue_many(["ok1", "illegal1", "ok2"])
    claimed = {batch.request_id: batch for batch in store.claim_due("w", 3, 60, NOW)}
    later = NOW + timedelta(minutes=5)
    writes = [
        BatchWrite(claimed["ok1"], Decision(State.PROCESSING, later, checked=True)),
        BatchWrite(claimed["illegal1"], Decision(State.DOWNLOADED, None, checked=True)),
        BatchWrite(claimed["ok2"], Decision(State.PROCESSING, later, checked=True)),
    ]
    first, refused, last = store.apply(writes, NOW)
    assert (first, last) == (True, True)
    assert isinstance(refused, WriteRefused)
    assert "cannot go from pending to downloaded" in str(refused)
    rows = {row.request_id: row for row in store.list_batches()}
    assert (rows["ok1"].state, rows["ok1"].checks) == ("processing", 1)
    assert (rows["ok2"].state, rows["ok2"].checks) == ("processing", 1)
    bad = rows["illegal1"]
    assert (bad.state, bad.checks, bad.lease_owner, bad.lease_expires_at) == (
        "pending",
        0,
        None,
        None,
    )
    assert bad.last_error == str(refused)
    # Not at once again: the same write would be refused again, each time after a status call.
    assert bad.next_check_at == NOW + timedelta(seconds=600)
    assert store.history(bad.id) == []
    assert len(store.history(rows["ok1"].id)) == 1


def test_hand_edited_state_turns_a_write_into_a_conflict(engine: sa.Engine) -> None:
    store = Store(engine)
    store.enqueue("edited1")
    [batch] = store.claim_due("w", 1, 60, NOW)
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE tracker_batches SET state = 'processing'"))
    assert store.apply([BatchWrite(batch, Decision(State.READY, None))], NOW) == [False]


def test_cancel_and_retry_are_recorded(engine: sa.Engine) -> None:
    store = Store(engine)
    store.enqueue("op1")
    [leased] = store.claim_due("w", 1, 60, NOW)
    assert store.cancel("op1", NOW) == (OperatorResult.DONE, "pending")
    # The worker that held the lease can no longer write.
    assert store.apply([BatchWrite(leased, Decision(State.PROCESSING, None))], NOW) == [False]
    assert store.cancel("op1", NOW) == (OperatorResult.WRONG_STATE, "cancelled")
    assert store.retry("op1", NOW) == (OperatorResult.DONE, "cancelled")
    assert store.retry("op1", NOW) == (OperatorResult.WRONG_STATE, "pending")
    assert store.retry("nope", NOW) == (OperatorResult.NOT_FOUND, None)
    row = store.get("op1")
    assert row is not None and row.state == "pending" and row.finished_at is None
    chain = [(t.from_state, t.to_state, t.detail) for t in store.history(row.id)]
    assert chain == [
        ("pending", "cancelled", "cancelled by an operator"),
        ("cancelled", "pending", "retried by an operator"),
    ]


def test_release_hands_batches_back(engine: sa.Engine) -> None:
    store = Store(engine)
    store.enqueue("rel1")
    claimed = store.claim_due("w", 1, 600, NOW)
    assert store.release(claimed) == 1
    assert [b.request_id for b in store.claim_due("w2", 1, 600, NOW)] == ["rel1"]


def test_concurrent_claimers_never_share_a_batch(database_url: str) -> None:
    from tracker.db import create_engine_for

    engine = create_engine_for(database_url)
    store = Store(engine)
    for n in range(200):
        store.enqueue(f"c{n:03d}")
    claimed: list[list[Tracked]] = [[] for _ in range(4)]
    start = threading.Barrier(4)

    def claimer(index: int) -> None:
        start.wait()
        while batch := store.claim_due(f"w{index}", 7, 600, NOW):
            claimed[index].extend(batch)
            time.sleep(0.001)  # a worker does something with its claim before the next

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    engine.dispose()
    ids = [b.request_id for batch in claimed for b in batch]
    assert len(ids) == 200
    assert len(set(ids)) == 200
    assert sum(1 for batch in claimed if batch) >= 2


def test_a_group_with_one_stale_write_applies_the_others_and_only_their_transitions(
    engine: sa.Engine,
) -> None:
    store = Store(engine)
    store.enqueue_many(["g1", "g2", "g3"])
    claimed = {batch.request_id: batch for batch in store.claim_due("w", 3, 60, NOW)}
    assert store.cancel("g2", NOW)[0] is OperatorResult.DONE  # fences out g2's worker
    later = NOW + timedelta(minutes=5)
    writes = [
        BatchWrite(claimed[name], Decision(State.PROCESSING, later, checked=True, detail=name))
        for name in ("g1", "g2", "g3")
    ]
    assert store.apply(writes, NOW) == [True, False, True]
    states = {row.request_id: (row.state, row.checks) for row in store.list_batches()}
    assert states == {"g1": ("processing", 1), "g2": ("cancelled", 0), "g3": ("processing", 1)}
    chains = {
        name: [(t.from_state, t.to_state) for t in store.history(claimed[name].id)]
        for name in ("g1", "g2", "g3")
    }
    assert chains == {
        "g1": [("pending", "processing")],
        "g2": [("pending", "cancelled")],
        "g3": [("pending", "processing")],
    }


def test_timestamps_round_trip_as_utc(engine: sa.Engine) -> None:
    store = Store(engine)
    store.enqueue("tz1")
    [batch] = store.claim_due("w", 1, 60, NOW)
    later = datetime(2026, 12, 1, 5, 30, 0, 123456, tzinfo=UTC)
    store.apply([BatchWrite(batch, Decision(State.PROCESSING, later, checked=True))], NOW)
    row = store.get("tz1")
    assert row is not None and row.next_check_at == later


def test_prune_deletes_only_old_final_batches_in_chunks(engine: sa.Engine) -> None:
    store = Store(engine)
    for name in ("old-done", "old-failed", "new-done", "active"):
        store.enqueue(name)
    claimed = {batch.request_id: batch for batch in store.claim_due("w", 10, 60, NOW)}
    finals = {"old-done": State.REJECTED, "old-failed": State.FAILED, "new-done": State.REJECTED}
    writes = [
        BatchWrite(claimed[name], Decision(to, None, detail="done")) for name, to in finals.items()
    ]
    assert store.apply(writes, NOW) == [True, True, True]
    with engine.begin() as connection:
        connection.execute(
            sa.text("UPDATE tracker_batches SET finished_at = :t WHERE request_id LIKE 'old-%'"),
            {"t": (NOW - timedelta(days=30)).replace(tzinfo=None)},
        )
    chunks = list(store.prune(NOW - timedelta(days=7), chunk=1))
    assert [[row.request_id for row in chunk] for chunk in chunks] == [["old-done"], ["old-failed"]]
    assert sorted(row.request_id for row in store.list_batches()) == ["active", "new-done"]
    with engine.begin() as connection:
        orphans = connection.execute(
            sa.text(
                "SELECT count(*) FROM tracker_transitions t "
                "WHERE NOT EXISTS (SELECT 1 FROM tracker_batches b WHERE b.id = t.batch_id)"
            )
        ).scalar_one()
    assert orphans == 0


def test_load_history_counts_the_unfinished_batches(engine: sa.Engine) -> None:
    """What the budget-aware schedule learns the load from (Store.load_history)."""
    store = Store(engine)
    store.enqueue_many(["open-1", "open-2", "done-1"])
    with engine.begin() as connection:
        connection.execute(
            batches.update()
            .where(batches.c.request_id == "done-1")
            .values(state="downloaded", finished_at=NOW)
        )
    lifetimes, first_seen, open_batches = store.load_history(NOW - timedelta(days=1))
    assert open_batches == 2
    assert len(lifetimes) == 3
    assert first_seen is not None
