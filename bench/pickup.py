"""Pickup latency on PostgreSQL: from another connection's INSERT commit to the first check.

`tracker run` (LISTEN/NOTIFY on) with the default sweep interval of 5 s, the simulator
answering "in progress". The benchmark inserts one batch at a time from its own
connection, notes the moment the COMMIT returned, and waits for the batch's first
transition (pending -> processing). The latency is that transition's `at`, stamped by the
daemon once the status answer arrived, minus the commit moment: an upper bound of the time
to the first status call. Inserts are spaced at random so they never line up with a timer.

Baseline: the sweep interval, which is what pickup would cost without LISTEN/NOTIFY.

Run alone: `python bench/pickup.py [--quick]`.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import sqlalchemy as sa

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    Figure,
    database,
    fake_api,
    median,
    pg_admin_engine,
    run_alone,
    running_daemon,
    say,
    skipped,
    temp_dir,
    tracker_env,
    wait_until,
)

SWEEP_INTERVAL = 5.0
TARGET_MS = 50.0


def first_transition_at(engine: sa.Engine, request_id: str) -> float | None:
    from tracker.schema import transitions

    with engine.connect() as connection:
        at = connection.execute(
            sa.select(sa.func.min(transitions.c.at)).where(transitions.c.request_id == request_id)
        ).scalar_one_or_none()
    return None if at is None else at.timestamp()


def run(quick: bool) -> list[Figure]:
    name = (
        f"pickup: INSERT commit -> first check, postgresql (LISTEN), interval {SWEEP_INTERVAL:g} s"
    )
    target = f"value <= {TARGET_MS:g} ms"
    admin = pg_admin_engine()
    if admin is None:
        return [skipped(name, target, "no PostgreSQL answered")]
    inserts = 10 if quick else 25
    rng = random.Random(5)
    latencies: list[float] = []
    try:
        with (
            temp_dir() as directory,
            fake_api("--completion-delay", "3600") as api,
            database("postgresql", admin, directory) as url,
        ):
            from tracker.db import create_engine_for
            from tracker.schema import batches

            env = tracker_env(
                url, api.url, directory / "out", TRACKER_SWEEP_INTERVAL=f"{SWEEP_INTERVAL:g}"
            )
            engine = create_engine_for(url)
            try:
                with running_daemon(env, directory / "daemon.log") as daemon:
                    daemon.wait_for_event("daemon.started", 60)
                    daemon.wait_for_event("listen.ready", 30)
                    say(f"pickup: {inserts} inserts, one at a time, from another connection")
                    for number in range(inserts + 1):
                        request_id = f"pickup-{number:03d}"
                        time.sleep(rng.uniform(0.05, 0.4))
                        with engine.begin() as connection:
                            connection.execute(batches.insert().values(request_id=request_id))
                        committed = time.time()
                        found: list[float] = []

                        def picked_up(rid: str = request_id, into: list[float] = found) -> bool:
                            at = first_transition_at(engine, rid)
                            if at is not None:
                                into.append(at)
                            return at is not None

                        wait_until(
                            picked_up,
                            3 * SWEEP_INTERVAL,
                            f"the first check of {request_id}",
                            poll=0.02,
                        )
                        if number:  # the first one also pays for connections and the token
                            latencies.append(found[0] - committed)
            finally:
                engine.dispose()
    finally:
        admin.dispose()
    value = median(latencies) * 1000
    return [
        Figure(
            name,
            value,
            SWEEP_INTERVAL * 1000,
            "ms",
            "ms sweep interval",
            value / (SWEEP_INTERVAL * 1000),
            target,
            value <= TARGET_MS,
            note=(
                f"median of {len(latencies)} inserts; min {min(latencies) * 1000:.1f} ms, "
                f"max {max(latencies) * 1000:.1f} ms"
            ),
        )
    ]


def main(argv: list[str]) -> int:
    return run_alone("pickup.py", run, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
