"""`tracker run` with its webhook listener on, against `tracker fake-api --webhook-url`.

Polling alone would take 30 s between checks here: a batch found within seconds of
completing was found by its webhook.
"""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.e2e.support import (
    Daemon,
    FakeApi,
    batch_rows,
    free_port,
    raw_insert,
    run_tracker,
    states,
    tracker_env,
    wait_all_downloaded,
    wait_until,
)

pytestmark = pytest.mark.e2e

SECRET = "e2e-" + uuid.uuid4().hex
COMPLETION_DELAY = 2.0


def _status_calls(api: FakeApi) -> dict[str, int]:
    calls: dict[str, int] = api.stats()["status_calls"]
    return calls


def test_webhooks_bring_checks_forward(
    e2e_database_url: str,
    tmp_path: Path,
    fake_api: Callable[..., FakeApi],
    run_daemon: Callable[[dict[str, str]], Daemon],
) -> None:
    port = free_port()
    hook = f"http://127.0.0.1:{port}/webhook/{SECRET}"
    api = fake_api("--completion-delay", str(COMPLETION_DELAY), "--webhook-url", hook)
    env = tracker_env(
        e2e_database_url,
        api.url,
        tmp_path / "out",
        TRACKER_POLL_MIN_INTERVAL="30",
        TRACKER_POLL_MAX_INTERVAL="30",
        TRACKER_WEBHOOK_ADDR=f"127.0.0.1:{port}",
        TRACKER_WEBHOOK_SECRET=SECRET,
        # A heartbeat a second: it carries the last delivery's time to `tracker status`.
        TRACKER_HEARTBEAT_TIMEOUT="3",
    )
    daemon = run_daemon(env)
    daemon.wait_started()
    wait_until(
        lambda: any(line.get("event") == "webhook.listening" for line in daemon.log_lines()),
        10,
        "the webhook listener",
    )

    # Each batch: one check at once, then its webhook brings the next one forward.
    batches = [uuid.uuid4().hex for _ in range(3)]
    started = time.monotonic()
    raw_insert(e2e_database_url, batches)
    wait_all_downloaded(e2e_database_url, len(batches), 20)
    assert time.monotonic() - started < COMPLETION_DELAY + 10  # polling alone: 30 s
    calls = _status_calls(api)
    assert all(1 <= calls.get(batch, 0) <= 3 for batch in batches), calls
    # `tracker show` marks the step whose check the webhook brought forward.
    for batch in batches:
        shown = run_tracker(env, "show", "--json", batch)
        assert shown.returncode == 0, shown.stderr
        steps = json.loads(shown.stdout)["transitions"]
        marked = [(t["from_state"], t["to_state"]) for t in steps if t["brought_forward"]]
        assert marked == [("processing", "ready")], steps
    text_view = run_tracker(env, "show", batches[0])
    assert "webhook" in text_view.stdout
    # `tracker status` tells when the last delivery came (with the next heartbeat).
    wait_until(
        lambda: json.loads(run_tracker(env, "status", "--json").stdout)["last_webhook_delivery"],
        10,
        "the last delivery in tracker status",
    )
    assert "last webhook delivery" in run_tracker(env, "status").stdout

    # A wrong secret: 404, and no row changes (a batch not yet complete is named).
    slow = f"slow-{uuid.uuid4().hex[:8]}"
    raw_insert(e2e_database_url, [slow])
    wait_until(lambda: slow in _status_calls(api), 10, "the slow batch's check")
    wait_until(
        lambda: batch_rows(e2e_database_url)[slow]["lease_owner"] is None,
        10,
        "the slow batch's first check to finish",
    )
    before = batch_rows(e2e_database_url)
    wrong = f"http://127.0.0.1:{port}/webhook/{SECRET[:-1]}x"
    answer = httpx.post(wrong, json={"request_id": slow}, timeout=10)
    assert answer.status_code == 404
    assert httpx.post(f"http://127.0.0.1:{port}/webhook/", timeout=10).status_code == 404
    assert batch_rows(e2e_database_url) == before

    # Many deliveries for a batch already downloaded: no status call.
    calls = _status_calls(api)
    with httpx.Client(timeout=10) as client:
        for _ in range(200):
            assert client.post(hook, json={"request_id": batches[0]}).status_code == 200
    time.sleep(1.0)
    after = _status_calls(api)
    assert {batch: after[batch] for batch in batches} == {batch: calls[batch] for batch in batches}
    assert states(e2e_database_url)[batches[0]] == "downloaded"

    assert daemon.stop(signal.SIGTERM) == 0
    text = daemon.log_path.read_text()
    assert "webhook.listening" in text
    assert "webhook.refused" in text
    assert not [line for line in text.splitlines() if SECRET in line]


def test_webhook_url_and_submit_with_it(
    sqlite_url: str,
    tmp_path: Path,
    fake_api: Callable[..., FakeApi],
    run_daemon: Callable[[dict[str, str]], Daemon],
) -> None:
    api = fake_api("--completion-delay", str(COMPLETION_DELAY))
    port = free_port()
    plain = tracker_env(sqlite_url, api.url, tmp_path / "out")
    unset = run_tracker(plain, "webhook-url")
    assert unset.returncode == 2
    assert len(unset.stderr.strip().splitlines()) == 1
    assert "TRACKER_WEBHOOK_PUBLIC_URL" in unset.stderr

    env = plain | {
        "TRACKER_POLL_MIN_INTERVAL": "30",
        "TRACKER_POLL_MAX_INTERVAL": "30",
        "TRACKER_WEBHOOK_ADDR": f"127.0.0.1:{port}",
        "TRACKER_WEBHOOK_SECRET": SECRET,
        "TRACKER_WEBHOOK_PUBLIC_URL": f"http://127.0.0.1:{port}/",
    }
    shown = run_tracker(env, "webhook-url")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == f"http://127.0.0.1:{port}/webhook/{SECRET}\n"

    daemon = run_daemon(env)
    daemon.wait_started()
    batch_file = tmp_path / "upi.csv"
    batch_file.write_text("vpa,name\nsomeone@upi,Someone\n")
    started = time.monotonic()
    submitted = run_tracker(env, "submit", str(batch_file))
    assert submitted.returncode == 0, submitted.stderr
    assert SECRET not in submitted.stdout + submitted.stderr
    request_id = submitted.stdout.split(" as ")[1].split(";")[0]
    wait_all_downloaded(sqlite_url, 1, 20)
    assert time.monotonic() - started < COMPLETION_DELAY + 10  # polling alone: 30 s
    stats = api.stats()
    assert stats["webhooks_by_id"][request_id]["sent"] >= 1
    assert stats["status_calls"][request_id] <= 3
    assert daemon.stop(signal.SIGTERM) == 0
    assert SECRET not in daemon.log_path.read_text()


def test_a_refused_submit_does_not_show_the_webhook_secret(
    sqlite_url: str, tmp_path: Path, fake_api: Callable[..., FakeApi]
) -> None:
    api = fake_api()
    # The simulator calls loopback only: it refuses this URL with 422.
    env = tracker_env(sqlite_url, api.url, tmp_path / "out") | {
        "TRACKER_WEBHOOK_SECRET": SECRET,
        "TRACKER_WEBHOOK_PUBLIC_URL": "https://hooks.example.com",
    }
    batch_file = tmp_path / "upi.csv"
    batch_file.write_text("vpa,name\nsomeone@upi,Someone\n")
    refused = run_tracker(env, "submit", str(batch_file))
    assert refused.returncode == 1
    assert "submit failed" in refused.stderr
    assert SECRET not in refused.stdout + refused.stderr
