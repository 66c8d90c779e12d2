"""Host clocks that disagree (issue 9, 3): leases and due times follow the database's clock.

Two `tracker run` instances share one PostgreSQL; one of them runs ten minutes fast
(libfaketime preloaded into it, the monotonic clock left alone). Were leases and due times
stamped and compared on each host's own clock, the fast host would see every lease of the
other as long expired and take each batch over at once: the same batch polled by both at
the same moment, its file fetched twice, the slower host's temp file removed under it.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.conftest import IN_CI
from tests.e2e.faults import DaemonLauncher, events, fault_env, fetching, full_downloads, sim_stats
from tests.e2e.support import (
    BIG,
    FakeApi,
    assert_consistent_history,
    assert_downloaded_once,
    assert_files,
    assert_recorded_files,
    batch_rows,
    expected_files,
    raw_insert,
    states,
    tag,
    wait_all_downloaded,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

SKEW = 600  # seconds the fast host's clock is ahead
TRICKLED = 24576  # bytes: about 12 s at the simulator's 2 KiB/s


@pytest.fixture
def fast_clock() -> dict[str, str]:
    """The environment that puts a process's wall clock SKEW seconds ahead."""
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1"))
    if not found:
        message = "libfaketime is not installed (apt-get install libfaketime)"
        if IN_CI:
            pytest.fail(f"{message}; CI must run the clock tests")
        pytest.skip(message)
    # Started directly, not through the `faketime` wrapper, which does not pass signals on.
    # The monotonic clock stays true, as on a host whose wall clock is merely set wrong.
    return {
        "LD_PRELOAD": found[0],
        "FAKETIME": f"+{SKEW}s",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }


def measured_skew(clock_env: dict[str, str]) -> float:
    """How far ahead time.time() is in a process started with `clock_env`."""
    before = time.time()
    shown = subprocess.run(
        [sys.executable, "-c", "import time; print(time.time())"],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **clock_env},
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    after = time.time()
    return float(shown) - (before + after) / 2


def test_a_fast_clock_takes_nothing_over_and_polls_nothing_twice(
    pg_url: str,
    tmp_path: Path,
    fake_api: Callable[..., FakeApi],
    launch: DaemonLauncher,
    fast_clock: dict[str, str],
) -> None:
    skew = measured_skew(fast_clock)
    assert SKEW - 5 < skew < SKEW + 5, f"libfaketime did not shift the clock: {skew:.1f} s"
    # Status calls take a while (overlaps would show); files take a while (a takeover of a
    # download would show): trickled ones about 12 s, big ones a few hundred ms.
    api = fake_api(
        "--latency",
        "0.2",
        "--completion-delay",
        "1",
        "--file-size",
        str(TRICKLED),
        "--big-file-size",
        str(BIG),
    )
    output_dir = tmp_path / "out"  # shared by both, as on one host or a shared volume
    # A lease far shorter than the skew: to the fast host, every lease the other one takes
    # has run out long ago.
    env = fault_env(pg_url, api.url, output_dir, TRACKER_LEASE_DURATION="30")
    run = tag()
    trickled = [f"trickle-{run}-{i}" for i in range(2)]
    # slow- batches (five times the completion delay) are still being polled, every call
    # under a lease, when the fast host joins: many more of them than the first host's
    # worker slots, so that its slots are busy with status calls all the while.
    first_wave = (
        trickled
        + [f"big-{run}-{i}" for i in range(2)]
        + [f"slow-{run}-{i}" for i in range(12)]
        + [f"{run}a{i}" for i in range(2)]
    )
    second_wave = [f"big-{run}-2"] + [f"{run}b{i}" for i in range(9)]
    request_ids = first_wave + second_wave

    # The host with the true clock starts first and takes the first wave.
    # Two worker slots; enough download slots that a found file never waits for one.
    slow = launch(env | {"TRACKER_CONCURRENCY": "2", "TRACKER_DOWNLOAD_CONCURRENCY": "8"})
    slow.wait_started()
    raw_insert(pg_url, first_wave)
    wait_until(
        lambda: all(fetching(api, request_id) for request_id in trickled),
        30,
        "the first host to be downloading the trickled files",
    )
    # The fast host joins while those downloads (and the first wave's checks) are leased.
    fast = launch(env | fast_clock)
    fast.wait_started()
    # The daemon itself runs ahead: its log stamps its start ten minutes from now.
    started_at = datetime.fromisoformat(str(events(fast, "daemon.started")[0]["timestamp"]))
    assert abs((started_at - datetime.now(UTC)).total_seconds() - SKEW) < 30, started_at
    # Then more work for both, once the fast host has looked at the first wave: new rows
    # come first in a claim, and would otherwise be all it took.
    time.sleep(2)
    raw_insert(pg_url, second_wave)
    started = time.monotonic()
    try:
        wait_all_downloaded(pg_url, len(request_ids), 60)
    finally:
        took = time.monotonic() - started
        done = sorted(states(pg_url).values()).count("downloaded")
        stats = sim_stats(api)
        fetched = full_downloads(stats)
        twice = {path: count for path, count in fetched.items() if count != 1}
        checks = {rid: row["checks"] for rid, row in batch_rows(pg_url).items()}
        uncounted = {
            rid: (calls, checks.get(rid))
            for rid, calls in stats["status_calls"].items()
            if calls != checks.get(rid)
        }
        daemons = {"slow": slow, "fast": fast}
        lost = {
            name: (len(events(d, "batch.conflict")), len(events(d, "download.ownership_lost")))
            for name, d in daemons.items()
        }
        worked = {name: len(events(d, "batch.transition")) for name, d in daemons.items()}
        print(
            f"\nFIGURES clocks: fast host +{skew:.0f} s; {done} of {len(request_ids)} downloaded "
            f"{took:.1f} s after the second wave; transitions {worked}; "
            f"(conflicts, ownership lost) {lost}; files fetched more than once {twice}; "
            f"overlapping status calls {stats.get('overlapping_status_calls', 'n/a')}; "
            f"status calls no write counted (calls, checks) {uncounted}"
        )
    for daemon in (slow, fast):
        assert daemon.stop(signal.SIGTERM) == 0

    # Each file fetched exactly once, by one instance; nothing left half-written.
    files = expected_files(request_ids, small=TRICKLED)
    assert fetched == {f"/upi-basic-batch-output-files/{name}": 1 for name in files}, twice
    assert_files(output_dir, files)
    assert_recorded_files(pg_url, output_dir, files)
    assert_downloaded_once(assert_consistent_history(pg_url))
    # Never two status calls for one batch at once, and every call a counted check.
    if "overlapping_status_calls" in stats:
        assert stats["overlapping_status_calls"] == 0, stats.get("overlapping_by_id")
    assert uncounted == {}
    assert lost == {"slow": (0, 0), "fast": (0, 0)}
