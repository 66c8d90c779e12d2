"""`tracker run` as a subprocess against `tracker fake-api`, enqueued by raw SQL."""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.e2e.support import (
    Daemon,
    FakeApi,
    assert_consistent_history,
    assert_files,
    raw_insert,
    states,
    tracker_env,
    wait_until,
)
from tracker.db import create_engine_for
from tracker.simulator import SimulatorConfig, expected_sha256

pytestmark = pytest.mark.e2e

FINAL = {"downloaded", "failed", "rejected", "expired", "cancelled"}


def test_every_outcome_end_to_end(
    e2e_database_url: str,
    tmp_path: Path,
    fake_api: Callable[..., FakeApi],
    run_daemon: Callable[[dict[str, str]], Daemon],
) -> None:
    api = fake_api("--completion-delay", "0.5")
    output_dir = tmp_path / "out"
    env = tracker_env(e2e_database_url, api.url, output_dir, TRACKER_MAX_AGE="3600")
    daemon = run_daemon(env)
    tag = uuid.uuid4().hex[:8]
    plain = [uuid.uuid4().hex for _ in range(3)]
    expected_state = {request_id: "downloaded" for request_id in plain}
    expected_state |= {
        f"xlsx-{tag}": "downloaded",
        f"flaky-{tag}": "downloaded",
        f"garbage-{tag}": "downloaded",
        f"trunc-{tag}": "downloaded",
        f"expire-{tag}": "downloaded",
        f"fail-{tag}": "failed",
        f"invalid-{tag}": "rejected",
        "../../etc/passwd": "rejected",
        "x'; DROP TABLE tracker_batches; --": "rejected",
    }
    daemon.wait_started()
    raw_insert(e2e_database_url, list(expected_state))
    old = f"old-{tag}"
    engine = create_engine_for(e2e_database_url)
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO tracker_batches (request_id, created_at) VALUES (:rid, '2020-01-01 00:00:00')"
            ),
            {"rid": old},
        )
    engine.dispose()
    expected_state[old] = "expired"

    wait_until(
        lambda: (
            set(states(e2e_database_url).values()) <= FINAL
            and len(states(e2e_database_url)) == len(expected_state)
        ),
        90,
        "every batch to become final",
    )
    assert daemon.stop(signal.SIGTERM) == 0
    assert states(e2e_database_url) == expected_state

    size = SimulatorConfig().file_size
    assert_files(
        output_dir,
        {
            (f"{rid}.xlsx" if rid.startswith("xlsx-") else f"{rid}.csv"): (
                expected_sha256(rid, size),
                size,
            )
            for rid, state in expected_state.items()
            if state == "downloaded"
        },
    )
    chains = assert_consistent_history(e2e_database_url)
    assert chains[f"trunc-{tag}"][-2:] == [("processing", "ready"), ("ready", "downloaded")]
    assert chains["../../etc/passwd"] == [("pending", "rejected")]

    lines = daemon.log_lines()  # every line parsed as JSON, or this raises
    events = {line["event"] for line in lines}
    assert {"daemon.started", "batch.transition", "download.done", "daemon.stopped"} <= events
    log_text = daemon.log_path.read_text()
    assert "demo-secret" not in log_text
    assert "X-Amz-Signature" not in log_text
    # The file host never saw the API's credentials.
    for download in api.stats()["downloads"]:  # type: ignore[union-attr]
        headers = {name.lower() for name in download["headers"]}
        assert not headers & {"authorization", "x-api-key", "client-id"}


def test_sigkill_mid_download_then_restart_loses_and_duplicates_nothing(
    e2e_database_url: str,
    tmp_path: Path,
    fake_api: Callable[..., FakeApi],
    run_daemon: Callable[[dict[str, str]], Daemon],
) -> None:
    big = 24 << 20
    api = fake_api("--completion-delay", "0.3", "--big-file-size", str(big))
    output_dir = tmp_path / "out"
    env = tracker_env(
        e2e_database_url, api.url, output_dir, TRACKER_LEASE_DURATION="3", TRACKER_CONCURRENCY="4"
    )
    request_ids = [f"big-{uuid.uuid4().hex[:10]}" for _ in range(6)] + [
        uuid.uuid4().hex for _ in range(6)
    ]
    first = run_daemon(env)
    first.wait_started()
    raw_insert(e2e_database_url, request_ids)
    # Kill it while output is being written.
    wait_until(
        lambda: any(p.name.endswith(".part") for p in output_dir.glob(".*")), 60, "a download"
    )
    first.stop(signal.SIGKILL)
    killed_during = sorted(p.name for p in output_dir.glob(".*.part"))
    assert killed_during, "the kill should have interrupted a download"

    second = run_daemon(env)
    wait_until(
        lambda: set(states(e2e_database_url).values()) == {"downloaded"},
        120,
        "every batch downloaded",
    )
    assert second.stop(signal.SIGTERM) == 0
    assert_files(
        output_dir,
        {
            f"{rid}.csv": (
                expected_sha256(rid, big if rid.startswith("big-") else 4096),
                big if rid.startswith("big-") else 4096,
            )
            for rid in request_ids
        },
    )
    chains = assert_consistent_history(e2e_database_url)
    for rid in request_ids:
        assert chains[rid][-1] == ("ready", "downloaded"), chains[rid]
        assert sum(1 for _, to_state in chains[rid] if to_state == "downloaded") == 1


def test_sigterm_stops_promptly_with_exit_zero(
    e2e_database_url: str,
    tmp_path: Path,
    fake_api: Callable[..., FakeApi],
    run_daemon: Callable[[dict[str, str]], Daemon],
) -> None:
    api = fake_api("--completion-delay", "60")
    env = tracker_env(e2e_database_url, api.url, tmp_path / "out")
    daemon = run_daemon(env)
    daemon.wait_started()
    raw_insert(e2e_database_url, [uuid.uuid4().hex for _ in range(5)])
    wait_until(lambda: "processing" in states(e2e_database_url).values(), 30, "a first check")
    started = time.monotonic()
    assert daemon.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 10
    engine = create_engine_for(e2e_database_url)
    with engine.begin() as connection:
        leased = connection.execute(
            sa.text("SELECT count(*) FROM tracker_batches WHERE lease_owner IS NOT NULL")
        ).scalar_one()
    engine.dispose()
    assert leased == 0
