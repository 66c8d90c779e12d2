"""Rows another application wrote badly cost only themselves: refused at INSERT where the
schema can tell, rejected by the daemon (naming the column and the raw value) where a row
got in anyway, and every view keeps working. Real `tracker` subprocesses, raw SQL."""

from __future__ import annotations

import json
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.e2e.support import (
    FakeApi,
    migrate,
    plain_env,
    raw_insert,
    states,
    tracker_env,
    wait_until,
)
from tests.e2e.support import run_tracker as run
from tracker.db import create_engine_for

pytestmark = pytest.mark.e2e

ESC_LABEL = "\x1b]0;pwned\x07\x1b[2Jlabel"
# Per backend: (request_id, the hand-written SQL values, the phrase the rejection must carry).
HOSTILE: dict[str, list[tuple[str, str, str]]] = {
    "sqlite": [
        ("bad-created", "created_at = 'yesterday'", "created_at='yesterday' is not a timestamp"),
        ("bad-next", "next_check_at = 'soon'", "next_check_at='soon' is not a timestamp"),
        ("bad-checks", "checks = 'abc'", "checks='abc' is not a count"),
        ("bad-token", "lease_token = 9223372036854775807", "lease_token=9223372036854775807"),
    ],
    "postgresql": [
        ("bad-next", "next_check_at = '-infinity'", "next_check_at='-infinity' is not a timestamp"),
        ("bad-created", "created_at = 'infinity'", "created_at='infinity' is not a timestamp"),
        ("bad-checks", "checks = 2147483647", "checks=2147483647 is not a count"),
        ("bad-token", "lease_token = 9223372036854775807", "lease_token=9223372036854775807"),
    ],
}


def _execute(database_url: str, *statements: str) -> None:
    engine = create_engine_for(database_url)
    try:
        with engine.begin() as connection:
            for statement in statements:
                connection.execute(sa.text(statement))
    finally:
        engine.dispose()


def _drop_the_guards(database_url: str) -> None:
    """As on a database written before this version, or by a tool that dropped them."""
    engine = create_engine_for(database_url)
    try:
        with engine.begin() as connection:
            if engine.dialect.name == "sqlite":
                names = connection.execute(
                    sa.text(
                        "SELECT name FROM sqlite_master WHERE type = 'trigger' "
                        "AND name LIKE 'tracker_batches_refuse_malformed%'"
                    )
                ).scalars()
                drops = [f'DROP TRIGGER "{name}"' for name in names]
            else:
                names = connection.execute(
                    sa.text(
                        "SELECT conname FROM pg_constraint WHERE conrelid = 'tracker_batches'::regclass "
                        "AND contype = 'c' AND (conname LIKE '%_finite' OR conname LIKE '%_range')"
                    )
                ).scalars()
                drops = [f'ALTER TABLE tracker_batches DROP CONSTRAINT "{name}"' for name in names]
            assert drops, "the guards this test removes must exist"
            for drop in drops:
                connection.execute(sa.text(drop))
    finally:
        engine.dispose()


def _backend(database_url: str) -> str:
    return "sqlite" if database_url.startswith("sqlite") else "postgresql"


def test_the_schema_refuses_malformed_values_and_takes_a_bare_insert(
    e2e_database_url: str,
) -> None:
    migrate(e2e_database_url)
    raw_insert(e2e_database_url, ["plain-1"])  # every other column from its default
    for request_id, assignment, _ in HOSTILE[_backend(e2e_database_url)]:
        if request_id == "bad-token":
            continue  # a token at its maximum is legal; the claim copes with it
        column, value = (part.strip() for part in assignment.split("=", 1))
        with pytest.raises(sa.exc.IntegrityError):
            _execute(
                e2e_database_url,
                f"INSERT INTO tracker_batches (request_id, {column}) VALUES ('{request_id}', {value})",
            )
        with pytest.raises(sa.exc.IntegrityError):
            _execute(
                e2e_database_url,
                f"UPDATE tracker_batches SET {assignment} WHERE request_id = 'plain-1'",
            )
    assert states(e2e_database_url) == {"plain-1": "pending"}


def test_malformed_rows_are_rejected_alone_and_every_view_keeps_working(
    e2e_database_url: str,
    tmp_path: Path,
    fake_api: Any,
    run_daemon: Any,
) -> None:
    api: FakeApi = fake_api("--completion-delay", "0.5")
    migrate(e2e_database_url)
    _drop_the_guards(e2e_database_url)
    hostile = HOSTILE[_backend(e2e_database_url)]
    good = [f"good{uuid.uuid4().hex[:8]}{i}" for i in range(6)]
    raw_insert(e2e_database_url, [request_id for request_id, _, _ in hostile])
    for request_id, assignment, _ in hostile:
        _execute(
            e2e_database_url,
            f"UPDATE tracker_batches SET {assignment} WHERE request_id = '{request_id}'",
        )
    raw_insert(e2e_database_url, good)
    _execute(
        e2e_database_url,
        "UPDATE tracker_batches SET label = :label WHERE request_id = 'bad-next'".replace(
            ":label", "'" + ESC_LABEL + "'"
        ),
    )

    env = tracker_env(e2e_database_url, api.url, tmp_path / "out", TRACKER_RATE_PER_DAY="1000000")
    daemon = run_daemon(env)
    started = time.monotonic()
    wait_until(
        lambda: (
            all(
                state == "downloaded"
                for rid, state in states(e2e_database_url).items()
                if rid in good
            )
            and len(states(e2e_database_url)) == len(good) + len(hostile)
        ),
        60,
        "the good batches to be downloaded",
    )
    took = time.monotonic() - started
    wait_until(
        lambda: all(
            states(e2e_database_url)[request_id] == "rejected" for request_id, _, _ in hostile
        ),
        30,
        "the malformed rows to be rejected",
    )
    assert daemon.stop(signal.SIGTERM) == 0
    print(
        f"\nFIGURES malformed rows: {len(good)} good batches downloaded in {took:.1f} s beside {len(hostile)} malformed ones"
    )

    view_env = plain_env(e2e_database_url)
    listing = run(view_env, "list", "--json")
    assert listing.returncode == 0, listing.stderr
    rows = {row["request_id"]: row for row in json.loads(listing.stdout)}
    for request_id, _, phrase in hostile:
        assert phrase in rows[request_id]["last_error"], rows[request_id]
        assert rows[request_id]["last_error"].startswith("malformed row: ")
    if _backend(e2e_database_url) == "sqlite":
        assert rows["bad-created"]["created_at"] == "yesterday"  # shown as written
    else:
        assert rows["bad-created"]["created_at"] == "infinity"

    for args in (
        ["list"],
        ["show", "bad-created"],
        ["show", "bad-next"],
        ["status"],
        ["status", "--json"],
    ):
        result = run(view_env, *args)
        assert result.returncode == 0, (args, result.stderr)
        assert "Traceback" not in result.stderr
        assert "\x1b" not in result.stdout, (args, result.stdout)
    table = run(view_env, "list").stdout
    assert "\\x1b]0;pwned\\x07" in table or "\\x1b" in table
    shown = run(view_env, "show", "bad-created").stdout
    assert ("'yesterday'" if _backend(e2e_database_url) == "sqlite" else "'infinity'") in shown
