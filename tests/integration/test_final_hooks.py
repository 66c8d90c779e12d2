"""The on-final hook's flag: set by a final transition, taken once, never for an open batch."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from tracker.domain.model import Decision
from tracker.domain.states import State
from tracker.store import BatchWrite, OperatorResult, Store

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def _finish(store: Store, request_id: str, to_state: State = State.FAILED) -> None:
    [batch] = store.claim_due("w", 1, 60, NOW + timedelta(days=1))
    assert batch.request_id == request_id
    decision = Decision(to_state, None, checked=True, api_status=200, last_error="boom")
    assert store.apply([BatchWrite(batch, decision)], NOW) == [True]


def test_retry_clears_the_hook_flag_so_a_pending_batch_never_runs_the_hook(
    engine: sa.Engine,
) -> None:
    store = Store(engine, final_hook=True)
    store.enqueue("h1")
    _finish(store, "h1")
    # Retried before any daemon ran the hook for the failure.
    assert store.retry("h1", NOW) == (OperatorResult.DONE, "failed")
    row = store.get("h1")
    assert row is not None and row.state == "pending" and row.hook_pending is False
    assert store.claim_final_hooks(10) == []
    # It finishes again: the hook runs once, for the final state.
    _finish(store, "h1", State.FAILED)
    [taken] = store.claim_final_hooks(10)
    assert (taken.request_id, taken.state) == ("h1", "failed")
    assert store.claim_final_hooks(10) == []


def test_a_flag_left_on_an_open_batch_is_cleared_without_running(engine: sa.Engine) -> None:
    """Rows flagged by an older version's retry: not final, so no hook, and no flag left."""
    store = Store(engine, final_hook=True)
    store.enqueue_many(["open1", "final1"])
    _finish(store, "open1")
    _finish(store, "final1", State.REJECTED)
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "UPDATE tracker_batches SET state = 'pending', finished_at = NULL "
                "WHERE request_id = 'open1'"
            )
        )
    taken = store.claim_final_hooks(10)
    assert [(b.request_id, b.state) for b in taken] == [("final1", "rejected")]
    row = store.get("open1")
    assert row is not None and row.hook_pending is False
    assert store.claim_final_hooks(10) == []
