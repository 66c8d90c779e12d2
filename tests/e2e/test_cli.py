"""The CLI as an operator uses it: real subprocesses, real databases."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.support import (
    TRACKER,
    Daemon,
    FakeApi,
    plain_env,
    raw_insert,
    states,
    tracker_env,
    wait_until,
)
from tests.e2e.support import run_tracker as tracker

pytestmark = pytest.mark.e2e

COMMANDS = [
    "db",
    "run",
    "sweep",
    "check",
    "status",
    "watch",
    "prune",
    "submit",
    "webhook-url",
    "web",
    "add",
    "list",
    "show",
    "retry",
    "cancel",
    "fake-api",
    "demo",
]


@pytest.mark.parametrize("command", ["", *COMMANDS, "db upgrade"])
def test_help_for_every_command(command: str) -> None:
    result = subprocess.run(
        [*TRACKER, *command.split(), "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "usage: tracker" in result.stdout
    if not command:
        for name in COMMANDS:
            assert name in result.stdout


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TRACKER_SWEEP_INTERVAL", "often"),
        ("TRACKER_PLAN", "gold"),
        ("TRACKER_DATABASE_URL", "oracle://db"),
    ],
)
def test_bad_setting_fails_with_one_line_naming_it(
    variable: str, value: str, tmp_path: Path
) -> None:
    env = plain_env(f"sqlite:///{tmp_path}/t.db") | {variable: value}
    result = tracker(env, "list")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert variable in lines[0]
    assert "Traceback" not in result.stderr


def test_run_without_credentials_names_the_missing_setting(tmp_path: Path) -> None:
    result = tracker(plain_env(f"sqlite:///{tmp_path}/t.db"), "run")
    assert result.returncode == 2
    assert result.stderr.strip() == "tracker: configuration error: TRACKER_CLIENT_ID must be set"


def test_unreachable_database_is_one_line(tmp_path: Path) -> None:
    env = plain_env("postgresql+psycopg://nobody@127.0.0.1:1/none")
    result = tracker(env, "list")
    assert result.returncode == 1
    assert result.stderr.startswith("tracker: database unreachable:")
    assert len(result.stderr.strip().splitlines()) == 1


def test_operator_commands(e2e_database_url: str) -> None:
    env = plain_env(e2e_database_url)
    first, second = uuid.uuid4().hex, uuid.uuid4().hex
    added = tracker(env, "add", first, second, "--label", "invoice-run")
    assert added.returncode == 0, added.stderr
    assert added.stdout.splitlines() == [f"added {first}", f"added {second}"]
    again = tracker(env, "add", first, "../bad")
    assert again.returncode == 1
    assert again.stdout.strip() == f"already tracked {first}"
    assert "malformed" in again.stderr

    listing = tracker(env, "list", "--state", "pending")
    assert listing.returncode == 0
    assert first in listing.stdout and second in listing.stdout
    assert tracker(env, "list", "--state", "nonsense").returncode == 2

    cancelled = tracker(env, "cancel", first)
    assert cancelled.returncode == 0, cancelled.stderr
    assert states(e2e_database_url)[first] == "cancelled"
    assert tracker(env, "cancel", first).returncode == 1
    assert tracker(env, "retry", second).returncode == 1  # not finished yet
    retried = tracker(env, "retry", first)
    assert retried.returncode == 0
    assert states(e2e_database_url)[first] == "pending"

    shown = tracker(env, "show", first)
    assert shown.returncode == 0
    assert "invoice-run" in shown.stdout
    assert "cancelled by an operator" in shown.stdout
    assert "retried by an operator" in shown.stdout
    missing = tracker(env, "show", "nope")
    assert missing.returncode == 1
    assert "not tracked" in missing.stderr


def test_sweep_does_one_pass(
    e2e_database_url: str, tmp_path: Path, fake_api: Callable[..., FakeApi]
) -> None:
    api = fake_api("--completion-delay", "0")
    env = tracker_env(e2e_database_url, api.url, tmp_path / "out")
    assert tracker(env, "db", "upgrade").returncode == 0
    request_ids = [uuid.uuid4().hex for _ in range(3)]
    raw_insert(e2e_database_url, request_ids)
    result = tracker(env, "sweep")
    assert result.returncode == 0, result.stderr
    assert "claimed 3, checked 3" in result.stdout
    assert set(states(e2e_database_url).values()) == {"downloaded"}
    # Every log line on stderr is JSON.
    for line in result.stderr.splitlines():
        json.loads(line)


def test_wrong_credentials_fail_clearly_and_penalise_no_batch(
    e2e_database_url: str, tmp_path: Path, fake_api: Callable[..., FakeApi]
) -> None:
    api = fake_api()
    env = tracker_env(
        e2e_database_url, api.url, tmp_path / "out", TRACKER_CLIENT_SECRET="wrong-secret"
    )
    assert tracker(env, "db", "upgrade").returncode == 0
    request_id = uuid.uuid4().hex
    raw_insert(e2e_database_url, [request_id])
    result = tracker(env, "sweep")
    assert result.returncode == 1
    errors = [
        json.loads(line) for line in result.stderr.splitlines() if '"api.auth_failed"' in line
    ]
    assert len(errors) == 1
    assert "wrong-secret" not in result.stderr
    assert states(e2e_database_url)[request_id] == "pending"


def test_demo_runs_end_to_end() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tracker", "demo", "--clean"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "13 batches final" in result.stdout
    assert "<- expected" not in result.stdout


def test_check_reports_health(
    e2e_database_url: str,
    tmp_path: Path,
    fake_api: Callable[..., FakeApi],
    run_daemon: Callable[[dict[str, str]], Daemon],
) -> None:
    env = plain_env(e2e_database_url)
    before = tracker(env, "check")
    assert before.returncode == 1
    assert "migration(s) pending" in before.stderr
    assert len(before.stderr.strip().splitlines()) == 1

    api = fake_api()
    daemon = run_daemon(tracker_env(e2e_database_url, api.url, tmp_path / "out"))
    daemon.wait_started()
    wait_until(lambda: tracker(env, "check").returncode == 0, 30, "a healthy check")
    assert tracker(env, "check").stdout.strip() == "ok"
    assert daemon.stop() == 0
    stopped = tracker(env, "check")
    assert stopped.returncode == 1
    assert "has completed a sweep" in stopped.stderr


def test_prune_removes_exactly_what_it_should(
    e2e_database_url: str, tmp_path: Path, fake_api: Callable[..., FakeApi]
) -> None:
    import sqlalchemy as sa

    from tracker.db import create_engine_for

    api = fake_api("--completion-delay", "0")
    output_dir = tmp_path / "out"
    env = tracker_env(e2e_database_url, api.url, output_dir)
    assert tracker(env, "db", "upgrade").returncode == 0
    old, recent, active = uuid.uuid4().hex, uuid.uuid4().hex, uuid.uuid4().hex
    raw_insert(e2e_database_url, [old, recent])
    assert tracker(env, "sweep").returncode == 0
    raw_insert(e2e_database_url, [active])
    assert states(e2e_database_url) == {old: "downloaded", recent: "downloaded", active: "pending"}
    engine = create_engine_for(e2e_database_url)
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "UPDATE tracker_batches SET finished_at = '2020-01-01 00:00:00' WHERE request_id = :r"
            ),
            {"r": old},
        )
    engine.dispose()
    stray = tmp_path / "elsewhere.csv"
    stray.write_text("not ours")

    result = tracker(env, "prune", "--older-than", "30d", "--files", "--chunk", "1")
    assert result.returncode == 0, result.stderr
    assert "pruned 1 final batches" in result.stdout
    assert states(e2e_database_url) == {recent: "downloaded", active: "pending"}
    assert sorted(p.name for p in output_dir.iterdir()) == [f"{recent}.csv"]
    assert stray.exists()
    assert tracker(env, "prune", "--older-than", "soon").returncode == 2


def test_prune_keeps_a_recorded_file_outside_the_output_directory(
    e2e_database_url: str, tmp_path: Path, fake_api: Callable[..., FakeApi]
) -> None:
    import sqlalchemy as sa

    from tracker.db import create_engine_for

    api = fake_api("--completion-delay", "0")
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    env = tracker_env(e2e_database_url, api.url, output_dir)
    assert tracker(env, "db", "upgrade").returncode == 0
    outside, linked = tmp_path / "elsewhere.csv", output_dir / "linked.csv"
    outside.write_text("not ours")
    linked.symlink_to(outside)
    rows = {uuid.uuid4().hex: outside, uuid.uuid4().hex: linked}
    raw_insert(e2e_database_url, list(rows))
    engine = create_engine_for(e2e_database_url)
    with engine.begin() as connection:
        for request_id, recorded in rows.items():
            connection.execute(
                sa.text(
                    "UPDATE tracker_batches SET state = 'downloaded', file_path = :p,"
                    " finished_at = '2020-01-01 00:00:00' WHERE request_id = :r"
                ),
                {"p": str(recorded), "r": request_id},
            )
    engine.dispose()

    result = tracker(env, "prune", "--older-than", "30d", "--files")
    assert result.returncode == 0, result.stderr
    assert "pruned 2 final batches" in result.stdout
    assert ", 0 files deleted (0 already gone)" in result.stdout
    resolved = output_dir.resolve()
    assert f"kept {outside}: not in {resolved}" in result.stderr
    assert f"kept {linked}: not in {resolved}" in result.stderr
    assert outside.read_text() == "not ours" and linked.is_symlink()
    assert states(e2e_database_url) == {}


def test_submit_uploads_and_tracks(
    e2e_database_url: str, tmp_path: Path, fake_api: Callable[..., FakeApi]
) -> None:
    api = fake_api("--completion-delay", "0")
    env = tracker_env(e2e_database_url, api.url, tmp_path / "out")
    batch_file = tmp_path / "upi.csv"
    batch_file.write_text("vpa,name\nsomeone@upi,Someone\n")
    result = tracker(env, "submit", str(batch_file), "--label", "payroll")
    assert result.returncode == 0, result.stderr
    request_id = result.stdout.split(" as ")[1].split(";")[0]
    assert api.stats()["submissions"] == 1
    assert states(e2e_database_url) == {request_id: "pending"}
    assert tracker(env, "sweep").returncode == 0
    assert states(e2e_database_url) == {request_id: "downloaded"}
    missing = tracker(env, "submit", str(tmp_path / "nope.csv"))
    assert missing.returncode == 2
