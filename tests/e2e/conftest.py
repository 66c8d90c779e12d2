"""Fixtures for the end-to-end tests; the helpers they build on are in support.py."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.faults import DaemonLauncher
from tests.e2e.support import TRACKER, Daemon, FakeApi, start_fake_api


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


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[DaemonLauncher]:
    launcher = DaemonLauncher(tmp_path, [])
    with launcher.reaping():
        yield launcher


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def e2e_database_url(request: pytest.FixtureRequest) -> str:
    """An empty database on each backend; the daemon migrates it itself."""
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_url"))
    return str(request.getfixturevalue("empty_pg_url"))
