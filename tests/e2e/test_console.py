"""`tracker web` as an operator starts it: the real command, the token from the environment,
real HTTP on loopback, SIGTERM to stop."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.support import TRACKER, migrate, plain_env, run_tracker, wait_until

pytestmark = pytest.mark.e2e

TOKEN = "e2e-console-" + uuid.uuid4().hex


class WebProcess:
    def __init__(self, process: subprocess.Popen[str], log: Path) -> None:
        self.process = process
        self.log = log

    def url(self) -> str:
        """The address it announced (it was started on port 0)."""
        found: list[str] = []

        def announced() -> bool:
            for line in self.log.read_text().splitlines():
                if '"console.listening"' in line:
                    found.extend(re.findall(r"127\.0\.0\.1:\d+", json.loads(line)["addresses"]))
            return bool(found) or self.process.poll() is not None

        wait_until(announced, 30, "the console to listen")
        assert found, f"tracker web exited early:\n{self.log.read_text()}"
        return f"http://{found[0]}"


@pytest.fixture
def start_web(tmp_path: Path) -> Iterator[object]:
    started: list[WebProcess] = []

    def start(env: dict[str, str], *args: str) -> WebProcess:
        log = tmp_path / f"web-{len(started)}.log"
        with log.open("w") as output:
            process = subprocess.Popen(
                [*TRACKER, "web", *args],
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
                text=True,
            )
        started.append(WebProcess(process, log))
        return started[-1]

    yield start
    for web in started:
        if web.process.poll() is None:
            web.process.kill()
            web.process.wait(timeout=10)


def test_tracker_web_serves_the_console_and_stops_cleanly_on_sigterm(
    e2e_database_url: str, start_web: object
) -> None:
    migrate(e2e_database_url)
    env = plain_env(e2e_database_url)
    assert run_tracker(env, "add", "web-e2e-1", "--label", "<b>nightly</b>").returncode == 0
    web = start_web(  # type: ignore[operator]
        env | {"TRACKER_CONSOLE_ADDR": "127.0.0.1:0", "TRACKER_CONSOLE_TOKEN": TOKEN},
        "--allow-actions",
    )
    url = web.url()
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=url, timeout=10) as client:
        overview = client.get("/", headers=bearer)
        assert overview.status_code == 200
        assert "<h1>Overview</h1>" in overview.text
        assert "Content-Security-Policy" in overview.headers
        page = client.get("/batches/web-e2e-1", headers=bearer)
        assert "<h1>Batch web-e2e-1</h1>" in page.text
        assert "&lt;b&gt;nightly&lt;/b&gt;" in page.text
        assert (
            client.get("/", headers={"Authorization": "Bearer wrong-token-123456"}).status_code
            == 401
        )

        # A person: the login form, then the cookie, then cancelling the batch.
        assert client.post("/login", data={"token": "not-it-0123456789"}).status_code == 401
        login = client.post("/login", data={"token": TOKEN, "next": "/batches/web-e2e-1"})
        assert login.status_code == 303
        assert login.headers["location"] == "/batches/web-e2e-1"
        form = client.get("/batches/web-e2e-1", headers={"Accept": "text/html"})
        csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', form.text)
        assert csrf is not None
        cancelled = client.post("/batches/web-e2e-1/cancel", data={"csrf": csrf.group(1)})
        assert cancelled.status_code == 303

    shown = run_tracker(env, "show", "web-e2e-1", "--json")
    assert '"state": "cancelled"' in shown.stdout

    web.process.send_signal(signal.SIGTERM)
    assert web.process.wait(timeout=15) == 0
    output = web.log.read_text()
    assert TOKEN not in output
    assert "not-it-0123456789" not in output, "not even a wrong token is logged"
    events = re.findall(r'"event": "([a-z_.]+)"', output)
    assert events[:2] == ["console.listening", "console.started"]
    assert {"console.login", "console.action", "console.stopped"} <= set(events)


def test_tracker_web_refuses_to_start_without_a_usable_token(
    sqlite_url: str, tmp_path: Path
) -> None:
    migrate(sqlite_url)
    env = plain_env(sqlite_url, TRACKER_CONSOLE_ADDR="127.0.0.1:0")
    missing = run_tracker(env, "web")
    assert missing.returncode == 2
    assert "TRACKER_CONSOLE_TOKEN" in missing.stderr
    short = run_tracker(env | {"TRACKER_CONSOLE_TOKEN": "tiny-token"}, "web")
    assert short.returncode == 2
    assert "at least 16" in short.stderr and "tiny-token" not in short.stderr
    exposed = run_tracker(
        env | {"TRACKER_CONSOLE_TOKEN": TOKEN, "TRACKER_CONSOLE_ADDR": "*"}, "web"
    )
    assert exposed.returncode == 2 and "TRACKER_CONSOLE_ADDR" in exposed.stderr


def test_tracker_web_stops_on_sigint_too(sqlite_url: str, start_web: object) -> None:
    migrate(sqlite_url)
    env = plain_env(sqlite_url, TRACKER_CONSOLE_ADDR="127.0.0.1:0", TRACKER_CONSOLE_TOKEN=TOKEN)
    web = start_web(env)  # type: ignore[operator]
    url = web.url()
    assert httpx.get(url + "/login", timeout=10).status_code == 200
    web.process.send_signal(signal.SIGINT)
    assert web.process.wait(timeout=15) == 0
    assert "Traceback" not in web.log.read_text()
