"""Stale download temp files are removed: by the daemon at start, and by `prune --files`."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.faults import DaemonLauncher, part_files, wait_for_part_file
from tests.e2e.support import (
    FakeApi,
    migrate,
    plain_env,
    raw_insert,
    run_tracker,
    states,
    tracker_env,
    wait_until,
)

pytestmark = pytest.mark.e2e


def test_a_crash_then_a_cancel_leaves_no_partial_file_behind(
    e2e_database_url: str,
    tmp_path: Path,
    fake_api: Callable[..., FakeApi],
    launch: DaemonLauncher,
) -> None:
    api = fake_api()
    output_dir = tmp_path / "out"
    env = tracker_env(e2e_database_url, api.url, output_dir, TRACKER_RATE_PER_DAY="10000000")
    request_id = f"trickle-{uuid.uuid4().hex[:8]}"
    crashed = launch(env)
    crashed.wait_started()
    raw_insert(e2e_database_url, [request_id])
    part = wait_for_part_file(output_dir, 30)
    assert part.startswith(f".{request_id}.")
    crashed.process.kill()  # kill -9 mid-download: the temp file stays
    crashed.process.wait(timeout=10)
    assert part_files(output_dir) == [part]

    cancelled = run_tracker(env, "cancel", request_id)
    assert cancelled.returncode == 0, cancelled.stderr
    assert states(e2e_database_url) == {request_id: "cancelled"}
    # The batch is final: no download will ever remove the partial KYC data. A daemon
    # whose download deadline it has outlived does.
    time.sleep(2.5)
    assert (output_dir / part).exists()
    restarted = launch(env | {"TRACKER_DOWNLOAD_DEADLINE": "2"})
    restarted.wait_started()
    wait_until(lambda: not (output_dir / part).exists(), 20, "the stale temp file to go")
    assert restarted.stop() == 0
    removed = [e for e in restarted.log_lines() if e["event"] == "leftovers.removed"]
    assert [(e["request_id"], e["file"]) for e in removed] == [(request_id, part)]


def test_prune_files_removes_old_temp_files_and_keeps_young_ones(
    sqlite_url: str, tmp_path: Path
) -> None:
    migrate(sqlite_url)
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    old, young = output_dir / ".gone1.csv.ab12.part", output_dir / ".busy1.csv.cd34.part"
    published = output_dir / "gone0.csv"
    for path in (old, young, published):
        path.write_bytes(b"partial KYC data")
    then = time.time() - 2 * 3600
    os.utime(old, (then, then))
    os.utime(published, (then, then))
    env = plain_env(sqlite_url, TRACKER_OUTPUT_DIR=str(output_dir))
    pruned = run_tracker(env, "prune", "--older-than", "30d", "--files")
    assert pruned.returncode == 0, pruned.stderr
    assert "1 stale temp files removed" in pruned.stdout
    assert sorted(p.name for p in output_dir.iterdir()) == sorted([young.name, published.name])
    # Without --files, nothing on disk is touched.
    os.utime(young, (then, then))
    kept = run_tracker(env, "prune", "--older-than", "30d")
    assert kept.returncode == 0 and young.exists()
