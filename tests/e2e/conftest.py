"""Run the real `tracker` command as subprocesses against the simulator over loopback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa

from tracker.db import create_engine_for

TRACKER = [sys.executable, "-m", "tracker"]


@dataclass
class FakeApi:
    url: str
    process: subprocess.Popen[str]

    def stats(self) -> dict[str, object]:
        import httpx

        return dict(httpx.get(f"{self.url}/_sim/stats", timeout=10).json())


def start_fake_api(*args: str) -> FakeApi:
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


@pytest.fixture
def fake_api() -> Iterator[Callable[..., FakeApi]]:
    started: list[FakeApi] = []

    def start(*args: str) -> FakeApi:
        api = start_fake_api(*args)
        started.append(api)
        return api

    yield start
    for api in started:
        api.process.terminate()
        api.process.wait(timeout=10)
        if api.process.stdout:
            api.process.stdout.close()


def tracker_env(database_url: str, api_url: str, output_dir: Path, **extra: str) -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "TRACKER_DATABASE_URL": database_url,
        "TRACKER_API_BASE_URL": api_url,
        "TRACKER_CLIENT_ID": "demo-client",
        "TRACKER_CLIENT_SECRET": "demo-secret",
        "TRACKER_OUTPUT_DIR": str(output_dir),
        "TRACKER_DOWNLOAD_ALLOWED_HOSTS": "127.0.0.1",
        "TRACKER_SWEEP_INTERVAL": "0.3",
        "TRACKER_POLL_MIN_INTERVAL": "0.3",
        "TRACKER_POLL_MAX_INTERVAL": "1",
        "TRACKER_PLAN": "enterprise",
        "TRACKER_LOG_FORMAT": "json",
        "TRACKER_LOG_LEVEL": "INFO",
        "TRACKER_SHUTDOWN_GRACE": "5",
    }
    env.update(extra)
    return env


@dataclass
class Daemon:
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


@pytest.fixture
def run_daemon(tmp_path: Path) -> Iterator[Callable[[dict[str, str]], Daemon]]:
    daemons: list[Daemon] = []

    def start(env: dict[str, str]) -> Daemon:
        log_path = tmp_path / f"daemon-{len(daemons)}.log"
        with log_path.open("w") as log_file:
            process = subprocess.Popen(
                [*TRACKER, "run"], env=env, stdout=log_file, stderr=subprocess.STDOUT, text=True
            )
        daemon = Daemon(process, log_path)
        daemons.append(daemon)
        return daemon

    yield start
    for daemon in daemons:
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait(timeout=10)


def run_tracker(
    env: dict[str, str], *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """One `tracker` command, as an operator runs it."""
    return subprocess.run(
        [*TRACKER, *args], env=env, capture_output=True, text=True, timeout=120, input=stdin
    )


def plain_env(database_url: str, **extra: str) -> dict[str, str]:
    """Just enough environment for the commands that need no API."""
    return {
        "PATH": os.environ.get("PATH", ""),
        "TRACKER_DATABASE_URL": database_url,
        "TRACKER_LOG_FORMAT": "json",
    } | extra


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


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def migrate(database_url: str) -> None:
    subprocess.run(
        [*TRACKER, "db", "upgrade"],
        env={"PATH": os.environ.get("PATH", ""), "TRACKER_DATABASE_URL": database_url},
        check=True,
        capture_output=True,
    )


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def e2e_database_url(request: pytest.FixtureRequest) -> str:
    """An empty database on each backend; the daemon migrates it itself."""
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_url"))
    return str(request.getfixturevalue("empty_pg_url"))


def tracker_installed() -> bool:
    return shutil.which("tracker") is not None
