"""Shared fixtures: a fresh database per test on SQLite and, when reachable, PostgreSQL.

PostgreSQL tests clone a template database that was migrated once per session, so each
test starts from the real migrated schema in milliseconds. Under CI (CI=true) an
unreachable PostgreSQL is a failure, never a skip.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
import structlog

from tests.databases import PG_ADMIN_URL, pg_admin_engine, with_database
from tracker.db import create_engine_for, upgrade_database

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def _pg_admin_engine() -> sa.Engine | None:
    try:
        return pg_admin_engine()
    except sa.exc.OperationalError as error:
        if IN_CI:
            pytest.fail(f"PostgreSQL must be reachable under CI at {PG_ADMIN_URL}: {error.orig}")
        return None


@pytest.fixture(scope="session")
def pg_template() -> Iterator[tuple[sa.Engine, str]]:
    admin = _pg_admin_engine()
    if admin is None:
        pytest.skip(f"no PostgreSQL reachable at {PG_ADMIN_URL} (set TRACKER_TEST_PG_URL)")
    template = f"tracker_tmpl_{uuid.uuid4().hex[:10]}"
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{template}"'))
    engine = create_engine_for(with_database(PG_ADMIN_URL, template))
    upgrade_database(engine)
    engine.dispose()
    yield admin, template
    with admin.connect() as connection:
        connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{template}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def pg_url(pg_template: tuple[sa.Engine, str]) -> Iterator[str]:
    """A migrated PostgreSQL database of this test's own."""
    admin, template = pg_template
    name = f"tracker_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}" TEMPLATE "{template}"'))
    yield with_database(PG_ADMIN_URL, name)
    with admin.connect() as connection:
        connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def empty_pg_url(pg_template: tuple[sa.Engine, str]) -> Iterator[str]:
    """An empty PostgreSQL database (no schema), for migration tests."""
    admin, _ = pg_template
    name = f"tracker_empty_{uuid.uuid4().hex[:12]}"
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    yield with_database(PG_ADMIN_URL, name)
    with admin.connect() as connection:
        connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/tracker.db"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest) -> str:
    """Each test using this runs on both backends, against a migrated database."""
    if request.param == "sqlite":
        url: str = request.getfixturevalue("sqlite_url")
        engine = create_engine_for(url)
        upgrade_database(engine)
        engine.dispose()
        return url
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    engine = create_engine_for(database_url)
    yield engine
    engine.dispose()


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()
