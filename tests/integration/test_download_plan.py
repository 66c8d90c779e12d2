"""The policy's download plan against the real store: the ready write keeps its lease."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from tracker.domain.answers import Outcome, StatusAnswer
from tracker.domain.model import PollPolicy, Tracked
from tracker.domain.policy import decide_on_answer, decide_on_download_done, plan_download
from tracker.domain.states import State
from tracker.store import BatchWrite, LeaseExtension, Store

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
COMPLETED = StatusAnswer(
    outcome=Outcome.COMPLETED, http_status=200, output_url="https://x.s3.amazonaws.com/a.csv"
)


def claimed_with(engine: sa.Engine, state: State, **counters: int) -> Tracked:
    store = Store(engine)
    store.enqueue("plan1")
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "UPDATE tracker_batches SET state = :state, checks = :checks, faults = :faults,"
                " rejections = :rejections, download_attempts = :attempts"
            ),
            {
                "state": state.value,
                "checks": counters.get("checks", 0),
                "faults": counters.get("faults", 0),
                "rejections": counters.get("rejections", 0),
                "attempts": counters.get("download_attempts", 0),
            },
        )
    (batch,) = store.claim_due("me", 1, 300, NOW)
    return batch


@pytest.mark.parametrize("state", [State.PENDING, State.PROCESSING, State.READY])
def test_the_ready_write_keeps_the_lease_of_the_planned_batch(
    engine: sa.Engine, state: State
) -> None:
    store = Store(engine)
    batch = claimed_with(engine, state, checks=4, faults=2, rejections=1, download_attempts=1)
    decision = decide_on_answer(batch, COMPLETED, PollPolicy(), NOW, random.Random(0))
    plan = plan_download(batch, decision)
    assert plan is not None
    assert store.apply([BatchWrite(batch, plan.ready, keep_lease=True)], NOW) == [True]
    row = store.get("plan1")
    assert row is not None and row.lease_owner == "me"
    stored = Tracked(
        id=row.id,
        request_id=row.request_id,
        state=State(row.state),
        lease_token=row.lease_token,
        checks=row.checks,
        faults=row.faults,
        rejections=row.rejections,
        download_attempts=row.download_attempts,
        created_at=row.created_at,
        claimed_at=plan.batch.claimed_at,  # the same lease, still held
    )
    # The row is the planned batch but for the fault and rejection streaks, which the ready
    # write resets (Deepvue answered) and a download problem counts on from the claimed ones.
    assert stored == replace(plan.batch, faults=0, rejections=0)
    # The lease is still ours: the download's keep-alive and its final write both apply.
    assert store.apply([LeaseExtension(plan.batch, 300)], NOW) == [True]
    done = decide_on_download_done(plan.batch, 10, "ab" * 32)
    assert store.apply([BatchWrite(plan.batch, done)], NOW) == [True]
