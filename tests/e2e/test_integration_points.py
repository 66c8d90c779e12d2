"""What other applications rely on: NOTIFY pickup and transitions, the on-final hook, enqueue()."""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa

import tracker
from tests.e2e.support import Daemon, FakeApi, raw_insert, states, tracker_env, wait_until
from tracker.db import create_engine_for, upgrade_database
from tracker.listen import libpq_url

pytestmark = pytest.mark.e2e


def checks_of(database_url: str, request_id: str) -> int:
    engine = create_engine_for(database_url)
    with engine.begin() as connection:
        value = connection.execute(
            sa.text("SELECT checks FROM tracker_batches WHERE request_id = :r"), {"r": request_id}
        ).scalar_one()
    engine.dispose()
    return int(value)


@pytest.mark.postgres
def test_insert_is_picked_up_at_once_and_transitions_are_published(
    pg_url: str,
    tmp_path: Path,
    fake_api: Callable[..., FakeApi],
    run_daemon: Callable[[dict[str, str]], Daemon],
) -> None:
    api = fake_api("--completion-delay", "0.2")
    # A sweep interval of a minute: only the NOTIFY can explain a pickup within seconds.
    env = tracker_env(pg_url, api.url, tmp_path / "out", TRACKER_SWEEP_INTERVAL="60")
    daemon = run_daemon(env)
    daemon.wait_started()
    wait_until(lambda: '"listen.ready"' in daemon.log_path.read_text(), 30, "the listener")

    listener = psycopg.connect(libpq_url(pg_url), autocommit=True)
    listener.execute("LISTEN tracker_transitions")
    request_id = uuid.uuid4().hex
    inserted = time.monotonic()
    raw_insert(pg_url, [request_id])
    wait_until(lambda: checks_of(pg_url, request_id) >= 1, 10, "the first status call")
    assert time.monotonic() - inserted < 5

    heard: list[dict[str, object]] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(h["to"] == "downloaded" for h in heard):
        for notify in listener.notifies(timeout=1.0, stop_after=1):
            heard.append(json.loads(notify.payload))
    listener.close()
    assert daemon.stop() == 0
    ours = [(h["from"], h["to"]) for h in heard if h["request_id"] == request_id]
    assert ours == [("pending", "processing"), ("processing", "ready"), ("ready", "downloaded")]
    final = next(h for h in heard if h["to"] == "downloaded")
    assert final["file_path"] == str((tmp_path / "out" / f"{request_id}.csv").resolve())
    assert final["label"] is None


def test_on_final_hook_runs_once_per_final_batch(
    e2e_database_url: str,
    tmp_path: Path,
    fake_api: Callable[..., FakeApi],
    run_daemon: Callable[[dict[str, str]], Daemon],
) -> None:
    api = fake_api("--completion-delay", "0.2")
    record = tmp_path / "hook.jsonl"
    script = tmp_path / "hook.py"
    script.write_text(
        "import json, os, sys\n"
        f"with open({str(record)!r}, 'a') as out:\n"
        "    out.write(json.dumps({k: os.environ.get(k) for k in ("
        "'TRACKER_REQUEST_ID', 'TRACKER_STATE', 'TRACKER_LABEL', 'TRACKER_FILE_PATH', "
        "'TRACKER_CLIENT_SECRET')}) + '\\n')\n"
        "print('hook saw', os.environ['TRACKER_REQUEST_ID'])\n"
        "sys.exit(3 if os.environ['TRACKER_STATE'] == 'failed' else 0)\n"
    )
    env = tracker_env(
        e2e_database_url,
        api.url,
        tmp_path / "out",
        TRACKER_ON_FINAL=f"{sys.executable} {script}",
        TRACKER_ON_FINAL_TIMEOUT="20",
    )
    daemon = run_daemon(env)
    daemon.wait_started()
    ok, failing = uuid.uuid4().hex, f"fail-{uuid.uuid4().hex[:8]}"
    raw_insert(e2e_database_url, [ok, failing])
    wait_until(lambda: record.exists() and len(record.read_text().splitlines()) >= 2, 60, "hooks")
    time.sleep(1.5)  # a second run would show up within a few sweeps
    assert daemon.stop() == 0
    runs = [json.loads(line) for line in record.read_text().splitlines()]
    assert sorted((r["TRACKER_REQUEST_ID"], r["TRACKER_STATE"]) for r in runs) == sorted(
        [(ok, "downloaded"), (failing, "failed")]
    )
    assert all(r["TRACKER_CLIENT_SECRET"] is None for r in runs)
    assert next(r for r in runs if r["TRACKER_STATE"] == "downloaded")[
        "TRACKER_FILE_PATH"
    ].endswith(f"{ok}.csv")
    # The hook's failure changed nothing, and its output was logged.
    assert states(e2e_database_url) == {ok: "downloaded", failing: "failed"}
    events = daemon.log_lines()
    assert any(e["event"] == "hook.output" and e["line"] == f"hook saw {ok}" for e in events)
    assert any(e["event"] == "hook.failed" and e.get("exit_code") == 3 for e in events)


def test_enqueue_api(database_url: str) -> None:
    assert tracker.enqueue(database_url, "abc123", label="from-python") is True
    assert tracker.enqueue(database_url, "abc123") is False
    engine = create_engine_for(database_url)
    assert tracker.enqueue(engine, "def456") is True
    with engine.begin() as connection:
        rows = connection.execute(
            sa.text("SELECT request_id, label, state FROM tracker_batches ORDER BY id")
        ).all()
    engine.dispose()
    assert [tuple(r) for r in rows] == [
        ("abc123", "from-python", "pending"),
        ("def456", None, "pending"),
    ]
    with pytest.raises(ValueError, match="malformed"):
        tracker.enqueue(database_url, "../etc/passwd")


def test_enqueue_api_on_a_fresh_database(sqlite_url: str) -> None:
    engine = create_engine_for(sqlite_url)
    upgrade_database(engine)
    assert tracker.enqueue(engine, "fresh1") is True
    engine.dispose()
