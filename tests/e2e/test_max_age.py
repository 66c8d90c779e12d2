"""A batch past TRACKER_MAX_AGE expires within about a sweep interval, whatever its
next_check_at says: a real `tracker run` against the simulator, rows written by raw SQL."""

from __future__ import annotations

import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.e2e.support import FakeApi, migrate, raw_insert, states, tracker_env, wait_until
from tracker.db import create_engine_for

pytestmark = pytest.mark.e2e


def test_a_batch_parked_far_ahead_still_expires_at_its_maximum_age(
    e2e_database_url: str, tmp_path: Path, fake_api: Any, run_daemon: Any
) -> None:
    api: FakeApi = fake_api("--completion-delay", "60")
    migrate(e2e_database_url)
    parked, young = f"parked{uuid.uuid4().hex[:8]}", f"young{uuid.uuid4().hex[:8]}"
    raw_insert(e2e_database_url, [parked, young])
    engine = create_engine_for(e2e_database_url)
    try:
        with engine.begin() as connection:
            # Created long ago, next check in 2999 (a huge Retry-After, or a hand edit).
            connection.execute(
                sa.text(
                    "UPDATE tracker_batches SET next_check_at = :far, created_at = :old "
                    "WHERE request_id = :rid"
                ),
                {"far": "2999-01-01 00:00:00", "old": "2000-01-01 00:00:00", "rid": parked},
            )
    finally:
        engine.dispose()
    env = tracker_env(
        e2e_database_url,
        api.url,
        tmp_path / "out",
        TRACKER_MAX_AGE="1h",
        TRACKER_SWEEP_INTERVAL="1",
        TRACKER_RATE_PER_DAY="1000000",
    )
    daemon = run_daemon(env)
    started = time.monotonic()
    wait_until(
        lambda: states(e2e_database_url)[parked] == "expired", 20, "the parked batch to expire"
    )
    took = time.monotonic() - started
    assert daemon.stop(signal.SIGTERM) == 0
    print(f"\nFIGURES max age: a batch parked until 2999 expired {took:.1f} s after the start")
    # The young batch is untouched by the rule: still being polled.
    assert states(e2e_database_url)[young] == "processing"
