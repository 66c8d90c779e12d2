"""Alembic environment shared by `tracker db upgrade` and the `alembic` command.

`tracker db upgrade` hands over an open connection in `config.attributes["connection"]`;
the `alembic` command builds one from TRACKER_DATABASE_URL.
"""

from __future__ import annotations

import os

import sqlalchemy as sa
from alembic import context

from tracker.db import create_engine_for, migration_lock
from tracker.schema import metadata

config = context.config


def run_migrations(connection: sa.Connection) -> None:
    if connection.dialect.name != "sqlite":
        _run_migrations(connection)
        return
    # A batch-mode rebuild on SQLite drops the old table, and with foreign keys on that
    # DROP deletes every row first, cascading to the rows that reference it (every
    # transition, for tracker_batches). The pragma is a no-op inside a transaction, and
    # the connection's first statement would begin one (BEGIN IMMEDIATE, tracker/db.py):
    # so it is set on the driver's connection before, and put back after. Alembic's own
    # advice for batch mode; foreign_key_check below stands in for the checks skipped.
    restore = _sqlite_foreign_keys(connection, on=False)
    try:
        _run_migrations(connection)
    finally:
        if restore:
            _sqlite_foreign_keys(connection, on=True)


def _sqlite_foreign_keys(connection: sa.Connection, *, on: bool) -> bool:
    """Set PRAGMA foreign_keys outside any transaction; whether it was changed."""
    if connection.in_transaction():
        return False
    driver = connection.connection.driver_connection
    assert driver is not None
    was = bool(driver.execute("PRAGMA foreign_keys").fetchone()[0])
    if was == on:
        return False
    driver.execute(f"PRAGMA foreign_keys = {'ON' if on else 'OFF'}")
    return True


def _run_migrations(connection: sa.Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # SQLite can roll DDL back too; a failed migration then leaves nothing half done.
        transactional_ddl=True,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        # Two instances starting at once: the second waits here, then finds nothing to do.
        migration_lock(connection)
        context.run_migrations()
        if connection.dialect.name == "sqlite":
            broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
            if broken:
                raise RuntimeError(f"migration left rows with no parent: {broken[:5]}")


def main() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        run_migrations(connection)
        return
    url = os.environ.get("TRACKER_DATABASE_URL", "sqlite:///tracker.db")
    engine = create_engine_for(url)
    try:
        with engine.connect() as connection:
            run_migrations(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run them against a database")
main()
