"""Migrations build exactly the declared schema, on both backends, and tolerate racing."""

from __future__ import annotations

import subprocess
import sys
import zlib
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from tracker.db import create_engine_for, pending_migrations, upgrade_database
from tracker.schema import POSTGRESQL_ONLY_INDEXES, metadata


def _schema_diff(url: str) -> list[object]:
    engine = create_engine_for(url)
    on_sqlite = engine.dialect.name == "sqlite"

    def declared_here(item: object, name: str | None, kind: str, *_: object) -> bool:
        return not (on_sqlite and kind == "index" and name in POSTGRESQL_ONLY_INDEXES)

    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(
                connection,
                opts={
                    "compare_type": True,
                    "compare_server_default": False,
                    "include_object": declared_here,
                },
            )
            return list(compare_metadata(context, metadata))
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def empty_url(request: pytest.FixtureRequest) -> str:
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_url"))
    return str(request.getfixturevalue("empty_pg_url"))


def test_migrated_schema_matches_the_declared_one(empty_url: str) -> None:
    engine = create_engine_for(empty_url)
    assert pending_migrations(engine) != []
    upgrade_database(engine)
    assert pending_migrations(engine) == []
    engine.dispose()
    assert _schema_diff(empty_url) == []


@pytest.mark.postgres
def test_migrated_indexes_have_the_declared_operator_classes(empty_pg_url: str) -> None:
    """Alembic's comparison ignores operator classes; a prefix search depends on one."""
    engine = create_engine_for(empty_pg_url)
    try:
        upgrade_database(engine)
        reflected = {
            index["name"]: index["dialect_options"].get("postgresql_ops", {})
            for index in sa.inspect(engine).get_indexes("tracker_batches")
        }
    finally:
        engine.dispose()
    declared = {
        index.name: index.dialect_options["postgresql"]["ops"]
        for index in metadata.tables["tracker_batches"].indexes
    }
    assert declared["ix_tracker_batches_request_id_pattern"] == {"request_id": "text_pattern_ops"}
    assert {name: reflected[name] for name in declared} == declared


def test_upgrade_is_idempotent(empty_url: str) -> None:
    engine = create_engine_for(empty_url)
    upgrade_database(engine)
    upgrade_database(engine)
    with engine.connect() as connection:
        tables = set(sa.inspect(connection).get_table_names())
    engine.dispose()
    assert {"tracker_batches", "tracker_transitions", "alembic_version"} <= tables


def test_two_instances_migrating_at_once_both_succeed(empty_url: str, tmp_path: object) -> None:
    command = [sys.executable, "-m", "tracker", "db", "upgrade"]
    env = {"TRACKER_DATABASE_URL": empty_url, "PATH": "/usr/bin:/bin"}
    # Run from an unrelated directory: the scripts must be found inside the package.
    runs = [
        subprocess.Popen(
            command, env=env, cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(3)
    ]
    errors = [run.communicate(timeout=120)[1].decode() for run in runs]
    assert [run.returncode for run in runs] == [0, 0, 0], errors
    assert _schema_diff(empty_url) == []


def test_sqlite_never_reuses_batch_ids(sqlite_url: str) -> None:
    """Leases are fenced by (id, token): a deleted row's id must not come back."""
    engine = create_engine_for(sqlite_url)
    upgrade_database(engine)
    with engine.begin() as connection:
        connection.execute(sa.text("INSERT INTO tracker_batches (request_id) VALUES ('a')"))
        connection.execute(sa.text("DELETE FROM tracker_batches"))
        connection.execute(sa.text("INSERT INTO tracker_batches (request_id) VALUES ('b')"))
        new_id = connection.execute(sa.text("SELECT id FROM tracker_batches")).scalar_one()
    engine.dispose()
    assert new_id == 2


def test_schema_head_constant_names_the_newest_migration(empty_url: str) -> None:
    from alembic.script import ScriptDirectory

    from tracker.db import SCHEMA_HEAD, _alembic_config, schema_is_current

    engine = create_engine_for(empty_url)
    with engine.connect() as connection:
        heads = ScriptDirectory.from_config(_alembic_config(connection)).get_heads()
    assert heads == [SCHEMA_HEAD]
    assert not schema_is_current(engine)
    upgrade_database(engine)
    assert schema_is_current(engine)
    engine.dispose()


# --- every downgrade keeps the data ------------------------------------------------------

ROUND_TRIP_AT = datetime(2026, 12, 1, 12, 30, 15, 250000, tzinfo=UTC)


def _revisions_oldest_first(engine: sa.Engine) -> list[tuple[str, str]]:
    """(revision, the one it revises or "base"), for whatever migrations exist."""
    from alembic.script import ScriptDirectory

    from tracker.db import _alembic_config

    with engine.connect() as connection:
        script = ScriptDirectory.from_config(_alembic_config(connection))
    steps = [
        (revision.revision, str(revision.down_revision or "base"))
        for revision in script.walk_revisions()
    ]
    return steps[::-1]


def _migrate(engine: sa.Engine, direction: str, target: str) -> None:
    from alembic import command

    from tracker.db import _alembic_config

    with engine.connect() as connection:
        getattr(command, direction)(_alembic_config(connection), target)


# Representative values for every column the migrations have created so far; a column not
# named here gets a value from its type (see _value_for).
_BATCH_VALUES: dict[str, object] = {
    "label": "round-trip",
    "created_at": ROUND_TRIP_AT,
    "updated_at": ROUND_TRIP_AT,
    "next_check_at": ROUND_TRIP_AT,
    "checks": 3,
    "api_status": 200,
    "api_message": "completed",
    "file_path": "/srv/out/x.csv",
    "file_size": 1234,
    "file_sha256": "ab" * 32,
    "last_error": "an error\nover two lines",
    "finished_at": ROUND_TRIP_AT,
    "faults": 1,
    "rejections": 2,
    "download_attempts": 1,
    "lease_owner": "host:1:abc",
    "lease_token": 7,
    "lease_expires_at": ROUND_TRIP_AT,
    "hook_pending": True,
}
_TRANSITION_VALUES: dict[str, object] = {
    "from_state": "pending",
    "to_state": "processing",
    "at": ROUND_TRIP_AT,
    "api_status": 200,
    "api_message": "in progress",
    "detail": "Deepvue reports the batch in progress",
}
_INSTANCE_VALUES: dict[str, object] = {
    "host": "host-a",
    "pid": 4242,
    "started_at": ROUND_TRIP_AT,
    "last_sweep_at": ROUND_TRIP_AT,
    "stopped_at": None,
    "heartbeat_at": ROUND_TRIP_AT,
    "boot_id": "0f5e0b1c-boot",
}


def _value_for(column: sa.Column[Any], n: int) -> object:
    kind = column.type
    if isinstance(kind, sa.Boolean):
        return True
    if isinstance(kind, sa.Integer):
        return n
    if isinstance(kind, sa.Float | sa.Numeric):
        return n + 0.5
    if isinstance(kind, sa.DateTime):
        return ROUND_TRIP_AT
    return f"value-{n}"


def _row(table: sa.Table, named: dict[str, object], n: int) -> dict[str, object]:
    row: dict[str, object] = {}
    for column in table.columns:
        if column.name in named:
            row[column.name] = named[column.name]
        elif not column.nullable and column.server_default is None and not column.primary_key:
            row[column.name] = _value_for(column, n)
    return row


def _insert_representative_rows(engine: sa.Engine, tag: str) -> None:
    """Rows in every table, with every column set; and a deleted batch, so that SQLite's
    AUTOINCREMENT counter runs ahead of the ids in use."""
    reflected = sa.MetaData()
    reflected.reflect(engine)
    tables = reflected.tables
    with engine.begin() as connection:
        if "tracker_batches" in tables:
            batches = tables["tracker_batches"]
            ids = []
            for n, state in enumerate(("pending", "ready", "downloaded", "failed")):
                values = _row(batches, _BATCH_VALUES, n) | {
                    "request_id": f"rt-{tag}-{n}",
                    "state": state,
                }
                key = connection.execute(batches.insert().values(values)).inserted_primary_key
                assert key is not None
                ids.append(key[0])
            connection.execute(
                batches.insert().values(request_id=f"rt-{tag}-deleted", state="cancelled")
            )
            connection.execute(batches.delete().where(batches.c.request_id == f"rt-{tag}-deleted"))
            if "tracker_transitions" in tables:
                moves = tables["tracker_transitions"]
                for n, batch_id in enumerate(ids):
                    connection.execute(
                        moves.insert().values(
                            _row(moves, _TRANSITION_VALUES, n)
                            | {"batch_id": batch_id, "request_id": f"rt-{tag}-{n}"}
                        )
                    )
        if "tracker_quota_usage" in tables:
            usage = tables["tracker_quota_usage"]
            for n, window in enumerate(("second", "minute", "day")):
                values = {
                    "window_name": window,
                    "bucket": zlib.crc32(tag.encode()) * 10 + n,
                    "used": n + 1,
                }
                connection.execute(usage.insert().values(values))
        if "tracker_quota_state" in tables:
            state_table = tables["tracker_quota_state"]
            connection.execute(state_table.update().values(paused_until=1_764_590_000.25))
        if "tracker_instances" in tables:
            instances = tables["tracker_instances"]
            for n in range(2):
                values = _row(instances, _INSTANCE_VALUES, n) | {"owner": f"host-a:{tag}:{n}"}
                connection.execute(instances.insert().values(values))
        known = {
            "tracker_batches",
            "tracker_transitions",
            "tracker_quota_usage",
            "tracker_quota_state",
            "tracker_instances",
            "alembic_version",
        }
        for name, table in tables.items():
            if name not in known:  # a table from a newer migration: one generic row
                connection.execute(table.insert().values(_row(table, {}, 1)))


Snapshot = dict[str, dict[str, list[tuple[object, ...]]]]


def _snapshot(engine: sa.Engine) -> tuple[Snapshot, dict[str, list[str]]]:
    """Every table's rows, column by column; and each table's column names."""
    reflected = sa.MetaData()
    reflected.reflect(engine)
    rows: Snapshot = {}
    columns: dict[str, list[str]] = {}
    with engine.connect() as connection:
        for name, table in reflected.tables.items():
            if name == "alembic_version":
                continue
            names = sorted(column.name for column in table.columns)
            columns[name] = names
            data = connection.execute(sa.select(*(table.c[c] for c in names))).all()
            rows[name] = {"*": sorted(tuple(map(repr, row)) for row in data)}
        if engine.dialect.name == "sqlite":
            sequence = connection.execute(sa.text("SELECT name, seq FROM sqlite_sequence")).all()
            rows["sqlite_sequence"] = {"*": sorted(tuple(row) for row in sequence)}
            columns["sqlite_sequence"] = ["*"]
    return rows, columns


def _common(
    before: tuple[Snapshot, dict[str, list[str]]],
    after: tuple[Snapshot, dict[str, list[str]]],
    within: dict[str, list[str]] | None = None,
) -> tuple[dict[str, object], dict[str, object]]:
    """The rows of the tables in both snapshots (and in `within`), on the columns all have."""
    (rows_a, columns_a), (rows_b, columns_b) = before, after
    within = within if within is not None else columns_a
    tables = set(columns_a) & set(columns_b) & set(within)
    left: dict[str, object] = {}
    right: dict[str, object] = {}
    for name in sorted(tables):
        if name == "sqlite_sequence":
            left[name] = [row for row in rows_a[name]["*"] if row[0] in tables]
            right[name] = [row for row in rows_b[name]["*"] if row[0] in tables]
            continue
        shared = sorted(set(columns_a[name]) & set(columns_b[name]) & set(within[name]))
        left[name] = _project(rows_a[name]["*"], columns_a[name], shared)
        right[name] = _project(rows_b[name]["*"], columns_b[name], shared)
    return left, right


def _project(
    rows: list[tuple[object, ...]], names: list[str], keep: list[str]
) -> list[tuple[object, ...]]:
    indexes = [names.index(name) for name in keep]
    return sorted(tuple(row[i] for i in indexes) for row in rows)


def test_every_downgrade_keeps_the_data_and_every_upgrade_restores_it(empty_url: str) -> None:
    engine = create_engine_for(empty_url)
    try:
        steps = _revisions_oldest_first(engine)
        assert steps[0][1] == "base" and len(steps) >= 4
        for revision, previous in steps:
            _migrate(engine, "upgrade", revision)
            _insert_representative_rows(engine, revision)
            at_revision = _snapshot(engine)
            _migrate(engine, "downgrade", previous)
            below = _snapshot(engine)
            before, after = _common(at_revision, below)
            assert after == before, f"downgrade {revision} -> {previous} changed the rows"
            # Up again: what the lower revision kept comes back unchanged.
            _migrate(engine, "upgrade", revision)
            before, after = _common(at_revision, _snapshot(engine), within=below[1])
            assert after == before, f"downgrade and upgrade again of {revision} changed the rows"
        # And all the way down, one step at a time, with every revision's rows present.
        for revision, previous in reversed(steps[1:]):
            at_revision = _snapshot(engine)
            _migrate(engine, "downgrade", previous)
            before, after = _common(at_revision, _snapshot(engine))
            assert after == before, f"downgrade {revision} -> {previous} changed the rows"
    finally:
        engine.dispose()


def test_downgrades_keep_the_data_on_a_sqlite_without_drop_column(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite before 3.35 rebuilds the table instead: that must keep the data too."""
    import sqlite3

    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 34, 1))
    test_every_downgrade_keeps_the_data_and_every_upgrade_restores_it(sqlite_url)
