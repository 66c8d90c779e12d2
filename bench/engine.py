"""Engine throughput and CPU cost: `tracker sweep` against a bare HTTP loop, side by side.

Throughput: N batches that are all complete, the simulator answering with 20 ms of latency,
concurrency 32. The tracker's rate is status checks recorded per second: from the moment it
has its token (its `api.authorized` log line) to the commit of the last check (the newest
`ready` transition). Every check of a complete batch is followed, in the same worker slot,
by the download of its small output file, so the sweep also did N downloads; a second row
compares whole batches (check + download) with a durable bare loop: the same two requests,
and each file stored as the tracker stores it (temp file, fsync, rename, directory fsync),
without a database.

CPU: the same with no latency. The marginal CPU of one recorded check: two sweeps (rusage
of each child), one over N/5 batches and one over N, and the difference of their CPU over
the difference of their checks, so that what every sweep pays once (interpreter start,
imports, migrations check, authorizing, opening connections) cancels out. Against a bare
aiohttp client's CPU per request, and against the durable bare loop's CPU per complete
batch, in the same run.

Run alone: `python bench/engine.py [--quick]`. `python bench/engine.py bare ...` is the
bare client, run as its own process by the benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    CLIENT_ID,
    CLIENT_SECRET,
    PYTHON,
    TRACKER,
    Figure,
    authorize,
    backends,
    count_states,
    database,
    event_time,
    fake_api,
    insert_batches,
    log_events,
    pg_admin_engine,
    ratio_of,
    run_alone,
    run_measured,
    say,
    temp_dir,
    tracker_env,
)

CONCURRENCY = 32
LATENCY = 0.02
# Output files this small are the CSV header alone. A bigger file costs the simulator a
# template of 512 hashed rows per request_id (about 4 ms of its CPU), which made the
# simulator, not the tracker, the limit of a sweep where every check downloads: a bare
# check+download loop reached 110/s with 4 KiB files and 430/s with these. The tracker still
# does every step of a download: request, stream, hash, fsync, rename, directory fsync.
FILE_SIZE = 48
THROUGHPUT_TARGET = 0.8
CPU_TARGET = 3.0
BARE_CLIENTS = ("aiohttp", "httpx", "httpx-aiohttp", "tracker")
DURABLE_WORK = (
    "status call, file fetched, written to a temp file while hashed, fsynced, renamed "
    "into place, directory fsynced (shared by renames made together, as the tracker does)"
)


# --------------------------------------------------------------------------- the bare client


def _make_client(kind: str) -> Any:
    import httpx

    if kind == "httpx":
        return httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=CONCURRENCY))
    if kind == "httpx-aiohttp":
        from httpx_aiohttp import AiohttpTransport

        return httpx.AsyncClient(
            timeout=30, transport=AiohttpTransport(limits=httpx.Limits(max_connections=100))
        )
    if kind == "tracker":
        from tracker.deepvue import make_api_http_client

        return make_api_http_client(30.0)
    raise ValueError(kind)


async def _bare_httpx(
    kind: str, url: str, ids: list[str], concurrency: int, download: bool
) -> dict[str, float]:
    http = _make_client(kind)
    files = _make_client("httpx") if download else None
    async with http:
        headers = await authorize(http, url)
        queue = list(reversed(ids))

        async def worker() -> None:
            while queue:
                request_id = queue.pop()
                response = await http.get(
                    f"{url}/v1/verification/batch-processing-status",
                    params={"request_id": request_id},
                    headers=headers,
                )
                body = json.loads(response.content)
                file_url = body["data"]["batch_output_file_url"]
                if download and file_url and files is not None:
                    async with files.stream("GET", file_url) as answer:
                        async for _ in answer.aiter_raw():
                            pass

        started, cpu = time.monotonic(), time.process_time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result = {"seconds": time.monotonic() - started, "cpu": time.process_time() - cpu}
    if files is not None:
        await files.aclose()
    return result


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _DirectorySync:
    """The directory fsyncs after renames, shared by renames made together, as the
    tracker shares them: a rename waits for an fsync that started after it."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._running: asyncio.Future[None] | None = None
        self._next: asyncio.Future[None] | None = None

    async def after_rename(self) -> None:
        if self._running is None:
            round_ = self._start()
        else:
            if self._next is None:
                self._next = asyncio.get_running_loop().create_future()
            round_ = self._next
        await asyncio.shield(round_)

    def _start(self) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        running = loop.run_in_executor(None, _fsync_directory, self._directory)
        self._running = running
        running.add_done_callback(self._finished)
        return running

    def _finished(self, done: asyncio.Future[None]) -> None:
        self._running = None
        waiting, self._next = self._next, None
        if waiting is not None:
            self._start().add_done_callback(lambda following: _copy_outcome(following, waiting))


def _copy_outcome(source: asyncio.Future[None], target: asyncio.Future[None]) -> None:
    error = source.exception()
    if error is None:
        target.set_result(None)
    else:
        target.set_exception(error)


def _sync_and_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _DurableFiles:
    """What the tracker does with a file's bytes, without its database or its checks:
    a temp file, hashed while written, fsynced, renamed into place, directory fsynced."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._directory = directory
        self._directory_sync = _DirectorySync(directory)

    async def store(self, request_id: str, chunks: AsyncIterator[bytes]) -> None:
        temp = self._directory / f".{request_id}.csv.part"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(temp, flags, 0o640)
        hasher = hashlib.sha256()
        try:
            async for chunk in chunks:
                os.write(fd, chunk)
                hasher.update(chunk)
        finally:
            # fsync in a thread, as the tracker does, so the event loop keeps serving.
            await asyncio.get_running_loop().run_in_executor(None, _sync_and_close, fd)
        os.replace(temp, self._directory / f"{request_id}.csv")
        await self._directory_sync.after_rename()


async def _bare_aiohttp(
    url: str, ids: list[str], concurrency: int, download: bool, durable: Path | None
) -> dict[str, float]:
    import aiohttp

    files = None if durable is None else _DurableFiles(durable)
    connector = aiohttp.TCPConnector(limit=concurrency * (2 if download else 1))
    async with aiohttp.ClientSession(connector=connector) as session:
        form = {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
        async with session.post(f"{url}/v1/authorize", data=form) as response:
            token = (await response.json())["access_token"]
        headers = {"Authorization": f"Bearer {token}", "x-api-key": CLIENT_SECRET}
        queue = list(reversed(ids))

        async def worker() -> None:
            while queue:
                request_id = queue.pop()
                async with session.get(
                    f"{url}/v1/verification/batch-processing-status",
                    params={"request_id": request_id},
                    headers=headers,
                ) as response:
                    body = json.loads(await response.read())
                file_url = body["data"]["batch_output_file_url"]
                if download and file_url:
                    async with session.get(file_url) as answer:
                        if files is None:
                            async for _ in answer.content.iter_chunked(1 << 16):
                                pass
                        else:
                            answer.raise_for_status()
                            await files.store(request_id, answer.content.iter_chunked(1 << 16))

        started, cpu = time.monotonic(), time.process_time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return {"seconds": time.monotonic() - started, "cpu": time.process_time() - cpu}


def bare_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="engine.py bare")
    parser.add_argument("--url", required=True)
    parser.add_argument("--client", choices=BARE_CLIENTS, default="aiohttp")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--prefix", default="bench-")
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY)
    parser.add_argument("--download", action="store_true")
    parser.add_argument(
        "--durable",
        type=Path,
        help="with --download: store each file durably in this directory (aiohttp only)",
    )
    args = parser.parse_args(argv)
    ids = [f"{args.prefix}{i:07d}" for i in range(args.count)]
    if args.client == "aiohttp":
        result = asyncio.run(
            _bare_aiohttp(args.url, ids, args.concurrency, args.download, args.durable)
        )
    else:
        result = asyncio.run(
            _bare_httpx(args.client, args.url, ids, args.concurrency, args.download)
        )
    print(json.dumps(result))
    return 0


def run_bare(
    url: str,
    count: int,
    *,
    client: str = "aiohttp",
    prefix: str,
    download: bool = False,
    durable: Path | None = None,
) -> dict[str, float]:
    """The bare client in its own process; with `durable`, each file is stored there as
    the tracker stores it (temp file, fsync, rename, directory fsync)."""
    command = [PYTHON, str(Path(__file__).resolve()), "bare", "--url", url, "--client", client]
    command += ["--count", str(count), "--prefix", prefix, "--concurrency", str(CONCURRENCY)]
    if download:
        command.append("--download")
    if durable is not None:
        command += ["--durable", str(durable)]
    output = subprocess.run(command, capture_output=True, text=True, timeout=600, check=True)
    result: dict[str, float] = json.loads(output.stdout.strip().splitlines()[-1])
    return result


# --------------------------------------------------------------------------- the tracker


def run_sweep(
    url: str, api_url: str, directory: Path, tag: str
) -> tuple[Any, list[dict[str, Any]]]:
    out_dir = directory / f"out-{tag}"
    log_path = directory / f"sweep-{tag}.log"
    env = tracker_env(url, api_url, out_dir, TRACKER_CONCURRENCY=str(CONCURRENCY))
    with log_path.open("w") as log_file:
        finished = run_measured(
            [*TRACKER, "sweep"], env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
    if finished.returncode != 0:
        raise RuntimeError(f"tracker sweep exited {finished.returncode}; see {log_path}")
    return finished, log_events(log_path)


def recorded_window(url: str, to_state: str) -> tuple[int, float | None]:
    """How many transitions to `to_state`, and when the last one committed (epoch seconds)."""
    from tracker.db import create_engine_for
    from tracker.schema import transitions

    engine = create_engine_for(url)
    try:
        with engine.begin() as connection:
            count, last = connection.execute(
                sa.select(sa.func.count(), sa.func.max(transitions.c.at)).where(
                    transitions.c.to_state == to_state
                )
            ).one()
    finally:
        engine.dispose()
    return int(count), (None if last is None else last.timestamp())


def authorized_at(events: list[dict[str, Any]]) -> float:
    for event in events:
        if event.get("event") == "api.authorized":
            return event_time(event)
    raise RuntimeError("the sweep never logged api.authorized")


def throughput_figures(backend: str, admin: sa.Engine | None, count: int) -> list[Figure]:
    prefix = f"tp{backend[:2]}-"
    ids = [f"{prefix}{i:07d}" for i in range(count)]
    with (
        temp_dir() as directory,
        fake_api(
            "--latency", str(LATENCY), "--completion-delay", "0", "--file-size", str(FILE_SIZE)
        ) as api,
        database(backend, admin, directory) as url,
    ):
        insert_batches(url, ids)
        say(f"engine/{backend}: tracker sweep over {count} complete batches, 20 ms latency")
        finished, events = run_sweep(url, api.url, directory, "throughput")
        start = authorized_at(events)
        checks, last_check = recorded_window(url, "ready")
        done, last_done = recorded_window(url, "downloaded")
        states = count_states(url)
        assert last_check is not None
        assert last_done is not None
        tracker_rate = checks / (last_check - start)
        batch_rate = done / (last_done - start)
        say(f"engine/{backend}: bare aiohttp loops over the same answers")
        api.reset()
        bare = run_bare(api.url, count, prefix=prefix)
        api.reset()
        bare_durable = run_bare(
            api.url, count, prefix=prefix, download=True, durable=directory / "bare-out"
        )
    ceiling = count / bare["seconds"]
    ceiling_durable = count / bare_durable["seconds"]
    what = (
        f"the sweep recorded {checks} checks and downloaded {done} files of {FILE_SIZE} B, "
        f"states {states}, wall {finished.wall:.1f} s incl. start-up"
    )
    ratio = ratio_of(tracker_rate, ceiling)
    ratio_durable = ratio_of(batch_rate, ceiling_durable)
    return [
        Figure(
            f"engine: checks recorded/s, {backend}, {count} complete, c={CONCURRENCY}, 20 ms",
            tracker_rate,
            ceiling,
            "/s",
            "/s bare aiohttp status loop",
            ratio,
            f">= {THROUGHPUT_TARGET}",
            ratio is not None and ratio >= THROUGHPUT_TARGET,
            note=what,
        ),
        Figure(
            f"engine: batches checked+stored/s, {backend}, vs a durable bare loop",
            batch_rate,
            ceiling_durable,
            "/s",
            "/s bare aiohttp durable loop",
            ratio_durable,
            f">= {THROUGHPUT_TARGET}",
            ratio_durable is not None and ratio_durable >= THROUGHPUT_TARGET,
            note="whole batches: the check and its file stored, against the durable bare "
            "loop (see its info row)",
        ),
    ]


def cpu_figures(
    backend: str,
    admin: sa.Engine | None,
    count: int,
    bare_cpu: float,
    bare_batch_cpu: float,
    *,
    quick: bool,
) -> list[Figure]:
    """CPU per recorded check with no latency; `bare_cpu` is the bare client's per request,
    `bare_batch_cpu` the durable bare loop's per complete batch."""
    figures = []
    kinds = [(f"complete (check + {FILE_SIZE} B file)", "0")]
    if not quick:
        kinds.append(("in progress (check only)", "3600"))
    for label, delay in kinds:
        prefix = f"cpu{backend[:2]}{delay[:1]}-"
        small = count // 5
        to_state = "ready" if delay == "0" else "processing"
        with (
            temp_dir() as directory,
            fake_api("--completion-delay", delay, "--file-size", str(FILE_SIZE)) as api,
            database(backend, admin, directory) as url,
        ):
            say(f"engine/{backend}: CPU of a sweep over {small}, then over {count} {label}")
            insert_batches(url, [f"{prefix}a{i:07d}" for i in range(small)])
            first, _ = run_sweep(url, api.url, directory, "small")
            checks_small, _ = recorded_window(url, to_state)
            # The first sweep's batches are not due again (checked, or final) now.
            insert_batches(url, [f"{prefix}b{i:07d}" for i in range(count)])
            full, _ = run_sweep(url, api.url, directory, "full")
            checks_total, _ = recorded_window(url, to_state)
        checks = checks_total - checks_small  # recorded by the second sweep
        per_check = (full.cpu - first.cpu) / max(checks - checks_small, 1)
        ratio = ratio_of(per_check, bare_cpu)
        main_figure = delay == "0"
        figures.append(
            Figure(
                f"engine: CPU per recorded check, {backend}, {label}, no latency"
                + ("" if main_figure else " (info)"),
                per_check * 1000,
                bare_cpu * 1000,
                "ms",
                "ms bare aiohttp/request",
                ratio,
                f"<= {CPU_TARGET:g}" if main_figure else "info",
                (ratio is not None and ratio <= CPU_TARGET) if main_figure else None,
                note=(
                    f"(sweep CPU {full.cpu:.2f} s over {checks} checks - {first.cpu:.2f} s "
                    f"over {checks_small}) / {checks - checks_small}"
                ),
            )
        )
        if main_figure:
            ratio_durable = ratio_of(per_check, bare_batch_cpu)
            figures.append(
                Figure(
                    f"engine: CPU per complete batch, {backend}, vs a durable bare loop",
                    per_check * 1000,
                    bare_batch_cpu * 1000,
                    "ms",
                    "ms bare aiohttp durable loop",
                    ratio_durable,
                    f"<= {CPU_TARGET:g}",
                    ratio_durable is not None and ratio_durable <= CPU_TARGET,
                    note="against the durable bare loop (see its info row)",
                )
            )
    return figures


def client_figures(count: int, *, quick: bool) -> tuple[float, float, list[Figure]]:
    """CPU per request of the bare clients (aiohttp is the baseline), no latency."""
    per_request: dict[str, float] = {}
    with fake_api("--completion-delay", "3600") as api:
        for client in BARE_CLIENTS[:1] if quick else BARE_CLIENTS:
            api.reset()
            result = run_bare(api.url, count, client=client, prefix="cl-")
            per_request[client] = result["cpu"] / count
    base = per_request["aiohttp"]
    with (
        temp_dir() as directory,
        fake_api("--completion-delay", "0", "--file-size", str(FILE_SIZE)) as api,
    ):
        durable = run_bare(api.url, count, prefix="clf-", download=True, durable=directory)
    per_batch = durable["cpu"] / count
    figures = [
        Figure(
            "http client: CPU per complete batch, bare aiohttp durable loop (info)",
            per_batch * 1000,
            base * 1000,
            "ms",
            "ms bare aiohttp/request",
            ratio_of(per_batch, base),
            "info",
            None,
            note="the same durable work per batch as the tracker, without a database: "
            + DURABLE_WORK,
        )
    ]
    figures += [
        Figure(
            f"http client: CPU/request, {client} (info)",
            per_request[client] * 1000,
            base * 1000,
            "ms",
            "ms bare aiohttp",
            ratio_of(per_request[client], base),
            "info",
            None,
            note="tracker = tracker.deepvue.make_api_http_client" if client == "tracker" else "",
        )
        for client in per_request
        if client != "aiohttp"
    ]
    return base, per_batch, figures


def run(quick: bool) -> list[Figure]:
    count = 400 if quick else 5000
    admin = pg_admin_engine()
    figures: list[Figure] = []
    try:
        bare_cpu, bare_batch_cpu, client_rows = client_figures(count, quick=quick)
        for backend in backends(admin):
            figures += throughput_figures(backend, admin, count)
        for backend in backends(admin):
            figures += cpu_figures(backend, admin, count, bare_cpu, bare_batch_cpu, quick=quick)
        figures += client_rows
        if admin is None:
            from common import skipped

            figures.append(
                skipped("engine: PostgreSQL figures", ">= 0.8 / <= 3", "no PostgreSQL answered")
            )
    finally:
        if admin is not None:
            admin.dispose()
    return figures


def main(argv: list[str]) -> int:
    if argv[:1] == ["bare"]:
        return bare_main(argv[1:])
    return run_alone("engine.py", run, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
