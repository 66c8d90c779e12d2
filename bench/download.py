"""Downloads: a 1 GiB output file, the tracker against `curl -o`, to the same disk.

The simulator serves a `big-` batch of 1 GiB. curl fetches the signed URL that the status
call hands out (authorized first, as the tracker does); the daemon (`tracker run`) finds
the batch complete and streams the same kind of file into its output directory, hashing
it on the way, fsyncing and publishing it atomically. Rounds alternate curl and tracker.

Figures: the tracker's throughput (its own `download.done` timing: first request to
published file) against curl's `time_total`; the daemon's peak RSS (rusage of the child).

Run alone: `python bench/download.py [--quick]`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    CLIENT_ID,
    CLIENT_SECRET,
    MIB,
    Figure,
    fake_api,
    imports_peak_rss,
    insert_batches,
    median,
    ratio_of,
    run_alone,
    running_daemon,
    say,
    sqlite_database,
    temp_dir,
    tracker_env,
)

FULL_SIZE = 1 << 30
QUICK_SIZE = 256 << 20
THROUGHPUT_TARGET = 0.8
RSS_LIMIT = 80 * MIB


def signed_url(api_url: str, request_id: str) -> str:
    import httpx

    with httpx.Client(timeout=30) as http:
        token = http.post(
            f"{api_url}/v1/authorize",
            data={"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET},
        ).json()["access_token"]
        answer = http.get(
            f"{api_url}/v1/verification/batch-processing-status",
            params={"request_id": request_id},
            headers={"Authorization": f"Bearer {token}", "x-api-key": CLIENT_SECRET},
        ).json()
    url: str = answer["data"]["batch_output_file_url"]
    return url


def curl_once(url: str, directory: Path, size: int) -> tuple[float, float]:
    """(seconds of curl's own transfer, seconds of an fsync of its file afterwards)."""
    target = directory / "curl.out"
    output = subprocess.run(
        ["curl", "-sS", "--fail", "-o", str(target), "-w", "%{time_total} %{size_download}", url],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    seconds, fetched = output.stdout.split()
    if int(float(fetched)) != size:
        raise RuntimeError(f"curl fetched {fetched} bytes, expected {size}")
    started = time.monotonic()
    fd = os.open(target, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_seconds = time.monotonic() - started
    target.unlink()
    return float(seconds), fsync_seconds


def tracker_once(api_url: str, directory: Path, request_id: str, size: int) -> tuple[float, int]:
    """(seconds of the tracker's fetch, peak RSS of the daemon)."""
    work = directory / request_id
    work.mkdir()
    try:
        with sqlite_database(work) as url:
            insert_batches(url, [request_id])
            env = tracker_env(url, api_url, work / "out", TRACKER_SWEEP_INTERVAL="1")
            with running_daemon(env, work / "daemon.log") as daemon:
                daemon.wait_for_event("daemon.started", 60)
                done = daemon.wait_for_event("download.done", 600)
                finished = daemon.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if int(done["size"]) != size:
        raise RuntimeError(f"the tracker saved {done['size']} bytes, expected {size}")
    return float(done["seconds"]), finished.max_rss


def run(quick: bool) -> list[Figure]:
    # Three rounds even when quick: on a shared two-core machine one round says little.
    rounds = 3
    size = QUICK_SIZE if quick else FULL_SIZE
    label = f"{size >> 20} MiB" if size < (1 << 30) else f"{size >> 30} GiB"
    curl_times: list[float] = []
    curl_fsync: list[float] = []
    tracker_times: list[float] = []
    peak_rss = 0
    with (
        temp_dir() as directory,
        fake_api(
            "--completion-delay", "0", "--big-file-size", str(size), "--url-ttl", "3600"
        ) as api,
    ):
        for round_number in range(rounds):
            say(f"download: round {round_number + 1}/{rounds}: curl, then the tracker, {label}")
            url = signed_url(api.url, f"big-curl-{round_number}")
            seconds, fsync_seconds = curl_once(url, directory, size)
            curl_times.append(seconds)
            curl_fsync.append(fsync_seconds)
            fetch_seconds, rss = tracker_once(
                api.url, directory, f"big-tracker-{round_number}", size
            )
            tracker_times.append(fetch_seconds)
            peak_rss = max(peak_rss, rss)
    baseline_rss = bare_interpreter_rss()
    tracker_rate = size / median(tracker_times) / MIB
    curl_rate = size / median(curl_times) / MIB
    durable = [a + b for a, b in zip(curl_times, curl_fsync, strict=True)]
    curl_durable = size / median(durable) / MIB
    ratio = ratio_of(tracker_rate, curl_rate)
    # Each round's pair, measured back to back: shows how much the machine's load moved.
    rounds_seen = [
        f"round {number + 1}: curl {size / curl / MIB:,.0f} MiB/s, "
        f"tracker {size / tracker / MIB:,.0f} MiB/s, ratio {curl / tracker:.2f}"
        for number, (curl, tracker) in enumerate(zip(curl_times, tracker_times, strict=True))
    ]
    return [
        Figure(
            f"download: {label}, tracker vs curl -o, same disk",
            tracker_rate,
            curl_rate,
            "MiB/s",
            "MiB/s curl",
            ratio,
            f">= {THROUGHPUT_TARGET}",
            ratio is not None and ratio >= THROUGHPUT_TARGET,
            note=(
                f"median of {rounds}; the tracker's time includes sha256, fsync and the atomic "
                f"rename; curl's does not (fsync of curl's file took {median(curl_fsync):.2f} s)"
            ),
            details=rounds_seen,
        ),
        Figure(
            f"download: {label}, tracker vs curl -o + fsync (info)",
            tracker_rate,
            curl_durable,
            "MiB/s",
            "MiB/s curl+fsync",
            ratio_of(tracker_rate, curl_durable),
            "info",
            None,
        ),
        Figure(
            f"download: peak RSS of tracker run during the {label} download",
            peak_rss / MIB,
            baseline_rss / MIB,
            "MiB",
            "MiB python + imports",
            ratio_of(peak_rss, baseline_rss),
            "value <= 80 MiB",
            peak_rss <= RSS_LIMIT,
            note="baseline: python -c 'import sqlalchemy, httpx, apscheduler, structlog' (VmHWM)",
        ),
    ]


def bare_interpreter_rss() -> int:
    return imports_peak_rss("import sqlalchemy, httpx, apscheduler, structlog")


def main(argv: list[str]) -> int:
    return run_alone("download.py", run, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
