"""`tracker demo`: the whole product in one command, against the bundled simulator.

A fresh temp directory holds a SQLite database and the downloads. A dozen batches with
mixed outcomes are enqueued (some by raw SQL, as another application would), the daemon
runs until every one is final, and a table shows where each ended up.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa

from tracker.daemon import run_service
from tracker.db import create_engine_for, upgrade_database
from tracker.domain.model import PollPolicy
from tracker.domain.states import ACTIVE_STATES
from tracker.logs import configure_logging
from tracker.settings import Settings
from tracker.simulator import SimulatorConfig, running_simulator
from tracker.store import Store

DEADLINE_SECONDS = 60.0


def _demo_batches() -> list[tuple[str, str, str]]:
    """(request_id, what the simulator will do, the state it should end in)."""
    tag = uuid.uuid4().hex[:12]
    return [
        (uuid.uuid4().hex, "completes", "downloaded"),
        (uuid.uuid4().hex, "completes", "downloaded"),
        (uuid.uuid4().hex, "completes", "downloaded"),
        (f"xlsx-{tag}", "completes with an .xlsx file", "downloaded"),
        (f"flaky-{tag}", "every other answer is 503", "downloaded"),
        (f"garbage-{tag}", "first answers are HTML, not JSON", "downloaded"),
        (f"trunc-{tag}", "first download is cut short, resumed", "downloaded"),
        (f"expire-{tag}", "first output URL already expired", "downloaded"),
        (f"fail-{tag}", "Deepvue reports the batch failed", "failed"),
        (f"invalid-{tag}", "Deepvue answers 400 for this id", "rejected"),
        ("../../etc/passwd", "malformed id, never sent", "rejected"),
        (f"old-{tag}", "enqueued long ago", "expired"),
        (f"cancel-{tag}", "cancelled by an operator", "cancelled"),
    ]


def run_demo(clean: bool = False) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="tracker-demo-"))
    started = time.monotonic()
    scrubber = configure_logging("console", "WARNING")
    batches = _demo_batches()
    try:
        with running_simulator(SimulatorConfig(completion_delay=1.5)) as simulator:
            settings = Settings(
                database_url=f"sqlite:///{workdir / 'tracker.db'}",
                output_dir=workdir / "downloads",
                api_base_url=simulator.base_url,
                client_id="demo-client",
                client_secret="demo-secret",  # noqa: S106 - the simulator's well-known demo secret
                sweep_interval=0.5,
                download_allowed_hosts=("127.0.0.1",),
                rate_per_second=17,
                rate_per_minute=1000,
                rate_per_day=50_000,
                log_format="console",
                log_level="WARNING",
            )
            # Quick intervals so the demo finishes in seconds, not the production minutes.
            policy = PollPolicy(
                min_interval=0.5, max_interval=2.0, fault_base=0.3, fault_cap=1.0, max_age=3600.0
            )
            store = _enqueue(settings, batches)
            print(f"tracking {len(batches)} batches in {workdir} ...", flush=True)
            asyncio.run(
                asyncio.wait_for(
                    run_service(settings, scrubber, policy=policy, until=_all_final),
                    DEADLINE_SECONDS,
                )
            )
            return _report(store, batches, workdir, time.monotonic() - started)
    finally:
        if clean:
            shutil.rmtree(workdir, ignore_errors=True)


def _enqueue(settings: Settings, batches: list[tuple[str, str, str]]) -> Store:
    engine = create_engine_for(settings.database_url)
    upgrade_database(engine)
    store = Store(engine)
    with engine.begin() as connection:
        for request_id, _, _ in batches:
            if request_id.startswith("old-"):
                connection.execute(
                    sa.text(
                        "INSERT INTO tracker_batches (request_id, label, created_at) "
                        "VALUES (:id, 'demo', '2020-01-01 00:00:00')"
                    ),
                    {"id": request_id},
                )
            else:
                # Exactly what another application would run.
                connection.execute(
                    sa.text("INSERT INTO tracker_batches (request_id, label) VALUES (:id, 'demo')"),
                    {"id": request_id},
                )
    for request_id, _, _ in batches:
        if request_id.startswith("cancel-"):
            store.cancel(request_id, datetime.now(UTC))
    return store


def _all_final(store: Store) -> bool:
    counts = store.count_by_state()
    return not any(counts.get(state.value) for state in ACTIVE_STATES)


def _report(
    store: Store, batches: list[tuple[str, str, str]], workdir: Path, seconds: float
) -> int:
    rows = {row.request_id: row for row in store.list_batches()}
    header = f"{'REQUEST_ID':36}  {'SCENARIO':38}  {'STATE':10}  RESULT"
    print(header)
    print("-" * len(header))
    surprises = 0
    for request_id, scenario, expected in batches:
        row = rows[request_id]
        result = (
            f"{row.file_path} ({row.file_size} bytes)"
            if row.file_path
            else (row.last_error or "")[:70]
        )
        mark = "" if row.state == expected else f"  <- expected {expected}"
        surprises += row.state != expected
        print(f"{request_id[:36]:36}  {scenario[:38]:38}  {row.state:10}  {result}{mark}")
    print(f"\n{len(batches)} batches final in {seconds:.1f} s; files in {workdir / 'downloads'}")
    return 0 if surprises == 0 else 1
