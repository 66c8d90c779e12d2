"""What the end-to-end tests share (and the benchmarks reuse): the real `tracker` command
and the simulator as subprocesses, their settings, database reads, waits, assertions.

Plain functions and classes: the pytest fixtures built on them are in conftest.py. No
pytest here, so the benchmarks can import it from an install without the test extras.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from tracker.db import create_engine_for
from tracker.simulator import SimulatorConfig, expected_sha256

TRACKER = [sys.executable, "-m", "tracker"]
# The simulator's own credentials, valid only against it on loopback.
CLIENT_ID = "demo-client"
CLIENT_SECRET = "demo-secret"
SMALL = SimulatorConfig().file_size
BIG = 24 << 20


# --------------------------------------------------------------------------- processes


@dataclass
class FakeApi:
    """`tracker fake-api` running as a child process."""

    url: str
    process: subprocess.Popen[str]

    def stats(self) -> dict[str, Any]:
        import httpx

        result: dict[str, Any] = httpx.get(f"{self.url}/_sim/stats", timeout=30).json()
        return result

    def reset(self) -> None:
        import httpx

        httpx.post(f"{self.url}/_sim/reset", timeout=30).raise_for_status()


def start_fake_api(*args: str) -> FakeApi:
    """`tracker fake-api` on a free loopback port; returns once it announced its URL."""
    process = subprocess.Popen(
        [*TRACKER, "fake-api", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        process.kill()
        raise RuntimeError("the simulator did not start")
    return FakeApi(url=json.loads(line)["url"], process=process)


def connection_env(database_url: str, api_url: str, output_dir: Path) -> dict[str, str]:
    """The settings every tracker subprocess needs: its database, the simulator, its files."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "TRACKER_DATABASE_URL": database_url,
        "TRACKER_API_BASE_URL": api_url,
        "TRACKER_CLIENT_ID": CLIENT_ID,
        "TRACKER_CLIENT_SECRET": CLIENT_SECRET,
        "TRACKER_OUTPUT_DIR": str(output_dir),
        "TRACKER_DOWNLOAD_ALLOWED_HOSTS": "127.0.0.1",
        "TRACKER_PLAN": "enterprise",
        "TRACKER_LOG_FORMAT": "json",
    }


def tracker_env(database_url: str, api_url: str, output_dir: Path, **extra: str) -> dict[str, str]:
    """Settings for a test's tracker subprocess: sub-second sweeps and polls."""
    return (
        connection_env(database_url, api_url, output_dir)
        | {
            "TRACKER_SWEEP_INTERVAL": "0.3",
            "TRACKER_POLL_MIN_INTERVAL": "0.3",
            "TRACKER_POLL_MAX_INTERVAL": "1",
            "TRACKER_LOG_LEVEL": "INFO",
            "TRACKER_SHUTDOWN_GRACE": "5",
        }
        | extra
    )


def plain_env(database_url: str, **extra: str) -> dict[str, str]:
    """Just enough environment for the commands that need no API."""
    return {
        "PATH": os.environ.get("PATH", ""),
        "TRACKER_DATABASE_URL": database_url,
        "TRACKER_LOG_FORMAT": "json",
    } | extra


@dataclass
class Daemon:
    """`tracker run` as a child process, logging to a file."""

    process: subprocess.Popen[str]
    log_path: Path

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)

    def wait_started(self, timeout: float = 30) -> None:
        """Migrations are applied once the daemon says it started."""
        wait_until(
            lambda: '"daemon.started"' in self.log_path.read_text(), timeout, "the daemon to start"
        )

    def log_lines(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]


def run_tracker(
    env: dict[str, str], *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """One `tracker` command, as an operator runs it."""
    return subprocess.run(
        [*TRACKER, *args], env=env, capture_output=True, text=True, timeout=120, input=stdin
    )


def migrate(database_url: str) -> None:
    """`tracker db upgrade`, as an operator runs it."""
    subprocess.run(
        [*TRACKER, "db", "upgrade"],
        env={"PATH": os.environ.get("PATH", ""), "TRACKER_DATABASE_URL": database_url},
        check=True,
        capture_output=True,
    )


def tracker_installed() -> bool:
    return shutil.which("tracker") is not None


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, *, poll: float = 0.2
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# --------------------------------------------------------------------------- the database


def raw_insert(database_url: str, request_ids: list[str]) -> None:
    """Enqueue exactly as another application would: a bare INSERT."""
    engine = create_engine_for(database_url)
    try:
        with engine.begin() as connection:
            for request_id in request_ids:
                connection.execute(
                    sa.text("INSERT INTO tracker_batches (request_id) VALUES (:rid)"),
                    {"rid": request_id},
                )
    finally:
        engine.dispose()


def states(database_url: str) -> dict[str, str]:
    engine = create_engine_for(database_url)
    with engine.begin() as connection:
        rows = connection.execute(sa.text("SELECT request_id, state FROM tracker_batches")).all()
    engine.dispose()
    return {request_id: state for request_id, state in rows}


def query(database_url: str, sql: str, **params: object) -> list[sa.Row[Any]]:
    engine = create_engine_for(database_url)
    try:
        with engine.begin() as connection:
            return list(connection.execute(sa.text(sql), params).all())
    finally:
        engine.dispose()


def execute(database_url: str, sql: str, **params: object) -> int:
    """Run one write statement (a hand edit, as an operator would); rows affected."""
    engine = create_engine_for(database_url)
    try:
        with engine.begin() as connection:
            return connection.execute(sa.text(sql), params).rowcount
    finally:
        engine.dispose()


def batch_rows(database_url: str) -> dict[str, dict[str, Any]]:
    """Every batch row by request_id, as plain dicts (comparable before and after)."""
    rows = query(database_url, "SELECT * FROM tracker_batches")
    return {row.request_id: dict(row._mapping) for row in rows}


def all_in(database_url: str, state: str, count: int) -> Callable[[], bool]:
    def check() -> bool:
        current = states(database_url)
        return len(current) == count and set(current.values()) == {state}

    return check


_STUCK_COLUMNS = (
    "request_id",
    "state",
    "lease_owner",
    "lease_expires_at",
    "next_check_at",
    "faults",
    "download_attempts",
    "last_error",
)


def wait_all_downloaded(database_url: str, count: int, timeout: float) -> None:
    """Wait for `count` downloaded batches; on timeout, say which are stuck and why."""
    try:
        wait_until(
            all_in(database_url, "downloaded", count), timeout, f"{count} batches downloaded"
        )
    except AssertionError as timed_out:
        stuck = [
            {key: row[key] for key in _STUCK_COLUMNS}
            for row in batch_rows(database_url).values()
            if row["state"] != "downloaded"
        ]
        raise AssertionError(f"{timed_out}; not downloaded: {stuck}") from None


# --------------------------------------------------------------------------- assertions


def free_port() -> int:
    """A loopback port nothing listens on now (the process under test binds it a moment
    later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def tag() -> str:
    """A short unique suffix, so that request_ids of one test never meet another's."""
    return uuid.uuid4().hex[:8]


def expected_files(
    request_ids: list[str], *, big: int = BIG, small: int = SMALL
) -> dict[str, tuple[str, int]]:
    """File name -> (sha256, size) the simulator serves for each id (`big-` ids: `big`)."""
    files = {}
    for request_id in request_ids:
        size = big if request_id.startswith("big-") else small
        files[f"{request_id}.csv"] = (expected_sha256(request_id, size), size)
    return files


def assert_consistent_history(database_url: str) -> dict[str, list[tuple[str, str]]]:
    """Each batch's transitions form one chain from pending to its current state."""
    engine = create_engine_for(database_url)
    with engine.begin() as connection:
        batches = connection.execute(
            sa.text("SELECT id, request_id, state FROM tracker_batches")
        ).all()
        rows = connection.execute(
            sa.text("SELECT batch_id, from_state, to_state FROM tracker_transitions ORDER BY id")
        ).all()
    engine.dispose()
    chains: dict[str, list[tuple[str, str]]] = {}
    for batch_id, request_id, state in batches:
        chain = [(f, t) for b, f, t in rows if b == batch_id]
        assert chain, f"{request_id} has no transitions"
        assert chain[0][0] == "pending", (request_id, chain)
        for (_, to_state), (from_state, _) in itertools.pairwise(chain):
            assert to_state == from_state, (request_id, chain)
        assert all(f != t for f, t in chain), (request_id, chain)
        assert chain[-1][1] == state, (request_id, chain, state)
        chains[request_id] = chain
    return chains


def assert_files(output_dir: Path, expected: dict[str, tuple[str, int]]) -> None:
    """Exactly the expected files, complete, verified, not world-readable; no temp files."""
    names = sorted(p.name for p in output_dir.iterdir())
    assert names == sorted(expected), names
    for name, (sha256, size) in expected.items():
        path = output_dir / name
        data = path.read_bytes()
        assert len(data) == size, name
        assert hashlib.sha256(data).hexdigest() == sha256, name
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, name


def assert_recorded_files(
    database_url: str, output_dir: Path, files: dict[str, tuple[str, int]]
) -> None:
    """The rows point at the verified files: path, size and checksum as published."""
    for request_id, row in batch_rows(database_url).items():
        name = f"{request_id}.csv"
        sha256, size = files[name]
        assert row["file_path"] == str(output_dir.resolve() / name), row
        assert (row["file_size"], row["file_sha256"]) == (size, sha256), row


def assert_downloaded_once(chains: dict[str, list[tuple[str, str]]]) -> None:
    for request_id, chain in chains.items():
        targets = [to_state for _, to_state in chain]
        assert targets.count("downloaded") == 1, (request_id, chain)
        assert len(targets) == len(set(targets)), (request_id, chain)
