"""The claim reads only unfinished rows: on SQLite through the partial index
ix_tracker_batches_due, so a sweep costs the same beside a million finished batches as
beside none (bench/history.py measures it).

SQLite uses a partial index only when the query repeats the index's WHERE term as written;
a bound parameter never matches one, so `state IN (?, ?, ?)` made every claim read the
whole table.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from tracker.db import create_engine_for, upgrade_database
from tracker.store import Store


@contextmanager
def _statements(engine: sa.Engine) -> Iterator[list[tuple[str, Any]]]:
    seen: list[tuple[str, Any]] = []

    def record(connection: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        seen.append((statement, parameters))

    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)


def test_the_claim_reads_the_unfinished_rows_through_the_partial_index(sqlite_url: str) -> None:
    engine = create_engine_for(sqlite_url)
    upgrade_database(engine)
    store = Store(engine)
    store.enqueue_many([f"open-{n}" for n in range(20)])
    with engine.begin() as connection:
        # A history of finished batches, as a table in production holds, and its statistics.
        connection.exec_driver_sql(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000) "
            "INSERT INTO tracker_batches (request_id, state, finished_at) "
            "SELECT 'done-' || i, 'downloaded', '2026-11-01 00:00:00' FROM n"
        )
        connection.exec_driver_sql("ANALYZE")
    with _statements(engine) as seen:
        assert len(store.claim_due("me", 5, 60, datetime.now(UTC))) == 5
    claim, parameters = next(
        (sql, params) for sql, params in seen if sql.lstrip().startswith("UPDATE tracker_batches")
    )
    with engine.connect() as connection:
        plan = [
            row[3] for row in connection.exec_driver_sql("EXPLAIN QUERY PLAN " + claim, parameters)
        ]
    engine.dispose()
    # Through an index on the unfinished rows, never a walk over the whole table.
    assert "SCAN tracker_batches" not in plan, plan
    assert any("USING INDEX ix_tracker_batches_due" in step for step in plan), plan
