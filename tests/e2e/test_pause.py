"""A 429 with a long Retry-After is a deliberate wait, not a hang (issue 9, item 5).

Real `tracker run` subprocesses against `tracker fake-api --throttle-first 1`, whose first
status call answers 429 with a Retry-After. The daemon runs with a stand-in for systemd's
notification socket (NOTIFY_SOCKET, WATCHDOG_USEC) that records every ping with its arrival
time. During the pause the daemon must hand back the batches it claimed and has not started,
keep pinging the watchdog, make no status call (nor may another instance), and stop cleanly
on SIGTERM; a Retry-After beyond TRACKER_MAX_RETRY_AFTER is clamped, and logged.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.faults import DaemonLauncher, events, fault_env, sim_stats, wait_for_event
from tests.e2e.notify_socket import NotifySocket, max_gap
from tests.e2e.support import (
    Daemon,
    FakeApi,
    batch_rows,
    migrate,
    raw_insert,
    tag,
    wait_all_downloaded,
    wait_until,
)

pytestmark = pytest.mark.e2e

WATCHDOG_USEC = 2_000_000  # the daemon pings every second; systemd would kill after 2 s
WATCHDOG_SECONDS = WATCHDOG_USEC / 1_000_000
GRACE = 5.0  # TRACKER_SHUTDOWN_GRACE in tracker_env
# How long the pause is watched, from the moment the daemon logged the 429.
WATCH_SECONDS = 12.0


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    with NotifySocket() as sock:
        yield sock


def _status_calls(api: FakeApi) -> tuple[int, dict[str, int]]:
    stats = sim_stats(api)
    return int(stats["status_calls_total"]), dict(stats["status_calls"])


def _pause_report(
    database_url: str, api: FakeApi, notify: NotifySocket, start: float, end: float
) -> dict[str, Any]:
    """What the pause looked like: the figures the test asserts on, in one printable dict."""
    stats = sim_stats(api)
    rows = batch_rows(database_url)
    called: dict[str, int] = stats["status_calls"]
    return {
        "max_ping_gap": round(max_gap(notify.pings(), start=start, end=end), 2),
        "pings": len([t for t in notify.pings() if start <= t <= end]),
        "status_calls_total": stats["status_calls_total"],
        "rate_limited": stats["rate_limited"],
        "leased": sorted(rid for rid, row in rows.items() if row["lease_owner"] is not None),
        # Counters a hand-back must not touch; only a batch that was really asked counts a check.
        "counters_changed": {
            rid: {k: row[k] for k in ("state", "checks", "faults", "rejections")}
            for rid, row in rows.items()
            if row["checks"] != called.get(rid, 0)
            or (row["faults"], row["rejections"], row["download_attempts"]) != (0, 0, 0)
            or row["state"] not in ("pending", "processing")
        },
    }


@pytest.mark.parametrize("concurrency", [1, 3], ids=["one-slot", "three-slots"])
def test_long_retry_after_pauses_without_starving_the_watchdog(
    e2e_database_url: str,
    tmp_path: Path,
    fake_api: Callable[..., FakeApi],
    launch: DaemonLauncher,
    notify: NotifySocket,
    concurrency: int,
) -> None:
    # The 429 takes a second to come back: meanwhile the sweep has claimed a slot's worth
    # of batches ahead, which it must hand back instead of sleeping on them for 300 s.
    api = fake_api("--throttle-first", "1", "--throttle-retry-after", "300", "--latency", "1")
    env = fault_env(
        e2e_database_url,
        api.url,
        tmp_path / "out",
        TRACKER_CONCURRENCY=str(concurrency),
        **notify.env(watchdog_usec=WATCHDOG_USEC),
    )
    migrate(e2e_database_url)
    request_ids = [f"pause-{tag()}" for _ in range(8)]
    raw_insert(e2e_database_url, request_ids)
    daemon = launch(env)
    wait_for_event(daemon, "api.rate_limited", 60)
    paused_at = time.monotonic()
    (limited,) = events(daemon, "api.rate_limited")
    assert limited["retry_after"] == 300.0
    assert limited["pause_seconds"] == 300.0
    assert events(daemon, "api.retry_after_clamped") == []

    # Every call that started went out before the 429 came back: one per worker slot.
    calls_before, _ = _status_calls(api)
    assert calls_before == concurrency

    watch_until = paused_at + WATCH_SECONDS
    other: Daemon | None = None
    if e2e_database_url.startswith("postgresql"):
        # Another instance, started during the pause, learns of it from the shared budget.
        other = launch(fault_env(e2e_database_url, api.url, tmp_path / "out"))
        other.wait_started()
        watch_until = max(watch_until, time.monotonic() + 6)
    while time.monotonic() < watch_until:
        assert _status_calls(api)[0] == calls_before, "a status call during the pause"
        assert daemon.process.poll() is None, "the daemon died during the pause"
        time.sleep(0.25)
    watched_until = time.monotonic()

    report = _pause_report(e2e_database_url, api, notify, paused_at, watched_until)
    print(f"\nFIGURES pause, {concurrency} slot(s): {report}")
    assert report["max_ping_gap"] <= WATCHDOG_SECONDS, report
    assert report["status_calls_total"] == concurrency, report
    assert report["rate_limited"] == 1, report
    assert report["leased"] == [], report
    assert report["counters_changed"] == {}, report
    if other is not None:
        assert events(other, "api.rate_limited") == []
        assert other.process.poll() is None
        assert other.stop(signal.SIGTERM) == 0

    asked = time.monotonic()
    assert daemon.stop(signal.SIGTERM, timeout=GRACE + 30) == 0
    took = time.monotonic() - asked
    print(f"FIGURES pause: SIGTERM answered with exit 0 after {took:.1f} s (grace {GRACE:g} s)")
    # Nothing is in flight during the pause: no need to use up the grace period.
    assert took < GRACE
    assert "STOPPING=1" in [line for _, line in notify.lines()]
    assert all(row["lease_owner"] is None for row in batch_rows(e2e_database_url).values())
    assert _status_calls(api)[0] == concurrency


def test_retry_after_beyond_the_maximum_is_clamped_and_logged(
    e2e_database_url: str,
    tmp_path: Path,
    fake_api: Callable[..., FakeApi],
    launch: DaemonLauncher,
) -> None:
    # 10^12 s (about 31,700 years): a garbled value that would silence the service for good.
    api = fake_api(
        "--throttle-first",
        "1",
        "--throttle-retry-after",
        "1000000000000",
        "--latency",
        "0.2",
        "--completion-delay",
        "0.5",
    )
    env = fault_env(
        e2e_database_url,
        api.url,
        tmp_path / "out",
        TRACKER_CONCURRENCY="2",
        TRACKER_MAX_RETRY_AFTER="3",
    )
    migrate(e2e_database_url)
    request_ids = [f"clamp-{tag()}" for _ in range(6)]
    raw_insert(e2e_database_url, request_ids)
    daemon = launch(env)
    wait_for_event(daemon, "api.rate_limited", 60)
    paused_at = time.monotonic()

    limited = events(daemon, "api.rate_limited")
    clamped = events(daemon, "api.retry_after_clamped")
    assert len(clamped) == 1, f"no clamp logged; the 429 was logged as {limited}"
    assert clamped[0]["level"] == "warning"
    assert clamped[0]["retry_after"] == 1e12
    assert clamped[0]["max_retry_after"] == 3.0
    assert [event["pause_seconds"] for event in limited] == [3.0]

    # The pause lasts 3 s; the batch that drew the 429 is looked at again within a few more.
    wait_all_downloaded(e2e_database_url, len(request_ids), 60)
    took = time.monotonic() - paused_at
    print(f"\nFIGURES clamped pause: every batch downloaded {took:.1f} s after the 429")
    assert took < 30
    stats = sim_stats(api)
    assert stats["rate_limited"] == 1
    assert daemon.stop(signal.SIGTERM) == 0
    wait_until(lambda: daemon.process.poll() is not None, 5, "the daemon to exit")
