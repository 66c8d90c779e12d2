"""Flat with history: claiming due batches must not slow down as final batches pile up.

Two databases per backend, side by side: one holds only the due batches, the other the same
due batches plus a large history of final ones (bulk-loaded with one SQL statement). Each
round runs the real `Store.claim_due` in a loop (10 claims of 100) on both, then hands the
leases back outside the timing; the figure is the ratio of the medians. The query plan of
the claim, as the real code issues it, is printed for the big table.

Run alone: `python bench/history.py [--quick]`.
"""

from __future__ import annotations

import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import sqlalchemy as sa

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    Figure,
    backends,
    database,
    median,
    pg_admin_engine,
    ratio_of,
    run_alone,
    say,
    temp_dir,
    utcnow,
)

from tests.statements import first_starting, sent_statements

DUE = 1000
CLAIMS = 10
CLAIM_SIZE = 100
TARGET = 1.5

# One statement each. Final rows look like real ones: finished, with a file, no lease.
_PG_HISTORY = """
INSERT INTO tracker_batches (request_id, state, created_at, updated_at, finished_at,
                             checks, api_status, api_message, file_path, file_size, file_sha256)
SELECT 'done-' || n, 'downloaded', now() - interval '2 days', now() - interval '1 day',
       now() - interval '1 day', 3, 200, 'batch processing completed',
       '/srv/out/done-' || n || '.csv', 4096, md5(n::text) || md5(n::text)
FROM generate_series(1, :rows) AS n
"""
_SQLITE_HISTORY = """
WITH RECURSIVE seq(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM seq WHERE n < :rows)
INSERT INTO tracker_batches (request_id, state, created_at, updated_at, finished_at,
                             checks, api_status, api_message, file_path, file_size, file_sha256)
SELECT 'done-' || n, 'downloaded', datetime('now', '-2 days'), datetime('now', '-1 day'),
       datetime('now', '-1 day'), 3, 200, 'batch processing completed',
       '/srv/out/done-' || n || '.csv', 4096, printf('%064d', n)
FROM seq
"""


def load_history(engine: sa.Engine, rows: int) -> float:
    """Bulk-load `rows` final batches; seconds taken."""
    started = time.monotonic()
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            # A wake-up NOTIFY per history row is pointless work for a bulk load.
            connection.execute(sa.text("ALTER TABLE tracker_batches DISABLE TRIGGER USER"))
            connection.execute(sa.text(_PG_HISTORY), {"rows": rows})
            connection.execute(sa.text("ALTER TABLE tracker_batches ENABLE TRIGGER USER"))
        else:
            connection.execute(sa.text(_SQLITE_HISTORY), {"rows": rows})
    return time.monotonic() - started


def analyze(engine: sa.Engine) -> None:
    """What autovacuum (PostgreSQL) or an operator's ANALYZE would have done by now."""
    with engine.connect() as connection:
        if engine.dialect.name == "postgresql":
            connection.execution_options(isolation_level="AUTOCOMMIT").execute(
                sa.text("VACUUM ANALYZE tracker_batches")
            )
        else:
            connection.execute(sa.text("ANALYZE"))
            connection.commit()


def add_due(engine: sa.Engine) -> None:
    from tracker.schema import batches

    with engine.begin() as connection:
        connection.execute(batches.insert(), [{"request_id": f"due-{i:05d}"} for i in range(DUE)])


def release_all(engine: sa.Engine) -> None:
    from tracker.schema import batches

    with engine.begin() as connection:
        connection.execute(
            batches.update()
            .where(batches.c.lease_owner.is_not(None))
            .values(lease_owner=None, lease_expires_at=None)
        )


def claim_round(store: Any) -> float:
    """Seconds to find and claim every due batch, CLAIMS x CLAIM_SIZE, with the real code."""
    now = utcnow()
    started = time.perf_counter()
    claimed = 0
    for _ in range(CLAIMS):
        claimed += len(store.claim_due("bench", CLAIM_SIZE, 300.0, now))
    elapsed = time.perf_counter() - started
    if claimed != DUE:
        raise RuntimeError(f"claimed {claimed} batches, expected {DUE}")
    return elapsed


def query_plan(engine: sa.Engine, store: Any) -> list[str]:
    """EXPLAIN of the claim statement exactly as `Store.claim_due` sends it (not executed)."""
    with sent_statements(engine) as sent:
        # Real time, with due rows left: the plan the planner picks at work (it claims them).
        store.claim_due("plan", CLAIM_SIZE, 300.0, utcnow())
    # The claim's transaction also refreshes the owner's heartbeat: pick the claim itself.
    statement, parameters = first_starting(sent, "UPDATE tracker_batches")
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        if engine.dialect.name == "postgresql":
            cursor.execute("EXPLAIN " + statement, parameters)
            lines = [row[0] for row in cursor.fetchall()]
        else:
            cursor.execute("EXPLAIN QUERY PLAN " + statement, parameters)
            lines = [f"{'  ' * (row[1] and 1)}{row[3]}" for row in cursor.fetchall()]
        raw.rollback()
    finally:
        raw.close()
    return lines


def history_figure(
    backend: str, admin: sa.Engine | None, history: int, rounds: int
) -> tuple[Figure, list[str]]:
    from tracker.db import create_engine_for
    from tracker.store import Store

    with ExitStack() as stack:
        small_dir = stack.enter_context(temp_dir())
        big_dir = stack.enter_context(temp_dir())
        small_url = stack.enter_context(database(backend, admin, small_dir))
        big_url = stack.enter_context(database(backend, admin, big_dir))
        small = create_engine_for(small_url)
        big = create_engine_for(big_url)
        stack.callback(small.dispose)
        stack.callback(big.dispose)
        say(f"history/{backend}: bulk-loading {history:,} final batches")
        load_seconds = load_history(big, history)
        add_due(small)
        add_due(big)
        analyze(small)
        analyze(big)
        stores = {"small": Store(small), "big": Store(big)}
        engines = {"small": small, "big": big}
        timings: dict[str, list[float]] = {"small": [], "big": []}
        say(f"history/{backend}: {rounds} rounds of {CLAIMS} claims of {CLAIM_SIZE}, interleaved")
        for round_number in range(rounds + 1):
            # Alternate which table goes first so neither always meets a warm cache.
            order = ("small", "big") if round_number % 2 else ("big", "small")
            for which in order:
                seconds = claim_round(stores[which])
                release_all(engines[which])
                if round_number:  # the first round only warms caches and the pool
                    timings[which].append(seconds)
        plan = query_plan(big, stores["big"])
        release_all(big)
    with_history = median(timings["big"])
    without = median(timings["small"])
    ratio = ratio_of(with_history, without)
    figure = Figure(
        f"history: claim {DUE} due as {CLAIMS}x{CLAIM_SIZE}, {backend}, + {history:,} final",
        with_history * 1000,
        without * 1000,
        "ms",
        f"ms with only the {DUE}",
        ratio,
        f"<= {TARGET}",
        ratio is not None and ratio <= TARGET,
        note=(
            f"median of {rounds} interleaved rounds; history bulk-loaded in {load_seconds:.1f} s"
        ),
        details=[f"query plan of the claim ({backend}, {history:,} final rows):", *plan],
    )
    return figure, plan


def run(quick: bool) -> list[Figure]:
    history = 100_000 if quick else 1_000_000
    rounds = 5 if quick else 11
    admin = pg_admin_engine()
    figures = []
    try:
        for backend in backends(admin):
            figure, _ = history_figure(backend, admin, history, rounds)
            figures.append(figure)
        if admin is None:
            from common import skipped

            figures.append(skipped("history: PostgreSQL", f"<= {TARGET}", "no PostgreSQL answered"))
    finally:
        if admin is not None:
            admin.dispose()
    return figures


def main(argv: list[str]) -> int:
    return run_alone("history.py", run, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
