"""Engines for SQLite and PostgreSQL, and applying the Alembic migrations."""

from __future__ import annotations

import importlib.resources
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

# The newest migration. Checked against the scripts by a test; lets a daemon whose schema
# is current skip importing Alembic at all (a large share of an idle daemon's memory).
SCHEMA_HEAD = "0008"

# Any constant works; it only has to be the same for every instance of the tracker.
_MIGRATION_LOCK_KEY = 0x7472_6163_6B72  # "trackr"
SQLITE_BUSY_TIMEOUT_MS = 30_000


def create_engine_for(url: str, **options: Any) -> sa.Engine:
    """An engine set up for short, safe writes on either backend.

    SQLite gets WAL (readers never block the writer), a busy timeout (wait for the lock
    rather than fail), foreign keys, and BEGIN IMMEDIATE: a transaction takes the write
    lock when it starts, so two instances can never both read a row as unclaimed and then
    both claim it.
    """
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, **options)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            # Let SQLAlchemy's "begin" event below issue BEGIN itself.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA journal_mode = WAL")
            # NORMAL in WAL mode cannot corrupt the database; a power cut may lose the
            # last commits, which the lease model already tolerates (work is redone).
            cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(connection: sa.Connection) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    options.setdefault("pool_pre_ping", True)
    engine = sa.create_engine(url, **options)
    event.listen(engine, "connect", _load_any_timestamp)
    return engine


def _load_any_timestamp(dbapi_connection: Any, _record: Any) -> None:
    """Let psycopg pass 'infinity' and '-infinity' through as text instead of raising.

    Other applications may store them; one such row must not break every read of the
    table. The column type turns the text into an UnreadableTimestamp.
    """
    from psycopg import DataError
    from psycopg.types.datetime import TimestampLoader, TimestamptzLoader

    def tolerant(loader: type[Any]) -> type[Any]:
        class Tolerant(loader):  # type: ignore[misc]
            def load(self, data: Any) -> Any:
                try:
                    return super().load(data)
                except DataError:
                    return bytes(data).decode("utf-8", "replace")

        return Tolerant

    adapters = dbapi_connection.adapters
    adapters.register_loader("timestamptz", tolerant(TimestamptzLoader))
    adapters.register_loader("timestamp", tolerant(TimestampLoader))


def describe_db_error(error: BaseException, *, with_type: bool = True) -> str:
    """The first line of the driver's own message: enough for a log line, no SQL dump."""
    original = getattr(error, "orig", None) or error
    lines = str(original).strip().splitlines()
    first = lines[0] if lines else ""
    return f"{type(original).__name__}: {first}" if with_type else first


def migration_lock(connection: sa.Connection) -> None:
    """Serialise concurrent migrators; held until the migration transaction ends.

    SQLite needs nothing more: BEGIN IMMEDIATE already gave this connection the only
    write lock.
    """
    if connection.dialect.name == "postgresql":
        connection.execute(
            sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY}
        )


def _alembic_config(connection: sa.Connection) -> Any:
    from alembic.config import Config

    config = Config()
    # The scripts ship inside the package, so this works from a wheel in any directory.
    config.set_main_option("script_location", str(importlib.resources.files("tracker.migrations")))
    config.attributes["connection"] = connection
    return config


def schema_is_current(engine: sa.Engine) -> bool:
    """True when the database is at SCHEMA_HEAD; cheap, and without importing Alembic."""
    with engine.connect() as connection:
        if not sa.inspect(connection).has_table("alembic_version"):
            return False
        versions = connection.execute(sa.text("SELECT version_num FROM alembic_version")).scalars()
        return list(versions) == [SCHEMA_HEAD]


def upgrade_database(engine: sa.Engine) -> None:
    if schema_is_current(engine):
        return
    from alembic import command

    with engine.connect() as connection:
        command.upgrade(_alembic_config(connection), "head")


def pending_migrations(engine: sa.Engine) -> list[str]:
    """Revisions not yet applied; empty when the schema is current."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    with engine.connect() as connection:
        script = ScriptDirectory.from_config(_alembic_config(connection))
        current = set(MigrationContext.configure(connection).get_current_heads())
        missing: list[str] = []
        for revision in script.walk_revisions():
            if revision.revision in current:
                break
            missing.append(revision.revision)
        return missing
