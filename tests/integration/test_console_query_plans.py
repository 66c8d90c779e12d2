"""The list page reads by keyset through an index, so a page costs the same in a table of a
million finished rows as in an empty one: the query plans say so.

Its filters too: a label's page walks (label, id) and a request_id prefix narrows an index
to its range (migration 0008), where before it read the whole table for a rare label or,
on PostgreSQL, any prefix. Those plans are checked on a table with enough rows, analyzed,
for the planner to weigh its choices, and against the same table before 0008.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from alembic import command

from tracker.db import _alembic_config, create_engine_for, upgrade_database
from tracker.schema import batches
from tracker.store import Store, batch_page_query


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
        # A label's entries end with the id: its page is read newest first, without sorting.
        (
            {"label": "nightly"},
            "SEARCH tracker_batches USING INDEX ix_tracker_batches_label_id (label=?)",
        ),
        (
            {"label": "nightly", "before_id": 500_000},
            "SEARCH tracker_batches USING INDEX ix_tracker_batches_label_id (label=? AND id<?)",
        ),
        # Both filters: (state, label, id), exact, in id order.
        (
            {"state": "downloaded", "label": "nightly"},
            "SEARCH tracker_batches USING INDEX ix_tracker_batches_state_label_id "
            "(state=? AND label=?)",
        ),
        (
            {"state": "failed", "label": "nightly", "before_id": 500_000},
            "SEARCH tracker_batches USING INDEX ix_tracker_batches_state_label_id "
            "(state=? AND label=? AND id<?)",
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


# --- the label and prefix filters, on a filled and analyzed table ------------------------

ROWS = 20_000
# On the 10 oldest rows only: read along the primary key, its page would read every row.
RARE_LABEL = "audit"
# One row in 20, spread over the table.
COMMON_LABEL = "label-7"
# As many rows, all among the oldest tenth (half of it): a label no longer used. Taking its rows as
# spread, a planner walking the primary key would pass nine tenths of the table first.
RETIRED_LABEL = "retired"
# One row in 1,000 failed, none of them with COMMON_LABEL: taking state and label as
# independent, a planner expects a page of failed label-7 rows along the primary key.
RARE_STATE = "failed"
# Request ids are hex, spread as real ones are (a multiplicative hash on SQLite, md5 on
# PostgreSQL), so a prefix's rows lie all over the id order.
_SQLITE_FILL = """
WITH RECURSIVE seq(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM seq WHERE n < :rows)
INSERT INTO tracker_batches (request_id, label, state, finished_at)
SELECT printf('%08x', (n * 2654435761) % 4294967296),
       CASE WHEN n <= 10 THEN 'audit'
            WHEN n <= :rows / 10 AND n % 2 = 1 THEN 'retired' ELSE 'label-' || (n % 20) END,
       CASE WHEN n % 1000 = 0 THEN 'failed' ELSE 'downloaded' END, CURRENT_TIMESTAMP
FROM seq
"""
_PG_FILL = """
INSERT INTO tracker_batches (request_id, label, state, finished_at)
SELECT md5(n::text), CASE WHEN n <= 10 THEN 'audit'
            WHEN n <= :rows / 10 AND n % 2 = 1 THEN 'retired' ELSE 'label-' || (n % 20) END,
       CASE WHEN n % 1000 = 0 THEN 'failed' ELSE 'downloaded' END, now()
FROM generate_series(1, :rows) AS n
"""


def _filled(url: str, revision: str) -> sa.Engine:
    """An engine on `url` migrated to `revision`, with ROWS finished batches, analyzed."""
    engine = create_engine_for(url)
    with engine.connect() as connection:
        command.upgrade(_alembic_config(connection), revision)
    on_sqlite = engine.dialect.name == "sqlite"
    with engine.begin() as connection:
        connection.execute(sa.text(_SQLITE_FILL if on_sqlite else _PG_FILL), {"rows": ROWS})
    # As autovacuum leaves a table of old rows: analyzed, and (PostgreSQL) the pages marked
    # all-visible, which is what lets it read an index alone.
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(sa.text("ANALYZE" if on_sqlite else "VACUUM ANALYZE tracker_batches"))
    return engine


def _prefixes(engine: sa.Engine) -> tuple[str, str]:
    """A prefix that one row has, and one that a sixteenth of the rows have."""
    with engine.connect() as connection:
        request_id = connection.execute(
            sa.text("SELECT request_id FROM tracker_batches WHERE id = :id"), {"id": ROWS // 3}
        ).scalar_one()
    return request_id[:7], request_id[:1]


def _filter_cases(engine: sa.Engine) -> dict[str, dict[str, object]]:
    rare_prefix, common_prefix = _prefixes(engine)
    return {
        "rare label": {"label": RARE_LABEL},
        "common label": {"label": COMMON_LABEL},
        "common label, next page": {"label": COMMON_LABEL, "before_id": ROWS // 2},
        "retired label": {"label": RETIRED_LABEL},
        "rare prefix": {"request_id_prefix": rare_prefix},
        "common prefix": {"request_id_prefix": common_prefix},
        "common prefix, next page": {"request_id_prefix": common_prefix, "before_id": ROWS // 2},
        "rare state, common label": {"state": RARE_STATE, "label": COMMON_LABEL},
        "common state, rare label": {"state": "downloaded", "label": RARE_LABEL},
    }


def _sqlite_plans(engine: sa.Engine) -> dict[str, str]:
    return {
        name: _plan(engine, batch_page_query("sqlite", limit=51, **filters), "EXPLAIN QUERY PLAN")  # type: ignore[arg-type]
        for name, filters in _filter_cases(engine).items()
    }


def _pg_plans(engine: sa.Engine) -> dict[str, str]:
    return {
        name: _plan(engine, batch_page_query("postgresql", limit=51, **filters), "EXPLAIN")  # type: ignore[arg-type]
        for name, filters in _filter_cases(engine).items()
    }


def test_sqlite_filters_a_filled_analyzed_table_through_indexes(sqlite_url: str) -> None:
    engine = _filled(sqlite_url, "head")
    try:
        plans = _sqlite_plans(engine)
    finally:
        engine.dispose()
    label_page = "SEARCH tracker_batches USING INDEX ix_tracker_batches_label_id (label=?)"
    both_filters = (
        "SEARCH tracker_batches USING INDEX ix_tracker_batches_state_label_id (state=? AND label=?)"
    )
    prefix_range = (
        "SEARCH tracker_batches USING INDEX sqlite_autoindex_tracker_batches_1 "
        "(request_id>? AND request_id<?)\nUSE TEMP B-TREE FOR ORDER BY"
    )
    # A common prefix's next page may instead walk the rowid down from the cursor: a
    # sixteenth of the rows fills it after some 800.
    rowid_walk = "SEARCH tracker_batches USING INTEGER PRIMARY KEY (rowid<?)"
    assert plans.pop("common prefix, next page") in {prefix_range, rowid_walk}
    assert plans == {
        "rare label": label_page,
        "common label": label_page,
        "common label, next page": label_page.replace("(label=?)", "(label=? AND id<?)"),
        "retired label": label_page,
        "rare prefix": prefix_range,
        "common prefix": prefix_range,
        "rare state, common label": both_filters,
        "common state, rare label": both_filters,
    }


def test_sqlite_before_0008_scans_the_table_for_a_label(sqlite_url: str) -> None:
    """The control: the same table and filters without the migration read every row."""
    engine = _filled(sqlite_url, "0007")
    try:
        plans = _sqlite_plans(engine)
    finally:
        engine.dispose()
    assert plans["rare label"] == "SCAN tracker_batches"
    assert plans["common label"] == "SCAN tracker_batches"


@pytest.mark.postgres
def test_postgresql_filters_a_filled_analyzed_table_through_indexes(pg_url: str) -> None:
    engine = _filled(pg_url, "head")
    try:
        plans = _pg_plans(engine)
    finally:
        engine.dispose()
    for name, plan in plans.items():
        assert "Seq Scan" not in plan, (name, plan)
    # A label's page takes its ids from (label, id) alone, newest first, and stops after
    # the page, for a rare, a common or a retired label; both filters from (state, label,
    # id). Then the page's rows by id, and the page sorted.
    label_ids = "Index Only Scan Backward using ix_tracker_batches_label_id"
    for name in ("rare label", "common label", "common label, next page", "retired label"):
        assert label_ids in plans[name], plans[name]
    both_ids = "Index Only Scan Backward using ix_tracker_batches_state_label_id"
    for name in ("rare state, common label", "common state, rare label"):
        assert both_ids in plans[name], plans[name]
    # A rare prefix narrows the pattern index to its range; the few matches are sorted.
    assert "ix_tracker_batches_request_id_pattern" in plans["rare prefix"], plans["rare prefix"]
    assert "request_id ~>=~" in plans["rare prefix"], plans["rare prefix"]
    # A common prefix: either that range, or the primary key backwards until the page is
    # full, which a sixteenth of the rows fills after some 800 of them.
    for name in ("common prefix", "common prefix, next page"):
        assert (
            "ix_tracker_batches_request_id_pattern" in plans[name]
            or "Index Scan Backward using pk_tracker_batches" in plans[name]
        ), plans[name]


@pytest.mark.postgres
def test_postgresql_before_0008_reads_the_table_for_a_rare_label_or_prefix(pg_url: str) -> None:
    """The control: without the migration, no index narrows these filters."""
    engine = create_engine_for(pg_url)
    with engine.connect() as connection:
        command.downgrade(_alembic_config(connection), "0007")
    engine.dispose()
    engine = _filled(pg_url, "0007")
    try:
        plans = _pg_plans(engine)
    finally:
        engine.dispose()
    for name in ("rare label", "rare prefix"):
        assert "ix_tracker_batches" not in plans[name], plans[name]
        assert "Seq Scan" in plans[name] or "Filter" in plans[name], plans[name]


@pytest.mark.parametrize(
    "filters",
    [
        {"label": RETIRED_LABEL},
        {"label": COMMON_LABEL},
        {"label": RARE_LABEL},
        {"state": RARE_STATE, "label": "label-0"},
        {"state": "downloaded", "label": COMMON_LABEL, "request_id_prefix": "a"},
    ],
    ids=repr,
)
def test_a_labels_pages_hold_each_of_its_rows_once_newest_first(
    database_url: str, filters: dict[str, str]
) -> None:
    """PostgreSQL's statement for a label (its ids first) pages like the plain one."""
    engine = _filled(database_url, "head")
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                sa.select(batches.c.id, batches.c.state, batches.c.label, batches.c.request_id)
            ).all()
        expected = sorted(
            (
                row.id
                for row in rows
                if row.label == filters["label"]
                and filters.get("state", row.state) == row.state
                and row.request_id.startswith(filters.get("request_id_prefix", ""))
            ),
            reverse=True,
        )
        store = Store(engine)
        shown: list[int] = []
        before_id: int | None = None
        while True:
            page = store.batch_page(limit=200, before_id=before_id, **filters)  # type: ignore[arg-type]
            shown += [row.id for row in page]
            if len(page) < 200:
                break
            before_id = page[-1].id
    finally:
        engine.dispose()
    assert expected, "the filter matches rows"
    assert shown == expected
