"""Reads that must not grow with the history of finished batches go through partial
indexes: the claim through ix_tracker_batches_due (unfinished rows), the overview's recent
errors through ix_tracker_batches_recent_errors (rows with an error). So a sweep, or the
console's overview, costs the same beside a million finished batches as beside none
(bench/history.py and bench/console.py measure it).

SQLite uses a partial index only when the query repeats the index's WHERE term as written;
a bound parameter never matches one, so `state IN (?, ?, ?)` made every claim read the
whole table.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from tests.statements import Sent, first_starting, sent_statements
from tracker.db import create_engine_for, upgrade_database
from tracker.store import Store


def _filled_sqlite(sqlite_url: str) -> tuple[sa.Engine, Store]:
    """Twenty open batches beside a history of 20,000 finished ones (one in 50 failed, with
    its error), and the statistics the planner weighs its choices by."""
    engine = create_engine_for(sqlite_url)
    upgrade_database(engine)
    store = Store(engine)
    store.enqueue_many([f"open-{n}" for n in range(20)])
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000) "
            "INSERT INTO tracker_batches (request_id, state, finished_at, last_error) "
            "SELECT 'done-' || i, CASE WHEN i % 50 = 0 THEN 'failed' ELSE 'downloaded' END, "
            "'2026-11-01 00:00:00', CASE WHEN i % 50 = 0 THEN 'batch failed' END FROM n"
        )
        connection.exec_driver_sql("ANALYZE")
    return engine, store


def _plan_of(engine: sa.Engine, sent: list[Sent], starts: str) -> list[str]:
    statement, parameters = first_starting(sent, starts)
    with engine.connect() as connection:
        explained = connection.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters)
        return [row[3] for row in explained]


def test_the_claim_reads_the_unfinished_rows_through_the_partial_index(sqlite_url: str) -> None:
    engine, store = _filled_sqlite(sqlite_url)
    with sent_statements(engine) as sent:
        assert len(store.claim_due("me", 5, 60, datetime.now(UTC))) == 5
    plan = _plan_of(engine, sent, "UPDATE tracker_batches")
    engine.dispose()
    # Through an index on the unfinished rows, never a walk over the whole table.
    assert "SCAN tracker_batches" not in plan, plan
    assert any("USING INDEX ix_tracker_batches_due" in step for step in plan), plan


def test_the_recent_errors_read_only_the_rows_with_an_error(sqlite_url: str) -> None:
    engine, store = _filled_sqlite(sqlite_url)
    with sent_statements(engine) as sent:
        errors = store.recent_errors(10)
    assert len(errors) == 10 and all(row.last_error == "batch failed" for row in errors)
    plan = _plan_of(engine, sent, "SELECT")
    engine.dispose()
    assert plan == ["SCAN tracker_batches USING INDEX ix_tracker_batches_recent_errors"], plan


@pytest.mark.postgres
def test_the_recent_errors_use_their_index_on_postgresql(pg_url: str) -> None:
    engine = create_engine_for(pg_url)
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "INSERT INTO tracker_batches (request_id, state, finished_at, last_error) "
            "SELECT 'done-' || i, CASE WHEN mod(i, 50) = 0 THEN 'failed' ELSE 'downloaded' END, "
            "now(), CASE WHEN mod(i, 50) = 0 THEN 'batch failed' END "
            "FROM generate_series(1, 20000) AS i"
        )
        connection.exec_driver_sql("ANALYZE tracker_batches")
    store = Store(engine)
    with sent_statements(engine) as sent:
        assert len(store.recent_errors(10)) == 10
    statement, parameters = first_starting(sent, "SELECT")
    with engine.connect() as connection:
        plan = "\n".join(
            str(row[0]) for row in connection.exec_driver_sql("EXPLAIN " + statement, parameters)
        )
    engine.dispose()
    assert "ix_tracker_batches_recent_errors" in plan, plan
    assert "Seq Scan" not in plan, plan
