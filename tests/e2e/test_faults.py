"""The reliability promises, proven by injecting the fault for real.

Every test runs `tracker run` subprocesses against `tracker fake-api` and breaks something
real: SIGKILL and SIGSTOP, several instances on one PostgreSQL, a database connection cut
by a relay or by pg_terminate_backend, a simulator killed and restarted on its port, a
file-size limit on the daemon, wrong credentials in the secret file, signals mid-download.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import sqlalchemy as sa

from tests.databases import PG_ADMIN_URL
from tests.e2e.faults import (
    TRICKLED,
    CannotMount,
    DaemonLauncher,
    TcpProxy,
    events,
    fault_env,
    fetching,
    full_downloads,
    limit_file_size,
    part_files,
    sim_stats,
    small_tmpfs,
    terminate_backends,
    wait_for_event,
    wait_for_lost_ownership,
    wait_for_part_file,
    with_umask,
)
from tests.e2e.support import (
    BIG,
    Daemon,
    FakeApi,
    assert_consistent_history,
    assert_downloaded_once,
    assert_files,
    assert_recorded_files,
    batch_rows,
    execute,
    expected_files,
    query,
    raw_insert,
    states,
    tag,
    wait_all_downloaded,
    wait_until,
)

pytestmark = pytest.mark.e2e

# --------------------------------------------------------------------------- 1. crashes


def test_sigkill_at_random_moments_loses_nothing(
    e2e_database_url: str,
    tmp_path: Path,
    fake_api: Callable[..., FakeApi],
    launch: DaemonLauncher,
) -> None:
    rng = random.Random(20240611)
    api = fake_api("--completion-delay", "1", "--big-file-size", str(BIG))
    output_dir = tmp_path / "out"
    env = fault_env(
        e2e_database_url,
        api.url,
        output_dir,
        TRACKER_LEASE_DURATION="3",
        TRACKER_CONCURRENCY="4",
    )
    run = tag()
    request_ids = (
        [f"big-{run}-{i}" for i in range(10)]
        + [f"slow-{run}-{i}" for i in range(3)]
        + [f"trunc-{run}-{i}" for i in range(3)]
        + [f"flaky-{run}-{i}" for i in range(2)]
        + [f"{run}{i:02d}" for i in range(12)]
    )
    rng.shuffle(request_ids)
    # Other applications keep enqueueing while the tracker is being killed: a wave of
    # batches before each kill keeps work in flight at every kill.
    waves = [request_ids[i::8] for i in range(8)]
    daemon = launch(env)
    daemon.wait_started()

    kills = mid_download = 0
    for wave in waves:
        raw_insert(e2e_database_url, wave)
        # The random moment is the fault being injected, not a wait for a condition.
        time.sleep(rng.uniform(0.3, 3.0))
        if part_files(output_dir):
            mid_download += 1
        daemon.process.kill()
        daemon.process.wait(timeout=10)
        kills += 1
        daemon = launch(env)

    wait_all_downloaded(e2e_database_url, len(request_ids), 180)
    daemon.wait_started()
    assert daemon.stop(signal.SIGTERM) == 0
    print(f"\nFIGURES crash: {kills} SIGKILLs survived, {mid_download} with a download in flight")

    files = expected_files(request_ids)
    assert_files(output_dir, files)  # exactly these names: no .part left, nothing extra
    assert_recorded_files(e2e_database_url, output_dir, files)
    chains = assert_consistent_history(e2e_database_url)
    assert_downloaded_once(chains)


# --------------------------------------------------------------------------- 2. instances


@pytest.mark.postgres
def test_three_instances_work_each_batch_once(
    pg_url: str,
    tmp_path: Path,
    fake_api: Callable[..., FakeApi],
    launch: DaemonLauncher,
) -> None:
    api = fake_api("--completion-delay", "1", "--big-file-size", str(8 << 20))
    output_dir = tmp_path / "out"
    env = fault_env(pg_url, api.url, output_dir, TRACKER_LEASE_DURATION="30")
    run = tag()
    request_ids = [f"big-{run}-{i}" for i in range(6)] + [f"{run}{i:02d}" for i in range(30)]
    daemons = [launch(env) for _ in range(3)]
    for daemon in daemons:
        daemon.wait_started()
    raw_insert(pg_url, request_ids)
    wait_all_downloaded(pg_url, len(request_ids), 120)
    for daemon in daemons:
        assert daemon.stop(signal.SIGTERM) == 0

    files = expected_files(request_ids, big=8 << 20)
    assert_files(output_dir, files)
    assert_recorded_files(pg_url, output_dir, files)
    chains = assert_consistent_history(pg_url)
    assert_downloaded_once(chains)
    stats = sim_stats(api)
    # Each output was fetched exactly once, by one instance.
    assert full_downloads(stats) == {f"/upi-basic-batch-output-files/{name}": 1 for name in files}
    # Every status call Deepvue saw was recorded as a check by the instance that made it:
    # a batch polled by two instances at once would show a call that no write counted.
    checks = {rid: row["checks"] for rid, row in batch_rows(pg_url).items()}
    assert stats["status_calls"] == checks
    assert stats["rate_limited"] == 0
    worked = [len(events(daemon, "batch.transition")) for daemon in daemons]
    conflicts = [len(events(daemon, "batch.conflict")) for daemon in daemons]
    print(f"\nFIGURES instances: 3 daemons, transitions per daemon {worked}, conflicts {conflicts}")
    assert sum(1 for count in worked if count) >= 2, worked
    assert conflicts == [0, 0, 0]


def _pause_owner_mid_download(
    pg_url: str, output_dir: Path, api: FakeApi, launch: DaemonLauncher
) -> tuple[str, dict[str, str], Daemon, int]:
    """Daemon A, downloading a trickled file, is SIGSTOPped partway; its temp file's inode."""
    env = fault_env(pg_url, api.url, output_dir, TRACKER_LEASE_DURATION="6")
    request_id = f"trickle-{tag()}"
    paused = launch(env)
    paused.wait_started()
    raw_insert(pg_url, [request_id])
    # A trickled body may be buffered in memory before it reaches the temp file, so the
    # file host's record of the GET is what says the download is under way. Its bytes keep
    # arriving in the socket buffer while the process is stopped.
    part = wait_for_part_file(output_dir, 30, min_bytes=0)
    wait_until(lambda: fetching(api, request_id), 10, "the file host to see the download")
    paused.process.send_signal(signal.SIGSTOP)
    return request_id, env, paused, (output_dir / part).stat().st_ino


@pytest.mark.postgres
def test_paused_owner_waking_after_takeover_changes_nothing(
    pg_url: str,
    tmp_path: Path,
    fake_api: Callable[..., FakeApi],
    launch: DaemonLauncher,
) -> None:
    api = fake_api("--completion-delay", "0.2", "--file-size", str(TRICKLED))
    output_dir = tmp_path / "out"
    request_id, env, paused, _ = _pause_owner_mid_download(pg_url, output_dir, api, launch)
    taker = launch(env)
    wait_all_downloaded(pg_url, 1, 60)
    assert taker.stop(signal.SIGTERM) == 0

    row_before = batch_rows(pg_url)
    history_before = query(pg_url, "SELECT * FROM tracker_transitions ORDER BY id")
    final = output_dir / f"{request_id}.csv"
    file_before = final.stat()
    paused.process.send_signal(signal.SIGCONT)
    wait_for_lost_ownership(paused)
    assert paused.process.poll() is None, "the woken instance must keep running"
    paused.wait_started()
    assert paused.stop(signal.SIGTERM) == 0

    assert batch_rows(pg_url) == row_before
    assert query(pg_url, "SELECT * FROM tracker_transitions ORDER BY id") == history_before
    file_after = final.stat()
    assert (file_after.st_ino, file_after.st_mtime_ns) == (
        file_before.st_ino,
        file_before.st_mtime_ns,
    )
    assert_files(output_dir, expected_files([request_id], small=TRICKLED))
    assert_consistent_history(pg_url)


@pytest.mark.postgres
def test_paused_owner_waking_mid_takeover_does_not_disturb_the_new_owner(
    pg_url: str,
    tmp_path: Path,
    fake_api: Callable[..., FakeApi],
    launch: DaemonLauncher,
) -> None:
    api = fake_api("--completion-delay", "0.2", "--file-size", str(TRICKLED))
    output_dir = tmp_path / "out"
    request_id, env, paused, paused_inode = _pause_owner_mid_download(
        pg_url, output_dir, api, launch
    )
    taker = launch(env)

    def taker_downloading() -> bool:
        # The taker's temp file is a new inode once it has started its own download.
        for name in part_files(output_dir):
            with contextlib.suppress(FileNotFoundError):
                info = (output_dir / name).stat()
                if info.st_ino != paused_inode:
                    return True
        return False

    wait_until(taker_downloading, 30, "the other instance to start its own download")
    # The paused instance's remaining bytes sit in its socket buffer: it finishes at once.
    paused.process.send_signal(signal.SIGCONT)
    wait_for_lost_ownership(paused)
    wait_all_downloaded(pg_url, 1, 60)
    for daemon in (paused, taker):
        daemon.wait_started()
        assert daemon.stop(signal.SIGTERM) == 0

    assert_files(output_dir, expected_files([request_id], small=TRICKLED))
    chains = assert_consistent_history(pg_url)
    assert_downloaded_once(chains)
    # The new owner's download was not disturbed: it succeeded at its first attempt, and
    # the file was fetched in full twice only (the paused owner's and the new owner's).
    assert events(taker, "download.failed") == []
    assert batch_rows(pg_url)[request_id]["download_attempts"] == 1
    assert full_downloads(sim_stats(api)) == {f"/upi-basic-batch-output-files/{request_id}.csv": 2}


@pytest.mark.postgres
def test_download_longer_than_the_lease_keeps_its_lease(
    pg_url: str,
    tmp_path: Path,
    fake_api: Callable[..., FakeApi],
    launch: DaemonLauncher,
) -> None:
    # 16 KiB at 2 KiB/s: a download of about 8 s, with a lease of 3 s.
    api = fake_api("--completion-delay", "0.2", "--file-size", "16384")
    output_dir = tmp_path / "out"
    env = fault_env(pg_url, api.url, output_dir, TRACKER_LEASE_DURATION="3")
    request_ids = [f"trickle-{tag()}", tag()]
    daemons = [launch(env) for _ in range(2)]
    for daemon in daemons:
        daemon.wait_started()
    raw_insert(pg_url, request_ids)
    wait_all_downloaded(pg_url, 2, 40)
    for daemon in daemons:
        assert daemon.stop(signal.SIGTERM) == 0

    assert_files(output_dir, expected_files(request_ids, small=16384))
    assert_downloaded_once(assert_consistent_history(pg_url))
    # The owner kept its lease while the bytes trickled in: nobody else started the same
    # download, and nobody lost the batch.
    assert full_downloads(sim_stats(api)) == {
        f"/upi-basic-batch-output-files/{request_id}.csv": 1 for request_id in request_ids
    }
    for daemon in daemons:
        assert events(daemon, "batch.conflict") == []
        assert events(daemon, "download.ownership_lost") == []


# --------------------------------------------------------------------------- 3. quota


@pytest.mark.postgres
def test_three_instances_share_one_quota(
    pg_url: str,
    tmp_path: Path,
    fake_api: Callable[..., FakeApi],
    launch: DaemonLauncher,
) -> None:
    api = fake_api("--completion-delay", "0.5", "--rate-per-second", "2", "--rate-per-minute", "60")
    env = fault_env(
        pg_url,
        api.url,
        tmp_path / "out",
        TRACKER_RATE_PER_SECOND="2",
        TRACKER_RATE_PER_MINUTE="60",
        # One check while in progress, one that finds it complete: about 2 calls a batch.
        TRACKER_POLL_MIN_INTERVAL="1",
    )
    daemons = [launch(env) for _ in range(3)]
    for daemon in daemons:
        daemon.wait_started()
    request_ids = [tag() for _ in range(20)]
    raw_insert(pg_url, request_ids)
    started = time.monotonic()
    wait_all_downloaded(pg_url, len(request_ids), 120)
    took = time.monotonic() - started
    for daemon in daemons:
        assert daemon.stop(signal.SIGTERM) == 0

    stats = sim_stats(api)
    calls = stats["status_calls_total"]
    print(
        f"\nFIGURES quota: 3 daemons, {calls} status calls in {took:.1f} s, "
        f"{stats['rate_limited']} answered 429"
    )
    assert stats["rate_limited"] == 0
    assert calls >= 2 * len(request_ids)
    # Two calls a second at most, for the whole cluster (a little slack for the first second).
    assert calls <= 2 * took + 2
    assert_consistent_history(pg_url)


def test_day_budget_survives_a_restart(
    e2e_database_url: str,
    tmp_path: Path,
    fake_api: Callable[..., FakeApi],
    launch: DaemonLauncher,
) -> None:
    api = fake_api("--completion-delay", "3600")
    env = fault_env(e2e_database_url, api.url, tmp_path / "out", TRACKER_RATE_PER_DAY="20")
    first = launch(env)
    first.wait_started()
    # More new batches than the day allows: each costs a first check at once.
    raw_insert(e2e_database_url, [tag() for _ in range(25)])

    def total_calls() -> int:
        return int(sim_stats(api)["status_calls_total"])

    wait_until(lambda: total_calls() >= 20, 30, "the day's 20 calls to be spent")
    assert first.stop(signal.SIGTERM) == 0
    spent = total_calls()
    assert spent == 20
    assert sorted(states(e2e_database_url).values()).count("pending") == 5

    second = launch(env)
    second.wait_started()
    # A restarted daemon with a fresh in-memory view would check the 5 waiting batches at
    # once. Watch it for a while (a dozen sweeps): the count must stay flat.
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        assert total_calls() == spent
        time.sleep(0.25)
    assert second.process.poll() is None
    assert second.stop(signal.SIGTERM) == 0
    print(f"\nFIGURES day budget: {spent} calls before the restart, 0 after")


# --------------------------------------------------------------------------- 4. outages


def _pg_host_port() -> tuple[str, int]:
    url = sa.make_url(PG_ADMIN_URL)
    return url.host or "127.0.0.1", url.port or 5432


@pytest.mark.postgres
def test_database_unreachable_for_a_while_is_weather(
    pg_url: str,
    tmp_path: Path,
    fake_api: Callable[..., FakeApi],
    launch: DaemonLauncher,
) -> None:
    # Trickled files (16 KiB, about 8 s) are still downloading when the database goes away.
    api = fake_api("--completion-delay", "2", "--file-size", "16384")
    output_dir = tmp_path / "out"
    run = tag()
    trickled = [f"trickle-{run}-{i}" for i in range(2)]
    request_ids = trickled + [f"{run}{i:02d}" for i in range(14)]
    raw_insert(pg_url, request_ids)
    with TcpProxy(*_pg_host_port()) as proxy:
        env = fault_env(proxy.url_for(pg_url), api.url, output_dir)
        daemon = launch(env)
        daemon.wait_started()
        wait_until(
            lambda: all(fetching(api, request_id) for request_id in trickled),
            30,
            "the trickled downloads to be under way",
        )
        reset = proxy.cut()
        # The daemon must notice: it logs the outage while the database stays unreachable.
        wait_until(
            lambda: bool(events(daemon, "db.unreachable") or events(daemon, "sweep.failed")),
            30,
            "the daemon to log the outage",
        )
        time.sleep(8)  # the outage itself: the database stays away for a while
        assert daemon.process.poll() is None, "the daemon must ride out the outage"
        proxy.restore()
        # Well within the lease (300 s): recovery must not wait for leases to run out.
        wait_all_downloaded(pg_url, len(request_ids), 60)
        assert daemon.process.poll() is None
        assert daemon.stop(signal.SIGTERM) == 0
        print(
            f"\nFIGURES db outage: {reset} connections reset, {proxy.accepted} accepted, "
            f"{len(events(daemon, 'db.unreachable'))} db.unreachable, "
            f"{len(events(daemon, 'sweep.failed'))} sweep.failed"
        )
    files = expected_files(request_ids, small=16384)
    assert_files(output_dir, files)
    assert_recorded_files(pg_url, output_dir, files)
    assert_downloaded_once(assert_consistent_history(pg_url))


@pytest.mark.postgres
def test_database_sessions_terminated_mid_run_is_weather(
    pg_url: str,
    tmp_path: Path,
    fake_api: Callable[..., FakeApi],
    launch: DaemonLauncher,
) -> None:
    api = fake_api("--completion-delay", "1.5", "--big-file-size", str(8 << 20))
    output_dir = tmp_path / "out"
    run = tag()
    request_ids = [f"big-{run}-{i}" for i in range(4)] + [f"{run}{i:02d}" for i in range(16)]
    env = fault_env(pg_url, api.url, output_dir)
    daemon = launch(env)
    daemon.wait_started()
    raw_insert(pg_url, request_ids)
    terminated = 0
    for _ in range(4):
        wait_until(
            lambda: bool(query(PG_ADMIN_URL, _SESSIONS, name=_database(pg_url))[0][0]),
            30,
            "the daemon to hold a session",
        )
        terminated += terminate_backends(PG_ADMIN_URL, pg_url)
        time.sleep(0.7)  # let it reconnect and work a little before the next blow
    wait_all_downloaded(pg_url, len(request_ids), 120)
    assert daemon.process.poll() is None
    assert daemon.stop(signal.SIGTERM) == 0
    print(f"\nFIGURES pg_terminate_backend: {terminated} sessions terminated in 4 rounds")
    assert terminated >= 4
    files = expected_files(request_ids, big=8 << 20)
    assert_files(output_dir, files)
    assert_recorded_files(pg_url, output_dir, files)
    assert_downloaded_once(assert_consistent_history(pg_url))


_SESSIONS = (
    "SELECT count(*) FROM pg_stat_activity WHERE datname = :name AND pid <> pg_backend_pid()"
)


def _database(url: str) -> str:
    return str(sa.make_url(url).database)


def test_api_errors_and_garbage_are_weather(
    sqlite_url: str,
    tmp_path: Path,
    fake_api: Callable[..., FakeApi],
    launch: DaemonLauncher,
) -> None:
    # Completed at the first answer that is not an error: each batch needs one good call.
    # A quarter of all answers fail on top of the garbage- and flaky- faults.
    api = fake_api("--completion-delay", "0", "--error-rate", "0.25")
    output_dir = tmp_path / "out"
    env = fault_env(sqlite_url, api.url, output_dir)
    run = tag()
    request_ids = (
        [f"garbage-{run}-{i}" for i in range(2)]
        + [f"flaky-{run}-{i}" for i in range(2)]
        + [f"{run}{i:02d}" for i in range(2)]
    )
    daemon = launch(env)
    daemon.wait_started()
    raw_insert(sqlite_url, request_ids)
    # The fault backoff is capped at TRACKER_POLL_MAX_INTERVAL (1 s here).
    wait_all_downloaded(sqlite_url, len(request_ids), 120)
    assert daemon.stop(signal.SIGTERM) == 0
    stats = sim_stats(api)
    print(f"\nFIGURES api errors: {stats['errors_served']} 5xx/garbage answers served")
    assert stats["errors_served"] >= len(request_ids)
    assert_files(output_dir, expected_files(request_ids))
    chains = assert_consistent_history(sqlite_url)
    assert_downloaded_once(chains)
    assert all("failed" not in {to for _, to in chain} for chain in chains.values())


def test_a_flaky_api_is_retried_within_the_configured_maximum_interval(
    e2e_database_url: str,
    tmp_path: Path,
    fake_api: Callable[..., FakeApi],
    launch: DaemonLauncher,
) -> None:
    """Most answers fail: with TRACKER_POLL_MAX_INTERVAL=1 no batch waits much longer than
    a second between tries, so even a long streak of faults costs seconds. The backoff once
    grew from 5 s towards 600 s whatever the settings said: six faults in a row cost minutes.
    """
    api = fake_api("--completion-delay", "0", "--error-rate", "0.85")
    output_dir = tmp_path / "out"
    env = fault_env(e2e_database_url, api.url, output_dir, TRACKER_POLL_MAX_INTERVAL="1")
    request_ids = [f"{tag()}{i:02d}" for i in range(8)]
    daemon = launch(env)
    daemon.wait_started()
    started = time.monotonic()
    raw_insert(e2e_database_url, request_ids)
    wait_all_downloaded(e2e_database_url, len(request_ids), 90)
    took = time.monotonic() - started
    assert daemon.stop(signal.SIGTERM) == 0
    stats = sim_stats(api)
    print(
        f"\nFIGURES flaky api: {len(request_ids)} batches in {took:.1f} s, "
        f"{stats['errors_served']} of {stats['status_calls_total']} status answers were 503"
    )
    assert stats["errors_served"] >= len(request_ids)
    assert_files(output_dir, expected_files(request_ids))


def test_api_down_then_back_on_the_same_port_is_weather(
    sqlite_url: str,
    tmp_path: Path,
    fake_api: Callable[..., FakeApi],
    launch: DaemonLauncher,
) -> None:
    api = fake_api("--completion-delay", "1", "--big-file-size", str(32 << 20))
    port = str(urlsplit(api.url).port)
    output_dir = tmp_path / "out"
    env = fault_env(sqlite_url, api.url, output_dir, TRACKER_CONCURRENCY="4")
    run = tag()
    request_ids = [f"big-{run}-{i}" for i in range(4)] + [f"{run}{i:02d}" for i in range(8)]
    daemon = launch(env)
    daemon.wait_started()
    raw_insert(sqlite_url, request_ids)
    wait_until(lambda: "ready" in states(sqlite_url).values(), 30, "a first completion")
    # Gone without a goodbye: connections (and downloads in flight) are cut.
    api.process.kill()
    api.process.wait(timeout=10)
    time.sleep(5)  # the outage itself
    assert daemon.process.poll() is None
    # A new simulator on the same port: fresh signing key, so old tokens and URLs are dead too.
    fake_api("--port", port, "--completion-delay", "0.5", "--big-file-size", str(32 << 20))
    wait_all_downloaded(sqlite_url, len(request_ids), 120)
    assert daemon.stop(signal.SIGTERM) == 0
    files = expected_files(request_ids, big=32 << 20)
    assert_files(output_dir, files)
    chains = assert_consistent_history(sqlite_url)
    assert_downloaded_once(chains)
    assert all("failed" not in {to for _, to in chain} for chain in chains.values())


def test_download_cut_off_by_its_deadline_stays_retryable(
    sqlite_url: str,
    tmp_path: Path,
    fake_api: Callable[..., FakeApi],
    launch: DaemonLauncher,
) -> None:
    # 16 KiB: a trickled file takes about 8 s; a stalled one never ends.
    api = fake_api("--completion-delay", "0", "--file-size", "16384")
    output_dir = tmp_path / "out"
    env = fault_env(sqlite_url, api.url, output_dir, TRACKER_DOWNLOAD_DEADLINE="1.5")
    run = tag()
    slow = [f"trickle-{run}", f"stall-{run}"]
    last_try = f"trickle-{run}-last"
    healthy = run
    daemon = launch(env)
    daemon.wait_started()
    # A batch that already used 4 of its 5 download attempts (as if earlier runs had failed).
    raw_insert(sqlite_url, [last_try])
    execute(
        sqlite_url,
        "UPDATE tracker_batches SET download_attempts = 4 WHERE request_id = :rid",
        rid=last_try,
    )
    raw_insert(sqlite_url, [*slow, healthy])

    def attempts(request_id: str) -> int:
        return int(batch_rows(sqlite_url)[request_id]["download_attempts"])

    wait_until(
        lambda: all(attempts(request_id) >= 2 for request_id in slow),
        60,
        "two download attempts of each slow file cut off by the deadline",
    )
    wait_until(lambda: states(sqlite_url)[last_try] == "failed", 30, "the last attempt to fail")
    assert daemon.stop(signal.SIGTERM) == 0

    rows = batch_rows(sqlite_url)
    for request_id in slow:
        row = rows[request_id]
        # Still retryable: not published, not failed before its attempts ran out.
        assert row["state"] == "ready", row
        assert 2 <= row["download_attempts"] < 5, row
        assert "deadline" in row["last_error"], row
    assert rows[healthy]["state"] == "downloaded"
    assert rows[last_try]["download_attempts"] == 5
    assert "after 5 attempts" in rows[last_try]["last_error"]
    # Only the healthy file was published, and no partial file was left behind.
    assert_files(output_dir, expected_files([healthy], small=16384))
    chains = assert_consistent_history(sqlite_url)
    for request_id in slow:
        assert chains[request_id] == [("pending", "ready")], chains[request_id]
    assert chains[last_try] == [("pending", "ready"), ("ready", "failed")]


@pytest.mark.postgres
def test_file_size_limit_keeps_batches_ready_until_lifted(
    pg_url: str,
    tmp_path: Path,
    fake_api: Callable[..., FakeApi],
    launch: DaemonLauncher,
) -> None:
    """EFBIG on the output (RLIMIT_FSIZE): the batch is not at fault and waits for space.

    The database is PostgreSQL so that the limit bites only the downloads (and the daemon's
    log, which stays far below it).
    """
    big = 4 << 20
    api = fake_api("--completion-delay", "0", "--big-file-size", str(big))
    output_dir = tmp_path / "out"
    env = fault_env(pg_url, api.url, output_dir)
    run = tag()
    too_big = [f"big-{run}-{i}" for i in range(2)]
    small = [f"{run}{i}" for i in range(2)]
    limited = launch(env, preexec_fn=limit_file_size(1 << 20))
    limited.wait_started()
    raw_insert(pg_url, too_big + small)

    def unwritable_twice() -> bool:
        failures = [
            line
            for line in events(limited, "download.failed")
            if line.get("error") == "OutputUnwritable"
        ]
        return all(
            sum(1 for line in failures if line["request_id"] == request_id) >= 2
            for request_id in too_big
        )

    wait_until(unwritable_twice, 60, "two refused writes of each big file")
    wait_until(lambda: states(pg_url)[small[-1]] == "downloaded", 30, "the small files")
    assert limited.process.poll() is None, "a full disk must not stop the daemon"
    assert limited.stop(signal.SIGTERM) == 0
    assert part_files(output_dir) == []
    rows = batch_rows(pg_url)
    for request_id in too_big:
        row = rows[request_id]
        assert row["state"] == "ready", row
        assert row["download_attempts"] == 0, row  # our disk, not the batch's fault
        assert "unwritable" in row["last_error"], row
        assert not (output_dir / f"{request_id}.csv").exists()

    lifted = launch(env)
    wait_all_downloaded(pg_url, 4, 60)
    assert lifted.stop(signal.SIGTERM) == 0
    assert_files(output_dir, expected_files(too_big + small, big=big))
    assert_downloaded_once(assert_consistent_history(pg_url))


def test_wrong_secret_is_reported_once_per_backoff_and_penalises_nobody(
    sqlite_url: str,
    tmp_path: Path,
    fake_api: Callable[..., FakeApi],
    launch: DaemonLauncher,
) -> None:
    api = fake_api("--completion-delay", "0")
    output_dir = tmp_path / "out"
    secret_file = tmp_path / "client_secret"
    secret_file.write_text("not-the-right-secret\n")
    secret_file.chmod(0o600)
    env = fault_env(sqlite_url, api.url, output_dir, TRACKER_CLIENT_SECRET_FILE=str(secret_file))
    del env["TRACKER_CLIENT_SECRET"]
    daemon = launch(env)
    daemon.wait_started()
    request_ids = [tag() for _ in range(5)]
    raw_insert(sqlite_url, request_ids)
    wait_for_event(daemon, "api.auth_failed", 30)
    watched_from = time.monotonic()
    # The service pauses: no new error, no new authorize, for the whole watch.
    while time.monotonic() - watched_from < 10:
        assert len(events(daemon, "api.auth_failed")) == 1
        time.sleep(0.5)
    assert sim_stats(api)["authorize_calls"] == 1
    assert sim_stats(api)["status_calls_total"] == 0
    for row in batch_rows(sqlite_url).values():
        assert row["state"] == "pending", row
        counters = (row["checks"], row["faults"], row["rejections"], row["download_attempts"])
        assert counters == (0, 0, 0, 0), row
        assert row["lease_owner"] is None, row
    assert query(sqlite_url, "SELECT count(*) FROM tracker_transitions")[0][0] == 0

    # Rotate the secret in place: the daemon reads the file again at its next authorize.
    secret_file.write_text("demo-secret\n")
    wait_all_downloaded(sqlite_url, len(request_ids), 60)
    assert daemon.process.poll() is None, "no restart was needed"
    assert daemon.stop(signal.SIGTERM) == 0
    log_text = daemon.log_path.read_text()
    assert "not-the-right-secret" not in log_text
    assert "demo-secret" not in log_text
    assert_files(output_dir, expected_files(request_ids))


def test_full_disk_keeps_batches_ready_until_space_returns(
    sqlite_url: str,
    tmp_path: Path,
    fake_api: Callable[..., FakeApi],
    launch: DaemonLauncher,
) -> None:
    """A full real (tmpfs) file system; space is freed while the daemon keeps running.

    The file's Content-Length is checked against the free space before a byte is written
    ("has no room"); a file whose length was not announced meets ENOSPC instead."""
    big = 4 << 20
    api = fake_api("--completion-delay", "0", "--big-file-size", str(big))
    output_dir = tmp_path / "out"
    run = tag()
    too_big = [f"big-{run}-{i}" for i in range(2)]
    small = [f"{run}{i}" for i in range(2)]
    with contextlib.ExitStack() as cleanup:
        try:
            resize = cleanup.enter_context(small_tmpfs(output_dir, 2 << 20))
        except CannotMount as error:
            pytest.skip(f"cannot mount a tmpfs here: {error}")
        daemon = launch(fault_env(sqlite_url, api.url, output_dir))
        daemon.wait_started()
        raw_insert(sqlite_url, too_big + small)

        def no_space_for_each() -> bool:
            refused = {
                str(line["request_id"])
                for line in events(daemon, "download.failed")
                if line.get("error") == "OutputUnwritable"
                and ("has no room" in str(line["reason"]) or "ENOSPC" in str(line["reason"]))
            }
            return refused >= set(too_big)

        wait_until(no_space_for_each, 60, "the big files to hit a full disk")
        wait_until(lambda: states(sqlite_url)[small[-1]] == "downloaded", 30, "the small files")
        rows = batch_rows(sqlite_url)
        for request_id in too_big:
            assert rows[request_id]["state"] == "ready", rows[request_id]
            assert rows[request_id]["download_attempts"] == 0, rows[request_id]
            assert not (output_dir / f"{request_id}.csv").exists()
        assert daemon.process.poll() is None, "a full disk must not stop the daemon"

        resize(64 << 20)  # space is freed: the same daemon finishes the job
        wait_all_downloaded(sqlite_url, 4, 60)
        assert daemon.stop(signal.SIGTERM) == 0
        assert_files(output_dir, expected_files(too_big + small, big=big))
        assert_downloaded_once(assert_consistent_history(sqlite_url))


# --------------------------------------------------------------------------- 6. secrets


def test_secrets_stay_secret_through_every_fault(
    e2e_database_url: str,
    tmp_path: Path,
    fake_api: Callable[..., FakeApi],
    launch: DaemonLauncher,
) -> None:
    secret = f"sk-live-{uuid.uuid4().hex}"
    api = fake_api("--completion-delay", "0.3", "--client-secret", secret)
    output_dir = tmp_path / "out"
    env = fault_env(
        e2e_database_url,
        api.url,
        output_dir,
        TRACKER_CLIENT_SECRET=secret,
        # Debug is where libraries print full URLs and headers: the scrubber must hold there too.
        TRACKER_LOG_LEVEL="DEBUG",
    )
    run = tag()
    good = [
        f"{run}",
        f"flaky-{run}",
        f"garbage-{run}",
        f"expire-{run}",
        f"trunc-{run}",
    ]
    refused = [
        f"badurl-host-{run}",
        f"badurl-userinfo-{run}",
        f"badurl-redirect-{run}",
        f"badurl-http-{run}",
    ]
    # A loose umask must not loosen the files' mode (KYC data).
    daemon = launch(env, preexec_fn=with_umask(0o000))
    daemon.wait_started()
    raw_insert(e2e_database_url, good + refused)
    wait_until(
        lambda: (
            set(states(e2e_database_url).values()) <= {"downloaded", "failed"}
            and len(states(e2e_database_url)) == len(good + refused)
        ),
        90,
        "every batch to become final",
    )
    assert daemon.stop(signal.SIGTERM) == 0
    assert states(e2e_database_url) == {rid: "downloaded" for rid in good} | {
        rid: "failed" for rid in refused
    }
    assert_files(output_dir, expected_files(good))  # mode 0640 despite umask 0
    assert output_dir.stat().st_mode & 0o007 == 0

    log_text = daemon.log_path.read_text()
    daemon.log_lines()  # every line is JSON
    for leak in (secret, "eyJ", "X-Amz-Signature", "user:pass@"):
        assert leak not in log_text, leak
    stats = sim_stats(api)
    assert stats["authorize_calls"] >= 1
    for request in stats["downloads"]:
        headers = set(request["headers"])
        assert not headers & {"authorization", "x-api-key", "client-id"}, request
        assert secret not in " ".join(request["headers"].values())
    for row in batch_rows(e2e_database_url).values():
        stored = " ".join(str(value) for value in row.values())
        assert secret not in stored and "X-Amz-Signature" not in stored, row


# --------------------------------------------------------------------------- 7. stopping


def _start_slow_downloads(
    database_url: str,
    tmp_path: Path,
    fake_api: Callable[..., FakeApi],
    launch: DaemonLauncher,
    **extra: str,
) -> tuple[dict[str, str], Daemon, list[str], Path]:
    """A daemon with trickled downloads (about 8 s each) in flight."""
    api = fake_api("--completion-delay", "0", "--file-size", "16384", "--big-file-size", str(BIG))
    output_dir = tmp_path / "out"
    env = fault_env(database_url, api.url, output_dir, **extra)
    run = tag()
    request_ids = [f"trickle-{run}-{i}" for i in range(2)] + [f"big-{run}", run]
    daemon = launch(env)
    daemon.wait_started()
    raw_insert(database_url, request_ids)
    wait_until(lambda: len(part_files(output_dir)) >= 2, 30, "two downloads in flight")
    return env, daemon, request_ids, output_dir


def _nothing_held_or_half_written(database_url: str, output_dir: Path) -> None:
    assert part_files(output_dir) == []
    for row in batch_rows(database_url).values():
        assert row["lease_owner"] is None, row
        assert row["state"] in {"ready", "downloaded"}, row
        if row["state"] == "downloaded":
            name = Path(row["file_path"]).name
            data = (output_dir / name).read_bytes()
            assert hashlib.sha256(data).hexdigest() == row["file_sha256"]


def test_sigterm_lets_in_flight_downloads_finish_within_grace(
    sqlite_url: str,
    tmp_path: Path,
    fake_api: Callable[..., FakeApi],
    launch: DaemonLauncher,
) -> None:
    _, daemon, request_ids, output_dir = _start_slow_downloads(
        sqlite_url, tmp_path, fake_api, launch, TRACKER_SHUTDOWN_GRACE="20"
    )
    asked = time.monotonic()
    assert daemon.stop(signal.SIGTERM, timeout=40) == 0
    took = time.monotonic() - asked
    print(f"\nFIGURES SIGTERM, grace 20 s: exit 0 after {took:.1f} s")
    assert took < 20 + 3
    # The trickled downloads (about 8 s) fit in the grace period: they were finished, not cut.
    assert events(daemon, "sweep.handed_back") == []
    assert states(sqlite_url) == dict.fromkeys(request_ids, "downloaded")
    _nothing_held_or_half_written(sqlite_url, output_dir)
    assert_files(output_dir, expected_files(request_ids, small=16384))
    assert_downloaded_once(assert_consistent_history(sqlite_url))


def test_sigterm_hands_back_what_the_grace_cannot_cover(
    sqlite_url: str,
    tmp_path: Path,
    fake_api: Callable[..., FakeApi],
    launch: DaemonLauncher,
) -> None:
    env, daemon, request_ids, output_dir = _start_slow_downloads(
        sqlite_url, tmp_path, fake_api, launch, TRACKER_SHUTDOWN_GRACE="2"
    )
    asked = time.monotonic()
    assert daemon.stop(signal.SIGTERM, timeout=20) == 0
    took = time.monotonic() - asked
    print(f"\nFIGURES SIGTERM, grace 2 s: exit 0 after {took:.1f} s")
    # Work went on for the grace period, then what was left was handed back.
    assert 1.5 < took < 2 + 3
    assert events(daemon, "sweep.handed_back")
    _nothing_held_or_half_written(sqlite_url, output_dir)

    successor = launch(env)
    wait_all_downloaded(sqlite_url, len(request_ids), 60)
    assert successor.stop(signal.SIGTERM) == 0
    assert_files(output_dir, expected_files(request_ids, small=16384))
    assert_downloaded_once(assert_consistent_history(sqlite_url))


def test_second_sigterm_cuts_work_short(
    sqlite_url: str,
    tmp_path: Path,
    fake_api: Callable[..., FakeApi],
    launch: DaemonLauncher,
) -> None:
    env, daemon, request_ids, output_dir = _start_slow_downloads(
        sqlite_url, tmp_path, fake_api, launch, TRACKER_SHUTDOWN_GRACE="30"
    )
    asked = time.monotonic()
    daemon.process.send_signal(signal.SIGTERM)
    time.sleep(0.2)  # an impatient operator, or a supervisor's stop sequence
    daemon.process.send_signal(signal.SIGTERM)
    code = daemon.process.wait(timeout=30)
    took = time.monotonic() - asked
    print(f"\nFIGURES double SIGTERM: exit {code} after {took:.1f} s (grace 30 s)")
    assert took < 5
    # Death by the second SIGTERM during the last teardown steps counts as clean too (systemd
    # treats SIGTERM as a clean exit status); anything else is not.
    assert code in (0, -signal.SIGTERM)
    _nothing_held_or_half_written(sqlite_url, output_dir)

    successor = launch(env)
    wait_all_downloaded(sqlite_url, len(request_ids), 60)
    assert successor.stop(signal.SIGTERM) == 0
    assert_files(output_dir, expected_files(request_ids, small=16384))
    assert_downloaded_once(assert_consistent_history(sqlite_url))
