"""Migrations build exactly the declared schema, on both backends, and tolerate racing."""

from __future__ import annotations

import subprocess
import sys

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from tracker.db import create_engine_for, pending_migrations, upgrade_database
from tracker.schema import metadata


def _schema_diff(url: str) -> list[object]:
    engine = create_engine_for(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(
                connection, opts={"compare_type": True, "compare_server_default": False}
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
