"""Hostile input is harmless, end to end: real `tracker sweep` / `tracker run` subprocesses
against `tracker fake-api`, batches enqueued (and meddled with) by raw SQL.

Every subprocess runs with HTTP(S)_PROXY pointing at a loopback trap (NO_PROXY covers the
simulator), so a connection to any other host, whatever its name resolves to, lands in
the trap and is counted: the download client is httpx with its default trust_env, which
honours those variables. "Never connected" is therefore measured, not assumed.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import string
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, Phase, given, settings

from tests.e2e.support import TRACKER, Daemon, FakeApi, raw_insert, states, tracker_env, wait_until
from tracker.db import create_engine_for, upgrade_database
from tracker.simulator import expected_sha256

pytestmark = pytest.mark.e2e

SAFE_CHARS = string.ascii_letters + string.digits + "_-"
ALNUM = string.ascii_letters + string.digits

# Hand-picked: each one is hostile for a known reason (paths, shells, SQL, logs, URLs).
NASTY_IDS = [
    "",
    " ",
    ".",
    "..",
    "../../../../tmp/pwned",
    "/etc/passwd",
    "a/b",
    "a\\b",
    "C:\\Windows\\win.ini",
    "..%2f..%2fetc%2fpasswd",
    "%2e%2e",
    "%00",
    "-rf",
    "--help",
    "-",
    "_leading-underscore",
    "trailing-space ",
    " leading-space",
    "tab\tinside",
    "line\nbreak",
    '\r\n{"event":"forged","level":"critical"}',
    "'; DROP TABLE tracker_batches; --",
    "1 OR 1=1",
    '" OR ""="',
    "x&request_id=someone-else",
    "x?y=z",
    "x#fragment",
    "${HOME}",
    "$(touch pwned)",
    "`id`",
    "*",
    "<script>alert(1)</script>",
    "\x1b[31mred",
    "\x7f",
    "a:b",
    "@evil.example.com",
    "%",
    "ａｂｃ",  # noqa: RUF001 - fullwidth letters on purpose
    "café",
    "😀",
    "\u202eevil",
    "zero\u200bwidth",
    "e\u0301",
    "a" * 129,
    # Long, but under PostgreSQL's 8000-byte NOTIFY payload: beyond that, see
    # test_oversized_request_id_or_label_holds_up_nothing.
    "a" * 4000,
]
# PostgreSQL text cannot hold NUL at all (the producer's INSERT fails), so these exist
# only on SQLite.
NUL_IDS = ["\x00", "nul\x00inside", "trailing-nul\x00"]

BADURL_PREFIXES = (
    "badurl-http-",
    "badurl-file-",
    "badurl-userinfo-",
    "badurl-host-",
    "badurl-metadata-",
    "badurl-redirect-",
)


# --------------------------------------------------------------------------- fixtures


class ConnectionTrap:
    """A loopback listener that every proxied (= non-loopback) connection reaches."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.2)
        self.port: int = self._server.getsockname()[1]
        self.requests: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="connection-trap", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with connection:
                connection.settimeout(1.0)
                try:
                    first_bytes = connection.recv(4096)
                except OSError:
                    first_bytes = b""
                self.requests.append(first_bytes)

    def env(self) -> dict[str, str]:
        proxy = f"http://127.0.0.1:{self.port}"
        names = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
        env = {name: proxy for name in names} | {name.lower(): proxy for name in names}
        return env | {"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}

    def close(self) -> None:
        self._stop.set()
        self._server.close()
        self._thread.join(timeout=5)


@pytest.fixture(scope="module")
def module_trap() -> Iterator[ConnectionTrap]:
    connection_trap = ConnectionTrap()
    # The trap must catch what it is meant to: a proxied request from an env-trusting client.
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import httpx\n"
            "try: httpx.get('http://evil.example.com/x', timeout=3)\n"
            "except httpx.HTTPError: pass",
        ],
        env={"PATH": os.environ.get("PATH", ""), **connection_trap.env()},
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert probe.returncode == 0, probe.stderr
    assert any(b"evil.example.com" in r for r in connection_trap.requests), "trap is blind"
    yield connection_trap
    connection_trap.close()


@pytest.fixture
def trap(module_trap: ConnectionTrap) -> ConnectionTrap:
    module_trap.requests.clear()
    return module_trap


# --------------------------------------------------------------------------- helpers


def run_sweep(env: dict[str, str], cwd: Path) -> list[dict[str, Any]]:
    """One `tracker sweep`; its log lines, each of which must be exactly one JSON object."""
    cwd.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [*TRACKER, "sweep"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    # json.loads raising here means a request_id broke out of its log line.
    return [json.loads(line) for line in done.stderr.splitlines()]


def rows(database_url: str) -> dict[str, dict[str, Any]]:
    engine = create_engine_for(database_url)
    with engine.begin() as connection:
        batches = connection.execute(sa.text("SELECT * FROM tracker_batches")).mappings().all()
        steps = connection.execute(
            sa.text("SELECT batch_id, from_state, to_state FROM tracker_transitions ORDER BY id")
        ).all()
    engine.dispose()
    result: dict[str, dict[str, Any]] = {}
    for batch in batches:
        row = dict(batch)
        row["chain"] = [(f, t) for b, f, t in steps if b == row["id"]]
        result[row["request_id"]] = row
    return result


def log_of(daemon: Daemon) -> list[dict[str, Any]]:
    return [dict(line) for line in daemon.log_lines()]


def stats_of(api: FakeApi) -> dict[str, Any]:
    return dict(api.stats())


def tree(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*")}


def execute(database_url: str, statement: str, **params: Any) -> int:
    engine = create_engine_for(database_url)
    try:
        with engine.begin() as connection:
            count: int = connection.execute(sa.text(statement), params).rowcount
    finally:
        engine.dispose()
    return count


def migrate(database_url: str) -> None:
    """In process: a `tracker db upgrade` subprocess would cost a second per test."""
    engine = create_engine_for(database_url)
    try:
        upgrade_database(engine)
    finally:
        engine.dispose()


def events_for(lines: list[dict[str, Any]], request_id: str, event: str) -> list[dict[str, Any]]:
    return [
        line
        for line in lines
        if line.get("event") == event and line.get("request_id") == request_id
    ]


# --------------------------------------------------------------------------- hostile ids


def hostile_ids(allow_nul: bool) -> st.SearchStrategy[str]:
    """request_ids that are unusable by construction, without asking the tracker's rule.

    Each branch breaks the documented shape (1-128 of A-Z a-z 0-9 _ -, first alphanumeric)
    in a different way, so the expectations below do not lean on the code under test.
    """
    bad_char = st.characters(exclude_characters=SAFE_CHARS + ("" if allow_nul else "\x00"))
    safe = st.text(SAFE_CHARS, max_size=30)
    return st.one_of(
        # A plausible id with something nasty spliced in somewhere.
        st.builds(
            lambda head, bad, tail: head + bad + tail,
            safe,
            st.text(bad_char, min_size=1, max_size=8),
            safe,
        ),
        # Any unicode text at all, as long as one character is outside the safe set.
        st.builds(lambda text, bad: text + bad, st.text(max_size=20), bad_char).map(
            lambda s: s.replace("\x00", "") if not allow_nul else s
        ),
        # Option-looking or underscore-led.
        st.builds(lambda lead, rest: lead + rest, st.sampled_from("-_"), safe),
        # Too long.
        st.builds(
            lambda head, rest: head + rest,
            st.sampled_from(ALNUM),
            st.text(SAFE_CHARS, min_size=128, max_size=400),
        ),
        # Path-like.
        st.lists(
            st.sampled_from(["..", ".", "", "etc", "passwd", "tmp", "%2e%2e", "~"]),
            min_size=2,
            max_size=6,
        ).map("/".join),
    ).filter(lambda s: not (s and s[0] in ALNUM and len(s) <= 128 and set(s) <= set(SAFE_CHARS)))


HOSTILE_SETTINGS = settings(
    # One example, a list of 50 ids, all swept by one subprocess. Per-example subprocesses
    # would cost seconds each; @given still draws the list fresh every run, shows it on
    # failure, and brings hypothesis's unicode edge cases that a hand-made alphabet misses.
    max_examples=1,
    phases=[Phase.generate],
    database=None,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)


@HOSTILE_SETTINGS
@given(data=st.data())
def test_hostile_request_ids_are_rejected_and_never_leave_the_database(
    data: st.DataObject,
    e2e_database_url: str,
    tmp_path: Path,
    fake_api: Callable[..., FakeApi],
    trap: ConnectionTrap,
) -> None:
    allow_nul = e2e_database_url.startswith("sqlite")
    fuzzed = data.draw(
        st.lists(hostile_ids(allow_nul), min_size=50, max_size=50, unique=True), label="fuzzed"
    )
    fixed = NASTY_IDS + (NUL_IDS if allow_nul else [])
    hostile = list(dict.fromkeys(fixed + fuzzed))
    control = f"control{uuid.uuid4().hex[:12]}"

    api = fake_api("--completion-delay", "600")
    # Hypothesis runs a failing example a second time to report it: start from scratch so
    # that run shows the same failure instead of a duplicate-key error.
    migrate(e2e_database_url)
    execute(e2e_database_url, "DELETE FROM tracker_transitions")
    execute(e2e_database_url, "DELETE FROM tracker_batches")
    trap.requests.clear()
    raw_insert(e2e_database_url, [*hostile, control])
    work = tmp_path / f"work-{uuid.uuid4().hex[:8]}"
    output_dir = work / "deep" / "er" / "out"
    # Rejected ids still draw API permits (17/s on this plan) though they make no call,
    # which would pace this sweep at ~6 s; the rate is raised to keep the test short.
    env = tracker_env(
        e2e_database_url, api.url, output_dir, TRACKER_RATE_PER_SECOND="500", **trap.env()
    )
    siblings_before = {p.name for p in tmp_path.parent.iterdir()}
    work_before = tree(work) if work.exists() else set()

    lines = run_sweep(env, cwd=work / "cwd")

    # Only the well-formed control id was ever sent to Deepvue.
    assert stats_of(api)["status_calls"] == {control: 1}
    stored = rows(e2e_database_url)
    assert stored[control]["state"] == "processing"
    for request_id in hostile:
        row = stored[request_id]
        reason = row["last_error"] or ""
        assert row["state"] == "rejected", repr(request_id)
        assert "request_id" in reason, (request_id, reason)
        assert "malformed" in reason or "empty" in reason, (request_id, reason)
        # Safe to show anywhere: no control characters or odd bytes copied from the id.
        assert reason.isascii() and reason.isprintable(), (request_id, reason)
        assert row["chain"] == [("pending", "rejected")], repr(request_id)
        assert row["lease_owner"] is None and row["file_path"] is None
        # The JSON log names the id exactly (escaped, never raw): nothing was mangled.
        assert len(events_for(lines, request_id, "batch.transition")) == 1, repr(request_id)

    # No file anywhere: not in the output dir, not where a "../" would lead, not in cwd.
    assert not output_dir.exists() or not any(output_dir.iterdir())
    assert tree(work) - work_before <= {"cwd", "deep", "deep/er", "deep/er/out"}
    assert not any((work / "cwd").iterdir())
    assert {p.name for p in tmp_path.parent.iterdir()} == siblings_before
    assert trap.requests == []


def test_oversized_request_id_or_label_holds_up_nothing(
    e2e_database_url: str,
    tmp_path: Path,
    fake_api: Callable[..., FakeApi],
    trap: ConnectionTrap,
    request: pytest.FixtureRequest,
) -> None:
    """A 10,000-character id is rejected and a 9,000-character label is just carried along.

    Neither may stop the batch (or the batches written in the same group commit) from
    moving on: the producer controls both columns and neither has a length limit.
    """
    tag = uuid.uuid4().hex[:8]
    huge_id = "a" * 10_000
    labelled = f"labelled{tag}"
    bystanders = [f"bystander{n}{tag}" for n in range(4)] + [f"-bystander{n}" for n in range(4)]
    api = fake_api("--completion-delay", "600")
    migrate(e2e_database_url)
    raw_insert(e2e_database_url, [huge_id, *bystanders])
    execute(
        e2e_database_url,
        "INSERT INTO tracker_batches (request_id, label) VALUES (:rid, :label)",
        rid=labelled,
        label="x" * 9000,
    )
    env = tracker_env(e2e_database_url, api.url, tmp_path / "out", **trap.env())

    lines = run_sweep(env, cwd=tmp_path / "cwd")

    assert [line for line in lines if line["event"] == "db.write_failed"] == []
    now = states(e2e_database_url)
    assert now[huge_id] == "rejected"
    assert now[labelled] == "processing"
    for request_id in bystanders:
        assert now[request_id] == ("rejected" if request_id.startswith("-") else "processing")


# --------------------------------------------------------------------------- refused URLs


def test_refused_output_urls_fail_permanently_without_connecting(
    e2e_database_url: str,
    tmp_path: Path,
    fake_api: Callable[..., FakeApi],
    trap: ConnectionTrap,
) -> None:
    tag = uuid.uuid4().hex[:8]
    bad = {prefix: f"{prefix}{tag}" for prefix in BADURL_PREFIXES}
    control = f"ok-{tag}"
    # Completed on the first look, so one sweep goes poll -> ready -> download attempt.
    api = fake_api("--completion-delay", "0")
    migrate(e2e_database_url)
    raw_insert(e2e_database_url, [*bad.values(), control])
    output_dir = tmp_path / "out"
    env = tracker_env(e2e_database_url, api.url, output_dir, **trap.env())

    lines = run_sweep(env, cwd=tmp_path / "cwd")

    stored = rows(e2e_database_url)
    for request_id in bad.values():
        row = stored[request_id]
        assert row["state"] == "failed", (request_id, row["last_error"])
        assert "refus" in (row["last_error"] or "").lower(), (request_id, row["last_error"])
        assert row["chain"] == [("pending", "ready"), ("ready", "failed")], request_id
        [failure] = events_for(lines, request_id, "download.failed")
        assert failure["error"] == "DownloadRefused" and failure["retryable"] is False
        assert events_for(lines, request_id, "download.redirected") == []
    assert stored[control]["state"] == "downloaded"

    # The allow-list stops the five direct URLs before the download even starts ...
    for prefix in BADURL_PREFIXES[:-1]:
        assert events_for(lines, bad[prefix], "download.start") == [], prefix
    # ... and the redirect's target before following it: one request, to the simulator.
    redirect = bad["badurl-redirect-"]
    stats = stats_of(api)
    downloads = stats["downloads"]
    assert isinstance(downloads, list)
    assert sorted((d["path"], d["status"]) for d in downloads) == sorted(
        [
            (f"/upi-basic-batch-output-files/{redirect}.csv", 302),
            (f"/upi-basic-batch-output-files/{control}.csv", 200),
        ]
    )
    assert stats["redirects_served"] == 1
    assert trap.requests == []

    assert sorted(p.name for p in output_dir.iterdir()) == [f"{control}.csv"]
    log_text = json.dumps(lines)
    # Presigned signatures and URL credentials never reach the log.
    assert "X-Amz-Signature" not in log_text
    assert "user:pass@" not in log_text


# --------------------------------------------------------------------------- meddling


def test_daemon_shrugs_off_duplicates_deletes_and_hand_edits(
    e2e_database_url: str,
    tmp_path: Path,
    fake_api: Callable[..., FakeApi],
    run_daemon: Callable[[dict[str, str]], Daemon],
    trap: ConnectionTrap,
) -> None:
    file_size = 6144
    # trickle- is sent at ~2 KiB/s: its 6 KiB download is in flight for ~3 s.
    api = fake_api("--completion-delay", "0.5", "--file-size", str(file_size))
    output_dir = tmp_path / "out"
    env = tracker_env(e2e_database_url, api.url, output_dir, **trap.env())
    daemon = run_daemon(env)
    daemon.wait_started()

    tag = uuid.uuid4().hex[:8]
    duplicated = f"dup-{tag}"
    in_flight = f"trickle-{tag}"
    # slow- stays "processing" for 2.5 s: long enough to hand-edit it reliably.
    made_ready = f"slow-{tag}"
    redone = f"redo-{tag}"
    # Inserted after in_flight so the deleted row never has the highest id: SQLite would
    # give that id to the next INSERT, and a late write for the deleted batch could then
    # land on the newcomer (see test_store_stateful's deleted-row test).
    bystander = f"bystander-{tag}"
    raw_insert(e2e_database_url, [duplicated, in_flight, made_ready, redone, bystander])

    # A producer inserting twice gets the unique violation; the tracker is not involved.
    with pytest.raises(sa.exc.IntegrityError):
        execute(
            e2e_database_url,
            "INSERT INTO tracker_batches (request_id) VALUES (:rid)",
            rid=duplicated,
        )

    # Delete a batch while its download is running.
    wait_until(
        lambda: bool(events_for(log_of(daemon), in_flight, "download.start")),
        30,
        "the trickle download to start",
    )
    deleted = execute(
        e2e_database_url,
        "DELETE FROM tracker_transitions WHERE request_id = :rid",
        rid=in_flight,
    )
    assert deleted >= 1
    assert (
        execute(
            e2e_database_url, "DELETE FROM tracker_batches WHERE request_id = :rid", rid=in_flight
        )
        == 1
    )

    # Hand-edit a processing batch to ready, with no lease and no next check.
    wait_until(
        lambda: states(e2e_database_url).get(made_ready) == "processing", 30, "slow- processing"
    )
    assert (
        execute(
            e2e_database_url,
            "UPDATE tracker_batches SET state = 'ready', lease_owner = NULL, "
            "lease_expires_at = NULL, next_check_at = NULL "
            "WHERE request_id = :rid AND state = 'processing'",
            rid=made_ready,
        )
        == 1
    )

    # Hand-edit a downloaded batch back to processing: it is polled and fetched again.
    wait_until(lambda: states(e2e_database_url).get(redone) == "downloaded", 30, "redo- done")
    assert (
        execute(
            e2e_database_url,
            "UPDATE tracker_batches SET state = 'processing', next_check_at = NULL "
            "WHERE request_id = :rid AND state = 'downloaded'",
            rid=redone,
        )
        == 1
    )

    later = f"later-{tag}"
    raw_insert(e2e_database_url, [later])
    expected = {duplicated, made_ready, redone, bystander, later}

    def settled() -> bool:
        now = states(e2e_database_url)
        redo_fetches = [
            d for d in stats_of(api)["downloads"] if d["path"].endswith(f"/{redone}.csv")
        ]
        return (
            all(now.get(rid) == "downloaded" for rid in expected)
            and len(redo_fetches) == 2
            and bool(lines_about(in_flight))
        )

    def lines_about(request_id: str) -> list[dict[str, Any]]:
        return [
            line
            for line in log_of(daemon)
            if line.get("request_id") == request_id
            and line.get("event") in {"download.ownership_lost", "batch.conflict"}
        ]

    wait_until(settled, 60, "every surviving batch to be downloaded")

    assert daemon.process.poll() is None, "the daemon died"
    assert states(e2e_database_url) == dict.fromkeys(expected, "downloaded")
    stored = rows(e2e_database_url)
    # The hand edits show as gaps in the chain; everything the daemon did is recorded.
    assert stored[made_ready]["chain"][-1] == ("ready", "downloaded")
    assert stored[redone]["chain"][-3:] == [
        ("ready", "downloaded"),
        ("processing", "ready"),
        ("ready", "downloaded"),
    ]
    assert sorted(p.name for p in output_dir.iterdir()) == sorted(f"{r}.csv" for r in expected)
    for request_id in expected:
        body = (output_dir / f"{request_id}.csv").read_bytes()
        assert len(body) == file_size
        assert hashlib.sha256(body).hexdigest() == expected_sha256(request_id, file_size)

    assert daemon.stop() == 0
    lines = log_of(daemon)
    names = [line["event"] for line in lines]
    assert names.count("daemon.started") == 1, "restarted"
    assert not {"sweep.failed", "sweep.worker_crashed", "db.write_failed"} & set(names)
    errors = [line for line in lines if line.get("level") in {"error", "critical"}]
    assert not errors, [(e["event"], str(e.get("exception", ""))[-1500:]) for e in errors]
    assert trap.requests == []


# --------------------------------------------------------------------------- on-final hook


def test_on_final_hook_survives_a_nul_request_id(
    sqlite_url: str,
    tmp_path: Path,
    fake_api: Callable[..., FakeApi],
    run_daemon: Callable[[dict[str, str]], Daemon],
    trap: ConnectionTrap,
) -> None:
    """Only SQLite can store NUL in a request_id; the hook gets the id in its environment."""
    api = fake_api("--completion-delay", "0")
    record = tmp_path / "hooks.txt"
    hook = (
        f"{sys.executable} -c \"import os; open({str(record)!r}, 'a')"
        ".write(ascii(os.environ['TRACKER_REQUEST_ID']) + chr(10))\""
    )
    env = tracker_env(sqlite_url, api.url, tmp_path / "out", TRACKER_ON_FINAL=hook, **trap.env())
    migrate(sqlite_url)
    request_ids = ["nul\x00inside", "slash/inside", f"ok{uuid.uuid4().hex[:8]}"]
    raw_insert(sqlite_url, request_ids)
    daemon = run_daemon(env)
    daemon.wait_started()

    def hook_outcomes() -> dict[str, list[str]]:
        outcomes: dict[str, list[str]] = {}
        for line in log_of(daemon):
            if line["event"] in {"hook.done", "hook.failed"} and "request_id" in line:
                outcomes.setdefault(line["request_id"], []).append(line["event"])
        return outcomes

    def settled() -> bool:
        lines = log_of(daemon)
        return len(hook_outcomes()) == len(request_ids) or any(
            "raised an exception" in line["event"] for line in lines
        )

    try:
        wait_until(settled, 20, "a hook outcome for each batch, or an escaped error")
    finally:
        daemon.stop()
    outcomes = hook_outcomes()
    assert outcomes["nul\x00inside"] == ["hook.failed"]
    assert outcomes["slash/inside"] == ["hook.done"]
    assert not [line for line in log_of(daemon) if "raised an exception" in line["event"]]
