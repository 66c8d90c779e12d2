"""`tracker demo`: the whole product in one command, against the bundled simulator.

A fresh temp directory holds a SQLite database and the downloads. A dozen batches with
mixed outcomes are enqueued (some by raw SQL, as another application would), the daemon
runs until every one is final, and a table shows where each ended up.

Then webhooks: a second daemon polls every WEBHOOK_ACT_POLL seconds with its webhook
listener on; half of a handful of batches have the simulator send their webhook, half do
not, and a table shows how soon each half was found after completing, for how many calls.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import shutil
import socket
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from tracker.daemon import run_service
from tracker.db import create_engine_for, upgrade_database
from tracker.domain.model import PollPolicy
from tracker.domain.states import ACTIVE_STATES
from tracker.logs import SecretScrubber, configure_logging
from tracker.settings import Settings
from tracker.simulator import SimulatorConfig, SimulatorHandle, running_simulator
from tracker.store import Store

DEADLINE_SECONDS = 60.0
COMPLETION_DELAY = 1.5
# The webhook act polls this slowly, so that what the webhooks save shows.
WEBHOOK_ACT_POLL = 8.0
WEBHOOK_ACT_BATCHES = 3  # per half


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
    # Fresh databases: their migrations are no news here (the daemon logs them at INFO).
    logging.getLogger("alembic").setLevel(logging.WARNING)
    batches = _demo_batches()
    try:
        with running_simulator(SimulatorConfig(completion_delay=COMPLETION_DELAY)) as simulator:
            settings = _demo_settings(simulator.base_url, workdir, "tracker.db")
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
            surprises = _report(store, batches, workdir, time.monotonic() - started)
            return max(surprises, _webhook_act(simulator, workdir, scrubber))
    finally:
        if clean:
            shutil.rmtree(workdir, ignore_errors=True)


def _demo_settings(api_base_url: str, workdir: Path, database: str, **more: Any) -> Settings:
    return Settings(
        database_url=f"sqlite:///{workdir / database}",
        output_dir=workdir / "downloads",
        api_base_url=api_base_url,
        client_id="demo-client",
        client_secret="demo-secret",  # noqa: S106 - the simulator's well-known demo secret
        sweep_interval=0.5,
        download_allowed_hosts=("127.0.0.1",),
        rate_per_second=17,
        rate_per_minute=1000,
        rate_per_day=50_000,
        log_format="console",
        log_level="WARNING",
        **more,
    )


def _webhook_act(simulator: SimulatorHandle, workdir: Path, scrubber: SecretScrubber) -> int:
    """Batches with and without a webhook, one slowly polling daemon: how soon each is found."""
    port = _free_loopback_port()
    secret = secrets.token_urlsafe(24)
    settings = _demo_settings(
        simulator.base_url,
        workdir,
        "webhooks.db",
        webhook_addr=f"127.0.0.1:{port}",
        webhook_secret=secret,
    )
    tag = uuid.uuid4().hex[:8]
    hooked = [f"hook-{tag}-{n}" for n in range(WEBHOOK_ACT_BATCHES)]
    polled = [f"poll-{tag}-{n}" for n in range(WEBHOOK_ACT_BATCHES)]
    for request_id in hooked:
        # What Deepvue does for a batch submitted with webhook_url (`tracker webhook-url`).
        simulator.send_webhook(f"http://127.0.0.1:{port}/webhook/{secret}", request_id)
    store = _enqueue(settings, [(request_id, "", "") for request_id in hooked + polled])
    policy = PollPolicy(
        min_interval=WEBHOOK_ACT_POLL, max_interval=WEBHOOK_ACT_POLL, max_age=3600.0
    )
    print(
        f"\nwebhooks: {len(hooked)} batches send theirs, {len(polled)} do not; "
        f"checks at least {WEBHOOK_ACT_POLL:g} s apart ...",
        flush=True,
    )
    asyncio.run(
        asyncio.wait_for(
            run_service(settings, scrubber, policy=policy, until=_all_final), DEADLINE_SECONDS
        )
    )
    calls: dict[str, int] = simulator.stats()["status_calls"]
    header = f"{'':18}  {'FOUND AFTER COMPLETING':>22}  {'STATUS CALLS':>12}  STATES"
    print(header)
    print("-" * len(header))
    unexpected = 0
    medians: list[float] = []
    for name, group in (("with a webhook", hooked), ("polling alone", polled)):
        delays = [_found_after(store, request_id) for request_id in group]
        found = sorted(delay for delay in delays if delay is not None)
        if found:
            medians.append(found[len(found) // 2])
        shown = f"{found[len(found) // 2]:.1f} s (median)" if found else "-"
        per_batch = sum(calls.get(request_id, 0) for request_id in group) / len(group)
        final = {row.state for row in store.list_batches() if row.request_id in group}
        unexpected += final != {"downloaded"}
        print(f"{name:18}  {shown:>22}  {per_batch:>12.1f}  {', '.join(sorted(final))}")
    if len(medians) == 2:
        print(f"\nthe webhooks found their batches {medians[1] - medians[0]:.1f} s sooner")
    return 0 if unexpected == 0 else 1


def _found_after(store: Store, request_id: str) -> float | None:
    """Seconds from the simulator completing the batch to the tracker seeing it ready."""
    row = store.get(request_id)
    if row is None:
        return None
    steps = {step.to_state: step.at for step in store.history(row.id)}
    first_check, ready = steps.get("processing"), steps.get("ready")
    if first_check is None or ready is None:
        return None
    # The simulator completes a batch COMPLETION_DELAY after its first status call.
    return max(0.0, (ready - first_check).total_seconds() - COMPLETION_DELAY)


def _free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


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
