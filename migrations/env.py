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
