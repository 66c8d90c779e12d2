"""The list page reads by keyset through an index, so a page costs the same in a table of a
million finished rows as in an empty one: the query plans say so."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from tracker.db import create_engine_for, upgrade_database
from tracker.store import batch_page_query


def _plan(engine: sa.Engine, query: sa.Select[object], explain: str) -> str:
    compiled = query.compile(dialect=engine.dialect)
    with engine.connect() as connection:
        if engine.dialect.name == "sqlite":
            parameters: object = tuple(compiled.params[name] for name in compiled.positiontup or ())
        else:
            parameters = compiled.params
        rows = connection.exec_driver_sql(f"{explain} {compiled}", parameters).all()  # type: ignore[arg-type]
    return "\n".join(str(row[-1]) for row in rows)


@pytest.fixture
def sqlite_engine(sqlite_url: str) -> Iterator[sa.Engine]:
    engine = create_engine_for(sqlite_url)
    upgrade_database(engine)
    yield engine
    engine.dispose()


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        # Walking the rowid backwards, stopping after the page: no sort, no search.
        ({}, "SCAN tracker_batches"),
        ({"before_id": 500_000}, "SEARCH tracker_batches USING INTEGER PRIMARY KEY (rowid<?)"),
        (
            {"state": "failed"},
            "SEARCH tracker_batches USING INDEX ix_tracker_batches_state (state=?)",
        ),
        (
            {"state": "failed", "before_id": 500_000},
            "SEARCH tracker_batches USING INDEX ix_tracker_batches_state (state=? AND rowid<?)",
        ),
        (
            {"state": "downloaded", "label": "nightly"},
            "SEARCH tracker_batches USING INDEX ix_tracker_batches_state (state=?)",
        ),
        # GLOB narrows to the prefix's range of the unique index; the matches are sorted.
        (
            {"request_id_prefix": "06d0d7c3"},
            "SEARCH tracker_batches USING INDEX sqlite_autoindex_tracker_batches_1 "
            "(request_id>? AND request_id<?)\nUSE TEMP B-TREE FOR ORDER BY",
        ),
    ],
    ids=lambda value: repr(value) if isinstance(value, dict) else "",
)
def test_sqlite_pages_through_an_index(
    sqlite_engine: sa.Engine, filters: dict[str, object], expected: str
) -> None:
    query = batch_page_query("sqlite", limit=51, **filters)  # type: ignore[arg-type]
    assert _plan(sqlite_engine, query, "EXPLAIN QUERY PLAN") == expected


@pytest.mark.postgres
def test_postgresql_reads_a_page_backwards_along_the_primary_key(pg_url: str) -> None:
    engine = create_engine_for(pg_url)
    try:
        with engine.begin() as connection:
            connection.execute(
                sa.text(
                    "INSERT INTO tracker_batches (request_id, state, finished_at) "
                    "SELECT 'plan-' || i, 'downloaded', now() FROM generate_series(1, 20000) i"
                )
            )
            connection.execute(sa.text("ANALYZE tracker_batches"))
        for filters in ({}, {"before_id": 10_000}):
            plan = _plan(engine, batch_page_query("postgresql", limit=51, **filters), "EXPLAIN")  # type: ignore[arg-type]
            assert "Index Scan Backward using pk_tracker_batches" in plan, plan
            assert "Sort" not in plan and "Seq Scan" not in plan, plan
    finally:
        engine.dispose()
