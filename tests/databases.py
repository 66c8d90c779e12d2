"""The PostgreSQL server the tests (and the benchmarks) make their own databases on."""

from __future__ import annotations

import os

import sqlalchemy as sa

PG_ADMIN_URL = os.environ.get(
    "TRACKER_TEST_PG_URL", "postgresql+psycopg://root@127.0.0.1:5432/postgres"
)


def pg_admin_engine() -> sa.Engine:
    """An AUTOCOMMIT engine on the server; raises sa.exc.OperationalError if none answers."""
    engine = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    try:
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError:
        engine.dispose()
        raise
    return engine


def with_database(url: str, name: str) -> str:
    """`url` with its database replaced by `name`, password kept."""
    return sa.make_url(url).set(database=name).render_as_string(hide_password=False)
