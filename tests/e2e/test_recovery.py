"""Recovery without waiting out leases, and an idle daemon that stays idle (issue 9, 1 and 2).

Real `tracker run` subprocesses against `tracker fake-api` over loopback, batches enqueued
by raw SQL. The lease keeps its default (TRACKER_LEASE_DURATION, 300 s) throughout: a
crashed or silent instance's batches must come back through the instances' heartbeats
(TRACKER_HEARTBEAT_TIMEOUT, stamped by the database) or, for a dead predecessor on the same
host, at the start of its successor, never by waiting out the lease.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.faults import (
    TRICKLED,
    DaemonLauncher,
    events,
    fault_env,
    fetching,
    part_files,
    sim_stats,
    wait_for_lost_ownership,
    wait_for_part_file,
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
    tracker_env,
    wait_all_downloaded,
    wait_until,
)

pytestmark = pytest.mark.e2e

# The default TRACKER_HEARTBEAT_TIMEOUT; heartbeats go out three times per timeout.
DEFAULT_HEARTBEAT_TIMEOUT = 30.0


def leased(database_url: str) -> list[tuple[str, str, str]]:
    """(request_id, state, lease_owner) of every batch that holds a lease."""
    rows = query(
        database_url,
        "SELECT request_id, state, lease_owner FROM tracker_batches "
        "WHERE lease_owner IS NOT NULL ORDER BY request_id",
    )
    return [(row.request_id, row.state, row.lease_owner) for row in rows]


# --------------------------------------------------------------------------- 1. crashes


def test_sigkill_then_restart_resumes_within_seconds(
    e2e_database_url: str,
    tmp_path: Path,
    fake_api: Callable[..., FakeApi],
    launch: DaemonLauncher,
) -> None:
    """kill -9 mid-download, restart at once: the successor takes the dead one's batches.

    The successor runs on the same host as its dead predecessor, whose pid is gone, so it
    may free those leases as it starts: no lease (300 s) nor heartbeat timeout (30 s) to
    wait for.
    """
    # Trickled files (8 KiB at 2 KiB/s, about 4 s) keep a download in flight long enough
    # for the kill to land mid-download every time; big files are in flight beside them.
    api = fake_api(
        "--completion-delay", "1", "--big-file-size", str(BIG), "--file-size", str(TRICKLED)
    )
    output_dir = tmp_path / "out"
    env = fault_env(e2e_database_url, api.url, output_dir)
    assert "TRACKER_LEASE_DURATION" not in env  # the default lease: 300 s
    run = tag()
    trickled = [f"trickle-{run}-{i}" for i in range(2)]
    request_ids = (
        trickled + [f"big-{run}-{i}" for i in range(4)] + [f"{run}{i:02d}" for i in range(10)]
    )
    daemon = launch(env)
    daemon.wait_started()
    raw_insert(e2e_database_url, request_ids)
    wait_until_downloading(api, output_dir, trickled)

    daemon.process.kill()
    daemon.process.wait(timeout=10)
    stranded = leased(e2e_database_url)
    # What the restart has to take over: the dead instance's leases (a download in flight
    # at least), which on their own would last TRACKER_LEASE_DURATION.
    assert any(state == "ready" for _, state, _ in stranded), stranded
    mid_download = len(part_files(output_dir))

    restarted = time.monotonic()
    successor = launch(env)
    try:
        wait_all_downloaded(e2e_database_url, len(request_ids), 30)
    finally:
        took = time.monotonic() - restarted
        done = sorted(states(e2e_database_url).values()).count("downloaded")
        print(
            f"\nFIGURES sigkill restart: {len(stranded)} batches leased by the killed instance "
            f"({mid_download} .part files); {done} of {len(request_ids)} downloaded "
            f"{took:.1f} s after the restart (bound 30 s; lease 300 s)"
        )
    successor.wait_started()
    assert successor.stop(signal.SIGTERM) == 0

    files = expected_files(request_ids, small=TRICKLED)
    assert_files(output_dir, files)  # exactly these, verified; the dead one's .part is gone
    assert_recorded_files(e2e_database_url, output_dir, files)
    assert_downloaded_once(assert_consistent_history(e2e_database_url))


def wait_until_downloading(api: FakeApi, output_dir: Path, trickled: list[str]) -> None:
    wait_for_part_file(output_dir, 30, min_bytes=0)
    wait_until(
        lambda: all(fetching(api, request_id) for request_id in trickled),
        30,
        "the trickled downloads to be under way",
    )


def temp_files_of(output_dir: Path, request_id: str) -> list[str]:
    return [name for name in part_files(output_dir) if name.startswith(f".{request_id}.")]


def stop_outside_transactions(database_url: str, daemon: Daemon) -> None:
    """SIGSTOP the daemon at a moment when none of its sessions is inside a transaction.

    A process stopped mid-transaction would hold its row locks (the quota row, its
    instance row) for as long as it stays stopped, and block everyone else: that is a
    different fault from the silent instance this is about.
    """
    for _ in range(50):
        daemon.process.send_signal(signal.SIGSTOP)
        time.sleep(0.1)  # a statement already sent completes meanwhile
        if not query(database_url, _IN_TRANSACTION)[0][0]:
            return
        daemon.process.send_signal(signal.SIGCONT)
        time.sleep(0.05)
    raise AssertionError("the daemon was inside a transaction at every try")


_IN_TRANSACTION = (
    "SELECT count(*) FROM pg_stat_activity "
    "WHERE datname = current_database() AND pid <> pg_backend_pid() AND xact_start IS NOT NULL"
)


@pytest.mark.postgres
def test_silent_instance_loses_its_batches_after_the_heartbeat_timeout(
    pg_url: str,
    tmp_path: Path,
    fake_api: Callable[..., FakeApi],
    launch: DaemonLauncher,
) -> None:
    """A stopped (not dead) instance's batches go to another after TRACKER_HEARTBEAT_TIMEOUT.

    Both instances run on this host and A's pid stays alive (SIGSTOP): only its silence
    can free its batches. Woken up afterwards, A writes nothing over B's results.
    """
    api = fake_api("--completion-delay", "0.2", "--file-size", str(TRICKLED))
    output_dir = tmp_path / "out"
    env = fault_env(pg_url, api.url, output_dir, TRACKER_HEARTBEAT_TIMEOUT="5")
    assert "TRACKER_LEASE_DURATION" not in env  # the default lease: 300 s
    run = tag()
    trickled = f"trickle-{run}"
    request_ids = [trickled] + [f"{run}{i:02d}" for i in range(3)]
    paused = launch(env)
    paused.wait_started()
    raw_insert(pg_url, request_ids)
    # A trickled body may be buffered in memory before it reaches the temp file, so the
    # file host's record of the GET says the download is under way. Its bytes keep
    # arriving in the socket buffer while the process is stopped.
    wait_until(lambda: bool(temp_files_of(output_dir, trickled)), 30, "A's temp file")
    wait_until(lambda: fetching(api, trickled), 10, "the file host to see the download")
    stop_outside_transactions(pg_url, paused)
    stopped = time.monotonic()
    [part] = temp_files_of(output_dir, trickled)
    paused_inode = (output_dir / part).stat().st_ino
    # A holds the lease of the file it is fetching; nothing but A's silence can free it.
    assert batch_rows(pg_url)[trickled]["lease_owner"] is not None

    taker = launch(env)
    try:
        wait_all_downloaded(pg_url, len(request_ids), 25)
    finally:
        took = time.monotonic() - stopped
        done = sorted(states(pg_url).values()).count("downloaded")
        print(
            f"\nFIGURES silent instance: {done} of {len(request_ids)} downloaded {took:.1f} s "
            "after SIGSTOP (heartbeat timeout 5 s, bound 25 s; lease 300 s)"
        )
    taker.wait_started()

    rows_before = batch_rows(pg_url)
    history_before = query(pg_url, "SELECT * FROM tracker_transitions ORDER BY id")
    final = output_dir / f"{trickled}.csv"
    file_before = final.stat()
    assert file_before.st_ino != paused_inode  # the taker's own download was published
    paused.process.send_signal(signal.SIGCONT)
    wait_for_lost_ownership(paused)
    assert paused.process.poll() is None, "the woken instance must keep running"
    for daemon in (paused, taker):
        assert daemon.stop(signal.SIGTERM) == 0

    assert batch_rows(pg_url) == rows_before
    assert query(pg_url, "SELECT * FROM tracker_transitions ORDER BY id") == history_before
    file_after = final.stat()
    assert (file_after.st_ino, file_after.st_mtime_ns) == (
        file_before.st_ino,
        file_before.st_mtime_ns,
    )
    assert_files(output_dir, expected_files(request_ids, small=TRICKLED))
    assert_downloaded_once(assert_consistent_history(pg_url))
    assert events(taker, "batch.conflict") == []
    assert events(taker, "download.ownership_lost") == []


# --------------------------------------------------------------------------- 2. idle


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all its threads, from /proc/<pid>/stat."""
    # The command name (field 2) may hold spaces; the fields after it start at 3 (state).
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime = int(fields[14 - 3]), int(fields[15 - 3])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


_TRACKER_TABLES = (
    "tracker_batches",
    "tracker_transitions",
    "tracker_quota_usage",
    "tracker_quota_state",
    "tracker_instances",
)


def log_writes(database_url: str) -> None:
    """Record every row written to the tracker's tables, as it is written.

    pg_stat_user_tables would do too, but a backend that committed less than a second
    after its last stats flush may hold its counts back for up to 10 s (PostgreSQL 15's
    PGSTAT_IDLE_INTERVAL): a row trigger counts exactly, and at the database's time.
    """
    execute(
        database_url,
        "CREATE TABLE test_write_log (table_name text NOT NULL, op text NOT NULL, "
        "at timestamptz NOT NULL DEFAULT clock_timestamp())",
    )
    execute(
        database_url,
        "CREATE FUNCTION test_log_write() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "INSERT INTO test_write_log (table_name, op) VALUES (TG_TABLE_NAME, TG_OP); "
        "RETURN NULL; END $$",
    )
    for table in _TRACKER_TABLES:
        execute(
            database_url,
            f"CREATE TRIGGER test_log_write AFTER INSERT OR UPDATE OR DELETE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION test_log_write()",
        )


def db_now(database_url: str) -> object:
    return query(database_url, "SELECT clock_timestamp()")[0][0]


def writes_between(database_url: str, since: object, until: object) -> dict[str, int]:
    rows = query(
        database_url,
        "SELECT table_name, count(*) AS written FROM test_write_log WHERE at >= :since AND at < :until "
        "GROUP BY table_name",
        since=since,
        until=until,
    )
    counts = dict.fromkeys(_TRACKER_TABLES, 0)
    counts.update({row.table_name: int(row.written) for row in rows})
    return counts


@pytest.mark.postgres
@pytest.mark.parametrize("sweep_interval", ["0.3", "default"])
def test_daemon_that_can_claim_nothing_stays_idle(
    pg_url: str,
    tmp_path: Path,
    fake_api: Callable[..., FakeApi],
    launch: DaemonLauncher,
    sweep_interval: str,
) -> None:
    """A due batch leased elsewhere for an hour: the daemon waits, it does not spin.

    The owner is in no tracker_instances row (no heartbeat of its own to go stale), so no
    instance may free its lease. The daemon may write its heartbeat, and nothing else: no
    call permit reserved and given back, no sweep stamp for every pass. The wake-up timer,
    not the sweep interval, is what spun, so both the tests' 0.3 s and the default (5 s)
    interval are watched.
    """
    api = fake_api("--completion-delay", "0")
    env = tracker_env(pg_url, api.url, tmp_path / "out")
    if sweep_interval == "default":
        del env["TRACKER_SWEEP_INTERVAL"]
    assert "TRACKER_HEARTBEAT_TIMEOUT" not in env
    request_id = f"elsewhere-{tag()}"
    raw_insert(pg_url, [request_id])
    assert (
        execute(
            pg_url,
            "UPDATE tracker_batches SET next_check_at = now() - interval '1 minute', "
            "lease_owner = 'otherhost:1:deadbeef', lease_token = lease_token + 1, "
            "lease_expires_at = now() + interval '1 hour' WHERE request_id = :rid",
            rid=request_id,
        )
        == 1
    )
    row_before = batch_rows(pg_url)[request_id]
    log_writes(pg_url)
    daemon = launch(env)
    daemon.wait_started()
    time.sleep(1.5)  # past the start-up writes (registration, first sweep)

    pid = daemon.process.pid
    cpu_before, wall_before, since = cpu_seconds(pid), time.monotonic(), db_now(pg_url)
    time.sleep(10)
    cpu_after, wall_after, until = cpu_seconds(pid), time.monotonic(), db_now(pg_url)
    wall = wall_after - wall_before
    cpu_share = (cpu_after - cpu_before) / wall
    writes = writes_between(pg_url, since, until)
    status_calls = sim_stats(api)["status_calls_total"]
    heartbeats = int(wall / (DEFAULT_HEARTBEAT_TIMEOUT / 3)) + 2
    print(
        f"\nFIGURES idle daemon (sweep interval {sweep_interval}): over {wall:.1f} s, "
        f"CPU {cpu_after - cpu_before:.2f} s ({cpu_share:.1%}), "
        f"writes quota_usage {writes['tracker_quota_usage']}, "
        f"instances {writes['tracker_instances']} (bound {heartbeats}), "
        f"quota_state {writes['tracker_quota_state']}, batches {writes['tracker_batches']}, "
        f"transitions {writes['tracker_transitions']}; {status_calls} status calls"
    )
    assert daemon.process.poll() is None
    assert writes["tracker_quota_usage"] == 0, writes
    assert writes["tracker_instances"] <= heartbeats, writes
    others = ("tracker_batches", "tracker_transitions", "tracker_quota_state")
    assert {name: writes[name] for name in others} == dict.fromkeys(others, 0), writes
    assert status_calls == 0
    assert cpu_share < 0.10
    assert daemon.stop(signal.SIGTERM) == 0
    # The other owner's lease was respected.
    assert batch_rows(pg_url)[request_id] == row_before
