"""The daemon as systemd and Prometheus see it: sd_notify datagrams, the watchdog, /metrics."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.support import (
    Daemon,
    FakeApi,
    free_port,
    raw_insert,
    states,
    tracker_env,
    wait_until,
)
from tracker.listen import libpq_url

pytestmark = pytest.mark.e2e


class NotifySocket:
    """A stand-in for systemd's notification socket, recording every datagram."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: list[tuple[float, str]] = []
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(str(path))
        self._socket.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._socket.recv(4096)
            except TimeoutError:
                continue
            self.messages.append((time.monotonic(), data.decode()))

    def lines(self) -> list[str]:
        return [line for _, message in self.messages for line in message.splitlines()]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._socket.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


def test_sd_notify_ready_watchdog_status_stopping(
    e2e_database_url: str,
    tmp_path: Path,
    fake_api: Callable[..., FakeApi],
    run_daemon: Callable[[dict[str, str]], Daemon],
    notify_socket: NotifySocket,
) -> None:
    api = fake_api("--completion-delay", "0.2")
    env = tracker_env(
        e2e_database_url,
        api.url,
        tmp_path / "out",
        NOTIFY_SOCKET=str(notify_socket.path),
        WATCHDOG_USEC="1000000",  # a ping every 0.5 s
    )
    daemon = run_daemon(env)
    wait_until(lambda: "READY=1" in notify_socket.lines(), 30, "READY=1")
    # READY only once the schema is in place: the tables exist now.
    raw_insert(e2e_database_url, [uuid.uuid4().hex])
    wait_until(lambda: notify_socket.lines().count("WATCHDOG=1") >= 3, 15, "watchdog pings")
    wait_until(
        lambda: any(line.startswith("STATUS=last sweep") for line in notify_socket.lines()),
        15,
        "a STATUS line",
    )
    assert daemon.stop() == 0
    wait_until(lambda: "STOPPING=1" in notify_socket.lines(), 5, "STOPPING=1")
    lines = notify_socket.lines()
    assert lines.index("READY=1") < lines.index("STOPPING=1")


@pytest.mark.postgres
def test_a_wedged_sweep_stops_the_watchdog_pings(
    pg_url: str,
    tmp_path: Path,
    fake_api: Callable[..., FakeApi],
    run_daemon: Callable[[dict[str, str]], Daemon],
    notify_socket: NotifySocket,
) -> None:
    api = fake_api()
    env = tracker_env(
        pg_url,
        api.url,
        tmp_path / "out",
        NOTIFY_SOCKET=str(notify_socket.path),
        WATCHDOG_USEC="1000000",
        TRACKER_SWEEP_INTERVAL="0.2",
    )
    daemon = run_daemon(env)
    wait_until(lambda: notify_socket.lines().count("WATCHDOG=1") >= 2, 30, "first pings")
    # Wedge the sweep: its next claim waits forever on a lock we hold.
    blocker = psycopg.connect(libpq_url(pg_url))
    blocker.execute("LOCK TABLE tracker_batches IN ACCESS EXCLUSIVE MODE")
    time.sleep(1.5)  # let the sweep get stuck behind the lock
    wedged_at = time.monotonic()
    time.sleep(3)
    pings_while_wedged = [
        at for at, message in notify_socket.messages if at > wedged_at and "WATCHDOG=1" in message
    ]
    blocker.rollback()
    blocker.close()
    assert pings_while_wedged == []
    wait_until(
        lambda: any(at > wedged_at + 3 and "WATCHDOG=1" in m for at, m in notify_socket.messages),
        15,
        "pings to resume once unwedged",
    )
    assert daemon.stop() == 0


def test_metrics_and_healthz_over_http(
    e2e_database_url: str,
    tmp_path: Path,
    fake_api: Callable[..., FakeApi],
    run_daemon: Callable[[dict[str, str]], Daemon],
) -> None:
    api = fake_api("--completion-delay", "0.2")
    port = free_port()
    env = tracker_env(
        e2e_database_url, api.url, tmp_path / "out", TRACKER_METRICS_ADDR=f"127.0.0.1:{port}"
    )
    daemon = run_daemon(env)
    daemon.wait_started()
    request_ids = [uuid.uuid4().hex for _ in range(3)] + [f"fail-{uuid.uuid4().hex[:8]}"]
    raw_insert(e2e_database_url, request_ids)
    wait_until(
        lambda: set(states(e2e_database_url).values()) == {"downloaded", "failed"}, 60, "final"
    )

    def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def gauges_current() -> bool:
        samples = scrape()
        return samples.get(("tracker_batches", (("state", "downloaded"),))) == 3.0

    wait_until(gauges_current, 40, "the batch gauges to refresh")
    samples = scrape()
    assert samples[("tracker_transitions_total", (("to_state", "downloaded"),))] == 3.0
    assert samples[("tracker_transitions_total", (("to_state", "failed"),))] == 1.0
    assert samples[("tracker_batches", (("state", "failed"),))] == 1.0
    assert samples[("tracker_download_bytes_total", ())] == 3 * 4096
    assert samples[("tracker_status_calls_total", (("outcome", "completed"),))] >= 3
    assert samples[("tracker_last_sweep_timestamp_seconds", ())] > time.time() - 60
    assert samples[("tracker_quota_used", (("window", "day"),))] >= 4
    health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
    assert (health.status_code, health.text) == (200, "ok\n")
    assert daemon.stop() == 0
