"""`tracker list/show/status/watch` and `add --from-file`, as real subprocesses on real databases."""

from __future__ import annotations

import json
import math
import os
import pty
import re
import select
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.e2e.support import (
    TRACKER,
    FakeApi,
    migrate,
    plain_env,
    raw_insert,
    states,
    tracker_env,
    wait_until,
)
from tests.e2e.support import (
    run_tracker as run,
)
from tracker.db import create_engine_for
from tracker.schema import batches, instances, quota_usage

pytestmark = pytest.mark.e2e

ANSI_ESCAPE = re.compile(r"\x1b\[")


def update(database_url: str, request_id: str, **values: Any) -> None:
    """Change a batch behind the tracker's back, as a hand edit or another tool would."""
    engine = create_engine_for(database_url)
    with engine.begin() as connection:
        connection.execute(
            batches.update().where(batches.c.request_id == request_id).values(**values)
        )
    engine.dispose()


def stored_rows(database_url: str) -> dict[str, dict[str, Any]]:
    engine = create_engine_for(database_url)
    with engine.begin() as connection:
        rows = connection.execute(sa.select(batches)).all()
    engine.dispose()
    return {row.request_id: dict(row._mapping) for row in rows}


def from_json(value: Any) -> Any:
    """A JSON value back in Python terms; ISO-8601 UTC text becomes an aware datetime."""
    if isinstance(value, str) and re.fullmatch(r"\d{4}-\d\d-\d\dT[\d:.]+Z", value):
        return datetime.fromisoformat(value)
    return value


def assert_plain(text: str) -> None:
    """What a pipe gets: no colour codes, no blanks padded to the window's width."""
    assert not ANSI_ESCAPE.search(text)
    assert all(line == line.rstrip() for line in text.splitlines())


# --- list and show ----------------------------------------------------------------------


def test_list_json_has_every_column_of_every_row(database_url: str) -> None:
    env = plain_env(database_url)
    ids = [f"list{n}-{uuid.uuid4().hex[:8]}" for n in range(3)]
    assert run(env, "add", *ids, "--label", "run [42]").returncode == 0
    finished = datetime(2026, 11, 30, 12, 0, 5, 250000, tzinfo=UTC)
    update(
        database_url,
        ids[0],
        state="downloaded",
        file_path=f"/srv/out/{ids[0]}.csv",
        file_size=4096,
        file_sha256="ab" * 32,
        finished_at=finished,
        checks=4,
    )
    update(database_url, ids[1], state="processing", last_error="HTTP 503 [Source Unavailable]")

    listed = run(env, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    document = json.loads(listed.stdout)
    assert [item["request_id"] for item in document] == ids
    stored = stored_rows(database_url)
    for item in document:
        assert set(item) == {column.name for column in batches.c}
        assert {key: from_json(value) for key, value in item.items()} == stored[item["request_id"]]
    assert document[0]["finished_at"] == "2026-11-30T12:00:05.250000Z"
    assert document[0]["label"] == "run [42]"

    only = json.loads(run(env, "list", "--json", "--state", "processing").stdout)
    assert [item["request_id"] for item in only] == [ids[1]]
    assert json.loads(run(env, "list", "--json", "--state", "failed").stdout) == []
    assert len(json.loads(run(env, "list", "--json", "--limit", "2").stdout)) == 2

    table = run(env, "list")
    assert table.returncode == 0, table.stderr
    assert_plain(table.stdout)
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["REQUEST_ID", "LABEL", "STATE"]
    assert len(lines) == 1 + len(ids)  # one line per batch, even with a long error
    by_id = {line.split()[0]: line for line in lines[1:]}
    assert "downloaded" in by_id[ids[0]] and f"/srv/out/{ids[0]}.csv" in by_id[ids[0]]
    assert "[Source Unavailable]" in by_id[ids[1]]  # brackets are data, not markup
    assert "run [42]" in by_id[ids[2]]


def test_show_json_has_the_batch_and_its_transitions(database_url: str) -> None:
    env = plain_env(database_url)
    request_id = uuid.uuid4().hex
    assert run(env, "add", request_id, "--label", "invoice-run").returncode == 0
    assert run(env, "cancel", request_id).returncode == 0
    assert run(env, "retry", request_id).returncode == 0

    shown = run(env, "show", request_id, "--json")
    assert shown.returncode == 0, shown.stderr
    document = json.loads(shown.stdout)
    stored = stored_rows(database_url)[request_id]
    assert {key: from_json(value) for key, value in document.items() if key != "transitions"} == (
        stored
    )
    steps = document["transitions"]
    assert [(s["from_state"], s["to_state"]) for s in steps] == [
        ("pending", "cancelled"),
        ("cancelled", "pending"),
    ]
    assert [s["detail"] for s in steps] == ["cancelled by an operator", "retried by an operator"]
    assert all(s["request_id"] == request_id and s["batch_id"] == stored["id"] for s in steps)
    moments = [datetime.fromisoformat(s["at"]) for s in steps]
    assert moments == sorted(moments)
    assert all(moment.utcoffset() == timedelta(0) for moment in moments)

    plain = run(env, "show", request_id)
    assert plain.returncode == 0
    assert_plain(plain.stdout)
    assert re.search(r"^label\s+invoice-run$", plain.stdout, re.MULTILINE)
    assert "retried by an operator" in plain.stdout

    missing = run(env, "show", "not-there", "--json")
    assert missing.returncode == 1
    assert missing.stdout == ""
    assert missing.stderr.strip() == "not tracked: not-there"


# --- add --from-file ------------------------------------------------------------------


def test_add_from_file_skips_comments_and_refuses_malformed_ids(
    database_url: str, tmp_path: Path
) -> None:
    env = plain_env(database_url)
    good = [uuid.uuid4().hex for _ in range(3)]
    ids_file = tmp_path / "ids.txt"
    ids_file.write_bytes(
        (
            "# exported from the billing run\n"
            "\n"
            f"{good[0]}\n"
            f"   {good[1]}   # trailing comment\r\n"
            "../etc/passwd\n"
            f"{good[0]}\n"  # a repeat in the same file is one batch
            "   \n"
            "has space\n"
            f"{good[2]}\n"
        ).encode()
    )
    result = run(env, "add", "cli-given-1", "--from-file", str(ids_file), "--label", "billing")
    assert result.returncode == 1
    assert result.stdout.splitlines() == [f"added {rid}" for rid in ["cli-given-1", *good]]
    refused = [line for line in result.stderr.splitlines() if line.startswith("refused")]
    assert len(refused) == 2
    assert refused[0].startswith(f"refused ({ids_file}:5): ") and "malformed" in refused[0]
    assert refused[1].startswith(f"refused ({ids_file}:8): ")
    assert result.stderr.splitlines()[-1] == "added 4, already tracked 0, refused 2"
    stored = stored_rows(database_url)
    assert set(stored) == {"cli-given-1", *good}
    assert {row["label"] for row in stored.values()} == {"billing"}

    again = run(env, "add", "--from-file", str(ids_file))
    assert again.returncode == 1
    assert again.stderr.splitlines()[-1] == "added 0, already tracked 3, refused 2"

    nothing = run(env, "add")
    assert nothing.returncode == 2
    assert nothing.stderr.strip() == "tracker: add: give request ids, or --from-file PATH"
    unreadable = run(env, "add", "--from-file", str(tmp_path / "missing.txt"))
    assert unreadable.returncode == 2
    assert len(unreadable.stderr.strip().splitlines()) == 1
    assert "missing.txt" in unreadable.stderr


def test_add_from_stdin(database_url: str) -> None:
    env = plain_env(database_url)
    good = [uuid.uuid4().hex for _ in range(2)]
    result = run(env, "add", "--from-file", "-", stdin=f"# piped\n{good[0]}\n\n{good[1]}\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"added {rid}" for rid in good]
    assert result.stderr.splitlines()[-1] == "added 2, already tracked 0, refused 0"
    assert states(database_url) == dict.fromkeys(good, "pending")

    bad = run(env, "add", "--from-file", "-", stdin="bad/id\n")
    assert bad.returncode == 1
    assert "refused (stdin:1)" in bad.stderr


# --- status ---------------------------------------------------------------------------


def test_status_reports_what_the_database_holds(database_url: str) -> None:
    env = plain_env(database_url, TRACKER_PLAN="business")
    ids = {name: f"{name}-{uuid.uuid4().hex[:8]}" for name in ("old", "new", "done", "broken")}
    raw_insert(database_url, list(ids.values()))
    now = datetime.now(UTC).replace(microsecond=0)
    update(database_url, ids["old"], created_at=now - timedelta(hours=3), state="processing")
    update(database_url, ids["done"], state="downloaded", finished_at=now)
    update(
        database_url,
        ids["broken"],
        state="failed",
        last_error="output could not be fetched: HTTP 403",
        updated_at=now - timedelta(minutes=5),
    )
    update(database_url, ids["new"], last_error="HTTP 503 from Deepvue", updated_at=now)
    here, there = socket.gethostname(), f"other-{uuid.uuid4().hex[:6]}"
    engine = create_engine_for(database_url)
    with engine.begin() as connection:
        for owner, host, last_sweep, stopped in [
            ("here-1", here, now - timedelta(seconds=40), None),
            ("there-1", there, now - timedelta(seconds=10), None),
            # A stopped instance's sweeps are history, not a sign of life.
            ("there-0", there, now - timedelta(seconds=1), now),
        ]:
            connection.execute(
                instances.insert().values(
                    owner=owner,
                    host=host,
                    pid=1,
                    started_at=now - timedelta(hours=1),
                    last_sweep_at=last_sweep,
                    stopped_at=stopped,
                )
            )
        # 7 status calls counted in this minute's bucket of the day window.
        connection.execute(
            quota_usage.insert().values(
                window_name="day", bucket=math.floor(time.time() / 60), used=7
            )
        )
    engine.dispose()

    result = run(env, "status", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["counts"] == {
        "pending": 1,
        "processing": 1,
        "ready": 0,
        "downloaded": 1,
        "failed": 1,
        "rejected": 0,
        "expired": 0,
        "cancelled": 0,
    }
    assert (report["total"], report["unfinished"]) == (4, 2)
    assert report["quota"]["day"] == {"used": 7, "limit": 10000, "left": 9993}
    assert report["quota"]["minute"]["limit"] == 100
    assert report["quota"]["second"]["limit"] == 2
    oldest = report["oldest_unfinished"]
    assert oldest["request_id"] == ids["old"]
    assert oldest["state"] == "processing"
    assert from_json(oldest["created_at"]) == now - timedelta(hours=3)
    assert 3 * 3600 <= oldest["age_seconds"] < 3 * 3600 + 120
    assert report["last_sweep"] == {
        "any_host": (now - timedelta(seconds=10)).isoformat().replace("+00:00", "Z"),
        "this_host": (now - timedelta(seconds=40)).isoformat().replace("+00:00", "Z"),
        "host": here,
    }
    assert [(e["request_id"], e["state"]) for e in report["recent_errors"]] == [
        (ids["new"], "pending"),
        (ids["broken"], "failed"),
    ]
    assert report["recent_errors"][1]["last_error"] == "output could not be fetched: HTTP 403"

    plain = run(env, "status")
    assert plain.returncode == 0, plain.stderr
    assert_plain(plain.stdout)
    text = plain.stdout
    assert re.search(r"^unfinished\s+2$", text, re.MULTILINE)
    assert re.search(r"^per day \(last 24 h\)\s+7\s+10000\s+9993$", text, re.MULTILINE)
    assert re.search(
        rf"^oldest unfinished\s+{ids['old']} \(processing\) created .*\(3h", text, re.M
    )
    here_sweep = (now - timedelta(seconds=40)).strftime("%Y-%m-%d %H:%M:%S")
    assert re.search(
        rf"^last sweep, {re.escape(here)}\s+{here_sweep} \(\d+s ago\)$", text, re.MULTILINE
    )
    assert "output could not be fetched: HTTP 403" in text


def test_status_of_an_empty_database(database_url: str) -> None:
    result = run(plain_env(database_url), "status", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["total"] == 0
    assert report["oldest_unfinished"] is None
    assert report["last_sweep"]["any_host"] is None
    assert report["recent_errors"] == []
    assert report["quota"]["day"] == {"used": 0, "limit": 1000, "left": 1000}


# --- watch ----------------------------------------------------------------------------


def start_watch(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[str]:
    """`tracker watch` with stdout in `log` and stderr beside it in `log`.err."""
    with log.open("w") as out, log.with_suffix(".err").open("w") as err:
        return subprocess.Popen(
            [*TRACKER, "watch", *args], env=env, stdout=out, stderr=err, text=True
        )


def test_watch_until_done_exits_once_a_sweep_finishes_everything(
    e2e_database_url: str, tmp_path: Path, fake_api: Callable[..., FakeApi]
) -> None:
    api = fake_api("--completion-delay", "0")
    # Durations with units, in the settings of a real sweep.
    env = tracker_env(
        e2e_database_url,
        api.url,
        tmp_path / "out",
        TRACKER_POLL_MIN_INTERVAL="0.3s",
        TRACKER_POLL_MAX_INTERVAL="1m",
        TRACKER_HTTP_TIMEOUT="30s",
        TRACKER_MAX_AGE="7d",
        TRACKER_LEASE_DURATION="5m",
    )
    migrate(e2e_database_url)
    request_ids = [uuid.uuid4().hex for _ in range(3)]
    raw_insert(e2e_database_url, request_ids)

    log = tmp_path / "watch.out"
    watch = start_watch(env, log, "--until-done", "--interval", "0.2s")
    try:
        wait_until(lambda: "finished 0/3" in log.read_text(), 30, "the first watch line")
        time.sleep(0.5)  # a few refreshes with work left: it must not exit by itself
        assert watch.poll() is None

        swept = run(env, "sweep")
        assert swept.returncode == 0, swept.stderr
        assert watch.wait(timeout=30) == 0
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()
    output = log.read_text()
    assert_plain(output)
    assert output.splitlines()[-1].endswith("finished 3/3 (downloaded 3)")
    assert set(states(e2e_database_url).values()) == {"downloaded"}


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_watch_quits_cleanly_on_a_signal(
    sqlite_url: str, tmp_path: Path, stop_signal: signal.Signals
) -> None:
    migrate(sqlite_url)
    raw_insert(sqlite_url, ["never-finishes"])
    log = tmp_path / "watch.out"
    watch = start_watch(plain_env(sqlite_url), log, "--until-done", "--interval", "1m")
    try:
        wait_until(lambda: "finished 0/1" in log.read_text(), 30, "the first watch line")
        watch.send_signal(stop_signal)
        # Well inside the one-minute interval: the signal ends the wait.
        assert watch.wait(timeout=10) == 0
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()
    assert "Traceback" not in log.with_suffix(".err").read_text()


def test_watch_draws_live_on_a_terminal(sqlite_url: str) -> None:
    migrate(sqlite_url)
    env = plain_env(sqlite_url, COLUMNS="100", LINES="30", TERM="xterm-256color")
    raw_insert(sqlite_url, ["first-batch", "second-batch"])
    assert run(env, "cancel", "first-batch").returncode == 0
    controller, terminal = pty.openpty()
    watch = subprocess.Popen(
        [*TRACKER, "watch", "--interval", "0.2"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=terminal,
        stderr=subprocess.DEVNULL,
    )
    os.close(terminal)
    screen = b""

    def read_for(seconds: float) -> None:
        nonlocal screen
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 0.1)
            if ready:
                try:
                    screen += os.read(controller, 65536)
                except OSError:  # the child closed the terminal
                    return

    try:
        read_for(3)
        watch.send_signal(signal.SIGINT)
        assert watch.wait(timeout=10) == 0
        read_for(0.5)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()
        os.close(controller)
    text = screen.decode("utf-8", "replace")
    assert ANSI_ESCAPE.search(text)  # colours and cursor moves: a live view
    assert text.count("tracker watch") >= 3  # redrawn at every refresh
    assert "1/2 finished (50%)" in text
    assert "recent transitions" in text
    assert "first-batch" in text


def test_durations_with_units_on_the_command_line(sqlite_url: str) -> None:
    migrate(sqlite_url)
    env = plain_env(sqlite_url, TRACKER_MAX_AGE="7d", TRACKER_SWEEP_INTERVAL="1.5s")
    # Nothing is unfinished in an empty database, so --until-done returns at once.
    done = run(env, "watch", "--until-done", "--interval", "1h30m")
    assert done.returncode == 0, done.stderr
    assert "finished 0/0" in done.stdout

    for value, reason in [
        ("5x", "unknown unit 'x'"),
        ("0", "must be positive"),
        ("-1s", "must not be negative"),
        ("soon", "cannot read 'soon'"),
    ]:
        refused = run(env, "watch", f"--interval={value}")
        assert refused.returncode == 2
        assert f"argument --interval: invalid duration {value!r}: " in refused.stderr
        assert reason in refused.stderr

    bad_setting = run(plain_env(sqlite_url, TRACKER_MAX_AGE="7days"), "status")
    assert bad_setting.returncode == 2
    assert bad_setting.stderr.startswith(
        "tracker: configuration error: TRACKER_MAX_AGE='7days': unknown unit 'days'"
    )
    assert len(bad_setting.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("command", "flags"),
    [
        ("list", ["--json", "--state", "--limit"]),
        ("show", ["--json"]),
        ("add", ["--from-file", "--label"]),
        ("status", ["--json"]),
        ("watch", ["--interval", "--label", "--until-done"]),
    ],
)
def test_help_names_the_new_flags(command: str, flags: list[str]) -> None:
    result = subprocess.run(
        [*TRACKER, command, "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    for flag in flags:
        assert flag in result.stdout
    top = subprocess.run([*TRACKER, "--help"], capture_output=True, text=True, timeout=60)
    assert command in top.stdout
