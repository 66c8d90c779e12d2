"""Idle cost: a daemon with nothing due must cost next to nothing, and start-up must be cheap.

Idle: 10,000 batches not yet due (next check in an hour), `tracker run` on SQLite and on
PostgreSQL at the same time (each measured alone from /proc/<pid>/stat and status) for
60 s (15 s with --quick), counted from its first finished sweep. CPU is the daemon's CPU
seconds over the wall seconds; RSS is its peak (VmHWM), start-up included.

Idle beside a busy instance: the same, with one batch that is due but leased for an hour
by another (live) instance, as while it downloads a long file. A daemon that can claim
nothing must be as idle as one with nothing due: it once swept ~65 times a second.

Start-up: `tracker --help` against `python -c 'import sqlalchemy, httpx, apscheduler,
structlog'`, interleaved, median of several runs each.

Run alone: `python bench/idle.py [--quick]`.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import timedelta
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    MIB,
    PYTHON,
    TRACKER,
    Figure,
    backends,
    database,
    fake_api,
    imports_peak_rss,
    insert_batches,
    median,
    pg_admin_engine,
    ratio_of,
    run_alone,
    run_measured,
    running_daemon,
    sample_process,
    say,
    temp_dir,
    tracker_env,
    utcnow,
)

NOT_DUE = 10_000
CPU_TARGET = 0.01
RSS_LIMIT = 80 * MIB
HELP_TARGET = 0.5
IMPORTS = "import sqlalchemy, httpx, apscheduler, structlog"


LEASED_ELSEWHERE = "leased elsewhere"
NOTHING_DUE = "not due"


BUSY_OWNER = "busy-host:1:0000beef"


@contextmanager
def leased_elsewhere(url: str, request_id: str) -> Iterator[None]:
    """`request_id` due, but leased for an hour by another instance that stays alive
    (heartbeating here, as its daemon would), so nobody may take it over."""
    from tracker.db import create_engine_for
    from tracker.store import Store

    engine = create_engine_for(url)
    stop = threading.Event()
    store = Store(engine)
    store.register_instance(BUSY_OWNER, "busy-host", 1, None)
    claimed = store.claim_due(BUSY_OWNER, 1, 3600)
    if [batch.request_id for batch in claimed] != [request_id]:
        raise RuntimeError(f"could not lease {request_id} to the other instance")

    def keep_alive() -> None:
        while not stop.wait(2.0):
            store.heartbeat(BUSY_OWNER)

    beating = threading.Thread(target=keep_alive, name="busy-heartbeat", daemon=True)
    beating.start()
    try:
        yield
    finally:
        stop.set()
        beating.join(timeout=10)
        engine.dispose()


def idle_figures(seconds: float) -> list[Figure]:
    admin = pg_admin_engine()
    figures: list[Figure] = []
    try:
        with ExitStack() as stack:
            api = stack.enter_context(fake_api())
            daemons = {}
            for backend in backends(admin):
                for scenario in (NOTHING_DUE, LEASED_ELSEWHERE):
                    directory = stack.enter_context(temp_dir())
                    url = stack.enter_context(database(backend, admin, directory))
                    if scenario == LEASED_ELSEWHERE:
                        insert_batches(url, ["busy-000000"])
                        stack.enter_context(leased_elsewhere(url, "busy-000000"))
                    insert_batches(
                        url,
                        [f"idle-{i:06d}" for i in range(NOT_DUE)],
                        next_check_at=utcnow() + timedelta(hours=1),
                    )
                    env = tracker_env(url, api.url, directory / "out")
                    daemons[backend, scenario] = stack.enter_context(
                        running_daemon(env, directory / "daemon.log")
                    )
            starts = {}
            for daemon in daemons.values():
                daemon.wait_for_event("daemon.started", 60)
            # Give the first sweep (and PostgreSQL's listener) a moment to finish.
            time.sleep(1.0)
            for key, daemon in daemons.items():
                starts[key] = (time.monotonic(), sample_process(daemon.pid))
            say(f"idle: {len(daemons)} daemon(s) with {NOT_DUE:,} batches not due, {seconds:g} s")
            time.sleep(seconds)
            for (backend, scenario), daemon in daemons.items():
                end = sample_process(daemon.pid)
                started_at, start = starts[backend, scenario]
                wall = time.monotonic() - started_at
                cpu = end.cpu - start.cpu
                fraction = cpu / wall
                beside = ", 1 due batch leased elsewhere" if scenario == LEASED_ELSEWHERE else ""
                figures.append(
                    Figure(
                        f"idle: CPU of tracker run, {backend}, {NOT_DUE:,} not due{beside}, {seconds:g} s",
                        cpu,
                        wall,
                        "s CPU",
                        "s wall",
                        fraction,
                        f"<= {CPU_TARGET:g}",
                        fraction <= CPU_TARGET,
                    )
                )
                if scenario == LEASED_ELSEWHERE:
                    continue
                figures.append(
                    Figure(
                        f"idle: peak RSS of tracker run, {backend}",
                        end.peak_rss / MIB,
                        bare_rss() / MIB,
                        "MiB",
                        "MiB python + imports",
                        ratio_of(end.peak_rss, bare_rss()),
                        "value <= 80 MiB",
                        end.peak_rss <= RSS_LIMIT,
                        note=f"RSS at the end {end.rss / MIB:.1f} MiB",
                    )
                )
    finally:
        if admin is not None:
            admin.dispose()
    return figures


_BARE_RSS: list[int] = []


def bare_rss() -> int:
    if not _BARE_RSS:
        _BARE_RSS.append(imports_peak_rss(IMPORTS))
    return _BARE_RSS[0]


def help_figure(runs: int) -> Figure:
    say(f"idle: tracker --help against the bare imports, {runs} runs each, interleaved")
    help_times: list[float] = []
    import_times: list[float] = []
    for _ in range(runs):
        help_run = run_measured([*TRACKER, "--help"], timeout=60)
        import_run = run_measured([PYTHON, "-c", IMPORTS], timeout=60)
        if help_run.returncode != 0 or import_run.returncode != 0:
            raise RuntimeError("tracker --help or the bare imports failed")
        help_times.append(help_run.wall)
        import_times.append(import_run.wall)
    value, baseline = median(help_times), median(import_times)
    ratio = ratio_of(value, baseline)
    return Figure(
        "start-up: tracker --help",
        value * 1000,
        baseline * 1000,
        "ms",
        "ms python -c 'import sqlalchemy, httpx, apscheduler, structlog'",
        ratio,
        f"<= {HELP_TARGET}",
        ratio is not None and ratio <= HELP_TARGET,
        note=f"median of {runs} runs each, interleaved",
    )


def run(quick: bool) -> list[Figure]:
    figures = idle_figures(15.0 if quick else 60.0)
    figures.append(help_figure(5 if quick else 21))
    return figures


def main(argv: list[str]) -> int:
    return run_alone("idle.py", run, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
