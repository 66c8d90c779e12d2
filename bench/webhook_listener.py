"""The webhook listener under a flood: deliveries per second the daemon absorbs, and its CPU
per delivery, against a bare aiohttp server.

`tracker run` with webhooks on (SQLite, and PostgreSQL when one answers) tracks 1,000
unfinished batches that a webhook already brought forward (hinted within
TRACKER_POLL_MIN_INTERVAL, here an hour), plus a pool of batches not hinted yet. The
simulator keeps every batch in progress. A load generator in its own process (aiohttp
client, keep-alive, 32 deliveries in flight; its CPU is not counted) POSTs deliveries
naming them for a fixed time after a warm-up: 19 in 20 name an already-hinted batch (the
realistic flood: Deepvue's retries and duplicates), 1 in 20 a batch not hinted yet, which
the daemon then brings forward and checks with a status call. Measured: deliveries answered
200 per second, and the daemon's CPU seconds (utime + stime from /proc/<pid>/stat, threads
included, so its sweeps and those status calls count) per delivery.

Baseline: a bare aiohttp server in its own process, one POST route that reads the body and
answers 200 JSON, no database and no log line, under the same load generator, measured
just before each daemon.

Also: a flood of deliveries with a wrong secret, naming batches not hinted yet, must change
no row of tracker_batches (on PostgreSQL not even its xmin) and cause no status call; and
200 deliveries naming one finished batch must cause no status call.

Run alone: `python bench/webhook_listener.py [--quick]`. The load generator and the bare
server are this file's `load` and `bare` subcommands.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    PYTHON,
    FakeApi,
    Figure,
    backends,
    database,
    fake_api,
    pg_admin_engine,
    ratio_of,
    run_alone,
    running_daemon,
    sample_process,
    say,
    stop_process,
    temp_dir,
    tracker_env,
    utcnow,
)

CONCURRENCY = 32
HINTED = 1_000
FRESH = 5_000
# One delivery in this many names a batch not hinted yet.
FRESH_EVERY = 20
WRONG_SECRET_POOL = 1_000
FINISHED_DELIVERIES = 200
ABSORB_TARGET = 0.5
SECRET = "bench-" + uuid.uuid4().hex
PREFIX = f"wh{uuid.uuid4().hex[:6]}"
THIS = Path(__file__).resolve()


# --------------------------------------------------------------------------- load generator


@dataclass(frozen=True)
class Load:
    """What one run of the load generator does; written as JSON for its process."""

    url: str
    hinted: list[str]
    fresh: list[str]
    warmup: float
    seconds: float
    concurrency: int = CONCURRENCY
    fresh_every: int = FRESH_EVERY


@dataclass(frozen=True)
class LoadResult:
    answered: dict[int, int]  # HTTP status -> deliveries answered so, in the measured window
    matched: int  # deliveries whose answer said a batch was brought forward
    seconds: float  # the measured window
    cpu: float  # the server's CPU seconds over the window (filled in by the parent)

    def per_second(self, status: int) -> float:
        return self.answered.get(status, 0) / self.seconds

    def cpu_per(self, status: int) -> float | None:
        count = self.answered.get(status, 0)
        return self.cpu / count if count else None


def _body(request_id: str) -> bytes:
    # What a completion callback plausibly carries: every string in it is a candidate id.
    return json.dumps({"event": "batch.completed", "request_id": request_id}).encode()


async def _generate(load: Load) -> dict[str, Any]:
    """Send deliveries until warm-up plus the measured time are over; print `measuring`
    when the window opens and `closed` when it closes (the parent samples the server's CPU
    at each), and return the window's counts."""
    import aiohttp

    hinted = [_body(request_id) for request_id in load.hinted]
    fresh = iter([_body(request_id) for request_id in load.fresh])
    answered: Counter[int] = Counter()
    matched = 0
    sent = 0
    started = time.monotonic()
    window_opens = started + load.warmup
    window_closes = window_opens + load.seconds
    measuring = closed = False

    def next_body() -> bytes:
        nonlocal sent
        sent += 1
        if sent % load.fresh_every == 0:
            body = next(fresh, None)
            if body is not None:
                return body
        return hinted[sent % len(hinted)]

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal matched, measuring, closed
        while (now := time.monotonic()) < window_closes:
            if not measuring and now >= window_opens:
                measuring = True
                print("measuring", flush=True)
            counted = now >= window_opens
            headers = {"Content-Type": "application/json"}
            try:
                async with session.post(load.url, data=next_body(), headers=headers) as response:
                    status, answer = response.status, await response.read()
            except (aiohttp.ClientError, TimeoutError):
                status, answer = 0, b""  # counted as status 0: no answer
            if counted and time.monotonic() < window_closes:
                answered[status] += 1
                if status == 200 and json.loads(answer).get("matched"):
                    matched += 1
        if not closed:
            closed = True
            print("closed", flush=True)

    connector = aiohttp.TCPConnector(limit=load.concurrency)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(load.concurrency)))
    return {
        "answered": dict(answered),
        "matched": matched,
        "seconds": load.seconds,
    }


def load_main(config: Path) -> int:
    load = Load(**json.loads(config.read_text()))
    result = asyncio.run(_generate(load))
    print(json.dumps(result), flush=True)
    return 0


def run_load(load: Load, server_pid: int, directory: Path) -> LoadResult:
    """The load generator in its own process; the server's CPU over its measured window."""
    config = directory / f"load-{uuid.uuid4().hex[:8]}.json"
    config.write_text(json.dumps(asdict(load)))
    process = subprocess.Popen(
        [PYTHON, str(THIS), "load", str(config)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    try:
        if process.stdout.readline().strip() != "measuring":
            raise RuntimeError("the load generator did not start its window")
        before = sample_process(server_pid).cpu
        if process.stdout.readline().strip() != "closed":
            raise RuntimeError("the load generator did not close its window")
        after = sample_process(server_pid).cpu
        line = process.stdout.readline()
        if process.wait(timeout=30) != 0 or not line:
            raise RuntimeError(f"the load generator failed (exit {process.returncode})")
    finally:
        stop_process(process)
        process.stdout.close()
    counts = json.loads(line)
    return LoadResult(
        answered={int(status): count for status, count in counts["answered"].items()},
        matched=int(counts["matched"]),
        seconds=float(counts["seconds"]),
        cpu=after - before,
    )


# --------------------------------------------------------------------------- the bare server


def bare_main() -> int:
    """One POST route that reads the body and answers 200 JSON; prints its port."""
    from aiohttp import web

    async def deliver(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"matched": 0})

    async def serve() -> None:
        app = web.Application()
        app.router.add_post("/webhook/{secret}", deliver)
        # No access log, as the tracker's listener.
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        print(runner.addresses[0][1], flush=True)
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
    return 0


@contextlib.contextmanager
def bare_server() -> Iterator[tuple[int, int]]:
    """The bare server's (pid, port)."""
    process = subprocess.Popen([PYTHON, str(THIS), "bare"], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    try:
        port = int(process.stdout.readline())
        yield process.pid, port
    finally:
        stop_process(process)
        process.stdout.close()


# --------------------------------------------------------------------------- the daemon's side


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def insert_rows(url: str, rows: list[dict[str, Any]]) -> None:
    from tracker.db import create_engine_for
    from tracker.schema import batches

    engine = create_engine_for(url)
    try:
        with engine.begin() as connection:
            connection.execute(batches.insert(), rows)
    finally:
        engine.dispose()


def tracked_rows(
    request_ids: list[str], *, hinted_at: datetime | None, next_check_at: datetime
) -> list[dict[str, Any]]:
    return [
        {"request_id": rid, "next_check_at": next_check_at, "hinted_at": hinted_at}
        for rid in request_ids
    ]


def snapshot(url: str, request_ids: list[str]) -> dict[str, tuple[Any, ...]]:
    """Every column of these rows; on PostgreSQL also xmin, which any UPDATE changes."""
    from tracker.db import create_engine_for
    from tracker.schema import batches

    engine = create_engine_for(url)
    columns: list[Any] = list(batches.c)
    if engine.dialect.name == "postgresql":
        columns.append(sa.literal_column("xmin::text"))
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                sa.select(*columns).where(batches.c.request_id.in_(request_ids))
            ).all()
    finally:
        engine.dispose()
    return {row.request_id: tuple(row) for row in rows}


def status_calls(api: FakeApi) -> dict[str, int]:
    calls: dict[str, int] = api.stats()["status_calls"]
    return calls


def hook_url(port: int, secret: str = SECRET) -> str:
    return f"http://127.0.0.1:{port}/webhook/{secret}"


def backend_figures(
    backend: str, admin: sa.Engine | None, api: FakeApi, warmup: float, seconds: float
) -> list[Figure]:
    hinted = [f"{PREFIX}-hinted-{backend}-{i:05d}" for i in range(HINTED)]
    fresh = [f"{PREFIX}-fresh-{backend}-{i:05d}" for i in range(FRESH)]
    untouched = [f"{PREFIX}-untouched-{backend}-{i:05d}" for i in range(WRONG_SECRET_POOL)]
    finished = f"{PREFIX}-finished-{backend}"
    later = utcnow() + timedelta(hours=1)
    figures: list[Figure] = []
    with temp_dir() as directory, database(backend, admin, directory) as url:
        insert_rows(url, tracked_rows(hinted, hinted_at=utcnow(), next_check_at=later))
        insert_rows(url, tracked_rows(fresh + untouched, hinted_at=None, next_check_at=later))
        insert_rows(
            url,
            [{"request_id": finished, "state": "downloaded", "finished_at": utcnow()}],
        )

        # The bare server first, under the same load, so each ratio is side by side.
        with bare_server() as (bare_pid, bare_port):
            say(f"webhook: bare aiohttp server, {seconds:g} s at c={CONCURRENCY}")
            bare = run_load(
                Load(hook_url(bare_port), hinted, [], warmup, seconds), bare_pid, directory
            )

        port = free_port()
        env = tracker_env(
            url,
            api.url,
            directory / "out",
            TRACKER_WEBHOOK_ADDR=f"127.0.0.1:{port}",
            TRACKER_WEBHOOK_SECRET=SECRET,
            # One early check per batch for the whole run; a checked batch is not due again.
            TRACKER_POLL_MIN_INTERVAL="3600",
            TRACKER_POLL_MAX_INTERVAL="3600",
            TRACKER_SWEEP_INTERVAL="1",
        )
        with running_daemon(env, directory / "daemon.log") as daemon:
            daemon.wait_for_event("webhook.listening", 60)
            daemon.wait_for_event("daemon.started", 60)
            time.sleep(1.0)  # the first sweep

            # Wrong secret, naming batches a right one would bring forward.
            rows_before = snapshot(url, untouched)
            calls_before = sum(status_calls(api).values())
            say(f"webhook: wrong-secret flood, {backend}, {seconds / 2:g} s")
            wrong = run_load(
                Load(hook_url(port, SECRET[:-1] + "x"), untouched, [], 0.5, seconds / 2),
                daemon.pid,
                directory,
            )
            time.sleep(2.0)  # two sweeps: anything brought forward would be checked by now
            rows_after = snapshot(url, untouched)
            changed = sum(rows_after.get(rid) != row for rid, row in rows_before.items())
            wrong_calls = sum(status_calls(api).values()) - calls_before
            # The control: the right secret naming one of them changes its row and brings a
            # status call, so the two counts above can see what they look for.
            control = untouched[0]
            deliver(hook_url(port), control, times=1)
            control_changed = snapshot(url, [control]) != {control: rows_before[control]}
            control_called = wait_for(lambda: status_calls(api).get(control, 0) > 0, 10.0)

            say(f"webhook: flood of deliveries, {backend}, {seconds:g} s at c={CONCURRENCY}")
            calls_before = sum(status_calls(api).values())
            flood = run_load(
                Load(hook_url(port), hinted, fresh, warmup, seconds), daemon.pid, directory
            )
            time.sleep(2.0)
            calls = status_calls(api)
            fresh_checked = sum(1 for rid in fresh if calls.get(rid))
            hinted_checked = sum(1 for rid in hinted if calls.get(rid))
            flood_calls = sum(calls.values()) - calls_before

            say(f"webhook: {FINISHED_DELIVERIES} deliveries for one finished batch, {backend}")
            finished_answers = deliver(hook_url(port), finished, times=FINISHED_DELIVERIES)
            time.sleep(2.5)  # two sweeps and more
            finished_calls = status_calls(api).get(finished, 0)
            if not daemon.alive():
                raise RuntimeError(f"tracker run exited; see {daemon.log_path}")

    absorbed, baseline = flood.per_second(200), bare.per_second(200)
    ratio = ratio_of(absorbed, baseline)
    figures.append(
        Figure(
            f"webhook: deliveries absorbed/s, {backend}, c={CONCURRENCY}, "
            f"{FRESH_EVERY - 1} in {FRESH_EVERY} already hinted, {seconds:g} s",
            absorbed,
            baseline,
            "/s",
            "/s bare aiohttp server",
            ratio,
            f">= {ABSORB_TARGET:g}",
            ratio is not None and ratio >= ABSORB_TARGET,
            note=(
                f"answered {dict(sorted(flood.answered.items()))} in the window, "
                f"{flood.matched} brought a batch forward; {fresh_checked} fresh batches "
                f"checked, {hinted_checked} already-hinted ones checked, {flood_calls} status "
                f"calls in all; bare answered {dict(sorted(bare.answered.items()))}"
            ),
        )
    )
    cpu, bare_cpu = flood.cpu_per(200), bare.cpu_per(200)
    cpu_ratio = ratio_of(cpu, bare_cpu)
    figures.append(
        Figure(
            f"webhook: daemon CPU per delivery, {backend}",
            None if cpu is None else cpu * 1000,
            None if bare_cpu is None else bare_cpu * 1000,
            "ms",
            "ms bare aiohttp server",
            cpu_ratio,
            "info",
            None,
            note=f"daemon {flood.cpu:.2f} s CPU, bare server {bare.cpu:.2f} s, "
            f"over {seconds:g} s each",
        )
    )
    refused = wrong.answered.get(404, 0)
    figures.append(
        Figure(
            f"webhook: wrong-secret flood, {backend}: tracker_batches rows changed",
            changed,
            refused,
            "rows",
            "deliveries refused",
            None,
            "= 0",
            changed == 0 and refused > 0 and set(wrong.answered) == {404} and control_changed,
            note=(
                f"{refused} deliveries answered 404 ({wrong.per_second(404):,.0f}/s) naming "
                f"{len(untouched)} batches not hinted yet; answers {wrong.answered}; one "
                f"delivery with the right secret then changed its batch's row: "
                f"{'yes' if control_changed else 'NO'}"
            ),
        )
    )
    figures.append(
        Figure(
            f"webhook: wrong-secret flood, {backend}: status calls",
            wrong_calls,
            refused,
            "calls",
            "deliveries refused",
            None,
            "= 0",
            wrong_calls == 0 and refused > 0 and control_called,
            note="one delivery with the right secret then brought a status call: "
            + ("yes" if control_called else "NO"),
        )
    )
    figures.append(
        Figure(
            f"webhook: {FINISHED_DELIVERIES} deliveries for one finished batch, {backend}: "
            "status calls",
            finished_calls,
            finished_answers.get(200, 0),
            "calls",
            "deliveries answered 200",
            None,
            "= 0",
            finished_calls == 0 and finished_answers == {200: FINISHED_DELIVERIES},
        )
    )
    return figures


def wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    """Whether `condition` came true within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def deliver(url: str, request_id: str, *, times: int) -> dict[int, int]:
    """`times` deliveries naming `request_id`, one after another; answers by status."""
    import httpx

    answered: Counter[int] = Counter()
    with httpx.Client(timeout=10) as client:
        for _ in range(times):
            answer = client.post(url, content=_body(request_id))
            answered[answer.status_code] += 1
    return dict(answered)


def run(quick: bool) -> list[Figure]:
    warmup, seconds = (1.0, 4.0) if quick else (2.0, 15.0)
    admin = pg_admin_engine()
    figures: list[Figure] = []
    try:
        with fake_api("--completion-delay", "86400") as api:
            for backend in backends(admin):
                figures += backend_figures(backend, admin, api, warmup, seconds)
    finally:
        if admin is not None:
            admin.dispose()
    return figures


def main(argv: list[str]) -> int:
    if argv[:1] == ["load"]:
        return load_main(Path(argv[1]))
    if argv[:1] == ["bare"]:
        return bare_main()
    return run_alone("webhook_listener.py", run, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
