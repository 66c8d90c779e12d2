"""Rows another application wrote badly, on SQLite and PostgreSQL: the migration rejects
those already there, the schema refuses new ones, and a claim copes with any that got in."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from tests.conftest import PG_ADMIN_URL
from tracker.db import _alembic_config, create_engine_for, upgrade_database
from tracker.schema import UnreadableTimestamp
from tracker.store import Store

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
BAD_VALUES = {
    "sqlite": {
        "bad-created": "created_at = 'yesterday'",
        "bad-next": "next_check_at = 'soon'",
        "bad-lease": "lease_expires_at = 'later', lease_owner = 'someone'",
        "bad-checks": "checks = 'abc'",
        "bad-token": "lease_token = 9223372036854775807",
    },
    "postgresql": {
        "bad-created": "created_at = 'infinity'",
        "bad-next": "next_check_at = '-infinity'",
        "bad-lease": "lease_expires_at = 'infinity', lease_owner = 'someone'",
        "bad-checks": "checks = 2147483647",
        "bad-token": "lease_token = 9223372036854775807",
    },
}


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def at_0004(request: pytest.FixtureRequest, tmp_path: object) -> Iterator[sa.Engine]:
    """A database migrated to 0004, before malformed values were refused."""
    from alembic import command

    if request.param == "sqlite":
        engine = create_engine_for(f"sqlite:///{tmp_path}/old.db")
        admin = None
        name = ""
    else:
        request.getfixturevalue("pg_template")  # skips (or fails under CI) without a server
        admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        name = f"tracker_old_{uuid.uuid4().hex[:10]}"
        with admin.connect() as connection:
            connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
        engine = create_engine_for(
            sa.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
        )
    with engine.connect() as connection:
        command.upgrade(_alembic_config(connection), "0004")
    yield engine
    engine.dispose()
    if admin is not None:
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _insert_bad_rows(engine: sa.Engine) -> dict[str, str]:
    bad = BAD_VALUES[engine.dialect.name]
    with engine.begin() as connection:
        for request_id in ["good-1", *bad]:
            connection.execute(
                sa.text("INSERT INTO tracker_batches (request_id) VALUES (:rid)"),
                {"rid": request_id},
            )
        for request_id, assignment in bad.items():
            connection.execute(
                sa.text(f"UPDATE tracker_batches SET {assignment} WHERE request_id = :rid"),
                {"rid": request_id},
            )
    return bad


def test_the_migration_rejects_malformed_rows_already_there_naming_the_value(
    at_0004: sa.Engine,
) -> None:
    _insert_bad_rows(at_0004)
    upgrade_database(at_0004)
    store = Store(at_0004)
    rows = {row.request_id: row for row in store.list_batches()}
    raw = "yesterday" if at_0004.dialect.name == "sqlite" else "infinity"
    assert rows["bad-created"].state == "rejected"
    assert rows["bad-created"].last_error == f"malformed row: created_at='{raw}' is not a timestamp"
    assert rows["bad-checks"].state == "rejected"
    assert rows["bad-checks"].last_error is not None and "checks=" in rows["bad-checks"].last_error
    assert rows["bad-lease"].state == "rejected" and rows["bad-lease"].lease_owner is None
    # Readable now: the rejected row's times are sound, the raw value lives on in last_error.
    assert not isinstance(rows["bad-created"].created_at, UnreadableTimestamp)
    assert rows["good-1"].state == "pending" and rows["good-1"].last_error is None
    # A token at its maximum is legal; the claim takes care of it.
    assert rows["bad-token"].state == "pending"
    detail = [t.detail for t in store.history(rows["bad-created"].id)]
    assert detail == [rows["bad-created"].last_error]


def _add_later_columns(engine: sa.Engine) -> None:
    """The columns migrations after 0005 add, for the store to read a schema without 0005's
    guards."""
    moment = "TIMESTAMP WITH TIME ZONE" if engine.dialect.name == "postgresql" else "DATETIME"
    with engine.begin() as connection:
        connection.execute(sa.text(f"ALTER TABLE tracker_batches ADD COLUMN hinted_at {moment}"))
        connection.execute(
            sa.text(f"ALTER TABLE tracker_instances ADD COLUMN last_delivery_at {moment}")
        )
        connection.execute(
            sa.text(
                "ALTER TABLE tracker_transitions"
                " ADD COLUMN brought_forward BOOLEAN NOT NULL DEFAULT FALSE"
            )
        )


def test_a_claim_copes_with_malformed_rows_that_got_in(at_0004: sa.Engine) -> None:
    """As with guards dropped: the bad rows are claimed, each with its problems named,
    and the good row is claimed beside them."""
    bad = _insert_bad_rows(at_0004)
    _add_later_columns(at_0004)
    store = Store(at_0004)
    rows = {row.request_id: row for row in store.list_batches()}  # reading never raises
    raw = "yesterday" if at_0004.dialect.name == "sqlite" else "infinity"
    created = rows["bad-created"].created_at
    assert isinstance(created, UnreadableTimestamp) and created.raw == raw

    claimed = {batch.request_id: batch for batch in store.claim_due("me", 20, 300, NOW)}
    assert set(claimed) == {"good-1", *bad}
    assert claimed["good-1"].problems == ()
    assert claimed["bad-created"].problems == (f"created_at='{raw}' is not a timestamp",)
    assert any("next_check_at=" in p for p in claimed["bad-next"].problems)
    # An unreadable lease counts as expired, and the claim has replaced it with its own.
    assert claimed["bad-lease"].problems == ()
    lease_row = store.get("bad-lease")
    assert lease_row is not None
    assert not isinstance(lease_row.lease_expires_at, UnreadableTimestamp)
    assert any(p.startswith("checks=") for p in claimed["bad-checks"].problems)
    assert claimed["bad-checks"].checks == 0  # a harmless stand-in for arithmetic
    assert claimed["bad-token"].problems == ("lease_token=9223372036854775807 cannot advance",)
    # The wake-up time ignores what no clock can reach.
    due = store.next_check_due(NOW)
    assert due is None or not isinstance(due, UnreadableTimestamp)
