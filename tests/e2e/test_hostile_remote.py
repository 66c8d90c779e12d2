"""A hostile or broken remote end, for real: `tracker run` against `tracker fake-api`.

Issue 10: status answers of 64 MiB or gzip bombs (defect 2), output files bigger than
TRACKER_MAX_FILE_SIZE or that never end (defect 3), files whose bytes disagree with
their MD5 ETag, and bodies with no framing that simply stop (defect 4). Each hostile
batch sits beside good ones, which must be downloaded as if nothing were wrong.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.faults import DaemonLauncher, events, part_files, sim_stats
from tests.e2e.support import FakeApi, batch_rows, raw_insert, tracker_env, wait_until
from tracker.simulator import SimulatorConfig, expected_sha256

pytestmark = pytest.mark.e2e

SMALL = SimulatorConfig().file_size
# The daemon's peak resident set must stay under this while it refuses hostile answers
# (about 60-70 MiB of it is the interpreter, SQLAlchemy, aiohttp and the rest at rest).
PEAK_RSS_LIMIT = 200 << 20


def hostile_env(database_url: str, api_url: str, output_dir: Path, **extra: str) -> dict[str, str]:
    # A day budget so large that polling paces itself by the (sub-second) intervals.
    extra.setdefault("TRACKER_RATE_PER_DAY", "10000000")
    return tracker_env(database_url, api_url, output_dir, **extra)


def tag() -> str:
    return uuid.uuid4().hex[:8]


def peak_rss(pid: int) -> int:
    """VmHWM: the process's peak resident set since it started, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


def downloaded(database_url: str, request_ids: list[str]) -> bool:
    rows = batch_rows(database_url)
    return all(rows.get(rid, {}).get("state") == "downloaded" for rid in request_ids)


def assert_files(output_dir: Path, database_url: str, request_ids: list[str], size: int) -> None:
    rows = batch_rows(database_url)
    for request_id in request_ids:
        path = output_dir / f"{request_id}.csv"
        assert path.stat().st_size == size, request_id
        assert rows[request_id]["file_sha256"] == expected_sha256(request_id, size), request_id


# --------------------------------------------------------------------------- defect 2


def test_huge_and_gzip_bomb_status_answers_are_refused_in_bounded_memory(
    e2e_database_url: str, fake_api: Callable[..., FakeApi], launch: DaemonLauncher, tmp_path: Path
) -> None:
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc to read the daemon's peak RSS")
    api = fake_api("--completion-delay", "0.5")
    output_dir = tmp_path / "out"
    run = tag()
    good = [f"ok-{run}-{i}" for i in range(8)]
    hostile = [f"huge-{run}-{i}" for i in range(2)] + [f"gzipbomb-{run}-{i}" for i in range(2)]
    daemon = launch(hostile_env(e2e_database_url, api.url, output_dir))
    daemon.wait_started()
    started = time.monotonic()
    raw_insert(e2e_database_url, good[:4] + hostile + good[4:])

    wait_until(lambda: downloaded(e2e_database_url, good), 60, "the good batches downloaded")
    took = time.monotonic() - started

    def refused_repeatedly() -> bool:
        rows = batch_rows(e2e_database_url)
        return all(
            rows[rid]["faults"] >= 3 and "too large" in (rows[rid]["last_error"] or "")
            for rid in hostile
        )

    wait_until(refused_repeatedly, 60, "every hostile answer refused three times")
    peak = peak_rss(daemon.process.pid)
    calls = sim_stats(api)["status_calls"]
    hostile_calls = sum(calls.get(rid, 0) for rid in hostile)
    print(
        f"FIGURES hostile status answers ({e2e_database_url.split(':')[0]}): daemon peak RSS "
        f"(VmHWM) {peak / 2**20:.1f} MiB after {hostile_calls} answers of 64 MiB or "
        f"gzip bombs of 256 MiB; {len(good)} good batches downloaded in {took:.1f} s"
    )
    assert daemon.stop() == 0
    assert peak < PEAK_RSS_LIMIT
    # Good batches complete 0.5 s after their first check: a few sweeps, not a stall.
    assert took < 20
    rows = batch_rows(e2e_database_url)
    for request_id in hostile:
        row = rows[request_id]
        assert row["state"] in ("pending", "processing"), row
        assert "status answer too large" in row["last_error"], row
        assert str(1 << 20) in row["last_error"], row
    assert_files(output_dir, e2e_database_url, good, SMALL)


# --------------------------------------------------------------------------- defect 3


def test_files_above_the_size_limit_stay_ready_and_leave_nothing(
    e2e_database_url: str, fake_api: Callable[..., FakeApi], launch: DaemonLauncher, tmp_path: Path
) -> None:
    api = fake_api("--completion-delay", "0.3", "--big-file-size", str(1 << 20))
    output_dir = tmp_path / "out"
    run = tag()
    good = [f"ok-{run}-{i}" for i in range(4)]
    too_big = [f"big-{run}-{i}" for i in range(2)] + [f"endless-{run}"]
    env = hostile_env(e2e_database_url, api.url, output_dir, TRACKER_MAX_FILE_SIZE="64k")
    daemon = launch(env)
    daemon.wait_started()
    raw_insert(e2e_database_url, too_big + good)

    wait_until(lambda: downloaded(e2e_database_url, good), 60, "the good batches downloaded")

    def refused_twice() -> bool:
        rows = batch_rows(e2e_database_url)
        return all(rows[rid]["faults"] >= 2 for rid in too_big)

    wait_until(refused_twice, 60, "each file too big refused twice")
    assert daemon.stop() == 0
    rows = batch_rows(e2e_database_url)
    for request_id in too_big:
        row = rows[request_id]
        assert row["state"] == "ready", row
        assert row["download_attempts"] == 0, row  # not the batch's fault: never counted
        assert "TRACKER_MAX_FILE_SIZE" in row["last_error"], row
        assert str(64 * 1024) in row["last_error"], row
    assert "announced" in rows[too_big[0]]["last_error"]  # by Content-Length, no byte read
    assert "grew past" in rows[f"endless-{run}"]["last_error"]
    assert part_files(output_dir) == []
    assert sorted(p.name for p in output_dir.iterdir()) == sorted(f"{rid}.csv" for rid in good)
    assert_files(output_dir, e2e_database_url, good, SMALL)


# --------------------------------------------------------------------------- defect 4


def test_checksum_mismatches_fail_and_unframed_bodies_publish_only_when_confirmed(
    e2e_database_url: str, fake_api: Callable[..., FakeApi], launch: DaemonLauncher, tmp_path: Path
) -> None:
    api = fake_api("--completion-delay", "0.3")
    output_dir = tmp_path / "out"
    run = tag()
    good = [f"ok-{run}-{i}" for i in range(3)]
    unframed = [f"unframed-{run}-{i}" for i in range(6)]
    never = [f"badetag-{run}", f"unframed-noetag-{run}"]
    daemon = launch(hostile_env(e2e_database_url, api.url, output_dir))
    daemon.wait_started()
    raw_insert(e2e_database_url, never + unframed + good)

    wait_until(
        lambda: downloaded(e2e_database_url, good + unframed), 60, "good and unframed downloaded"
    )

    def all_failed() -> bool:
        rows = batch_rows(e2e_database_url)
        return all(rows[rid]["state"] == "failed" for rid in never)

    wait_until(all_failed, 90, "the unverifiable files failed")
    assert daemon.stop() == 0
    rows = batch_rows(e2e_database_url)
    bad, unconfirmed = (rows[rid] for rid in never)
    assert bad["download_attempts"] == 5, bad
    assert "checksum mismatch" in bad["last_error"], bad
    assert "after 5 attempts" in bad["last_error"], bad
    assert unconfirmed["download_attempts"] == 5, unconfirmed
    assert "nothing confirms" in unconfirmed["last_error"], unconfirmed
    assert part_files(output_dir) == []
    published = sorted(p.name for p in output_dir.iterdir())
    assert published == sorted(f"{rid}.csv" for rid in good + unframed)
    assert_files(output_dir, e2e_database_url, good + unframed, SMALL)
    # Some unframed bodies stopped early and were resumed from where they stopped.
    resumed = [
        request
        for request in sim_stats(api)["downloads"]
        if "unframed" in request["path"] and "range" in request["headers"]
    ]
    assert resumed


# --------------------------------------------------------------------------- not HTTP


def test_a_status_answer_that_is_not_http_is_a_fault_not_a_crashed_worker(
    e2e_database_url: str, fake_api: Callable[..., FakeApi], launch: DaemonLauncher, tmp_path: Path
) -> None:
    # The API client's bridge let aiohttp's "bad status line" error out unmapped: the
    # worker crashed and the batch stayed leased for the whole TRACKER_LEASE_DURATION.
    api = fake_api("--completion-delay", "0.3")
    output_dir = tmp_path / "out"
    run = tag()
    good, not_http = f"ok-{run}", f"nothttp-{run}"
    daemon = launch(
        hostile_env(e2e_database_url, api.url, output_dir, TRACKER_LEASE_DURATION="300")
    )
    daemon.wait_started()
    raw_insert(e2e_database_url, [not_http, good])

    wait_until(
        lambda: downloaded(e2e_database_url, [good, not_http]),
        45,
        "both batches downloaded, the one answered twice in something other than HTTP too",
    )
    assert sim_stats(api)["status_calls"][not_http] >= 3
    assert events(daemon, "sweep.worker_crashed") == []
    assert daemon.stop() == 0
    assert_files(output_dir, e2e_database_url, [good, not_http], SMALL)
