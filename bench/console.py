"""The console: a page costs little more than the SQL behind it, and the process stays small.

Data, per backend: 1,000,000 finished batches (one in 50 failed, with its last error) and
10,000 unfinished ones of every age (--quick: 100,000 finished), each set bulk-loaded by one
statement, a day of call counts in the budget and two instances; then ANALYZE, as autovacuum
or an operator would have run by then.

Render: `tracker web` as a child process on a free loopback port. Each page is fetched over
HTTP with the bearer token (one kept-alive connection), timed from the request to the last
byte. Bare SQL: the statements that page's reads issue, captured from the same code
(tracker.console.queries) in this process with their parameters and transaction ends, and
replayed on a raw DBAPI connection, every row fetched. The two alternate run by run, after
one warm-up; the figure is the ratio of their medians.

Memory: VmRSS and VmHWM of the `tracker web` process once it has served every page of every
run, from /proc.

Run alone: `python bench/console.py [--quick]`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    MIB,
    TRACKER,
    Figure,
    backends,
    database,
    imports_peak_rss,
    median,
    pg_admin_engine,
    ratio_of,
    run_alone,
    sample_process,
    say,
    skipped,
    stop_process,
    temp_dir,
    wait_until,
)
from history import analyze

if TYPE_CHECKING:
    from tracker.console.queries import ConsoleQueries

UNFINISHED = 10_000
RATIO_TARGET = 3.0
RSS_LIMIT = 80 * MIB
# What the console imports beyond the standard library, for the memory row's baseline.
BASELINE_IMPORTS = "import sqlalchemy, aiohttp, jinja2"

# Finished rows look like real ones: a file for the downloaded, an error for the failed,
# created over the last few weeks in id order, with labels. One statement each.
_PG_FINISHED = """
INSERT INTO tracker_batches (request_id, label, state, created_at, updated_at, finished_at,
                             checks, api_status, api_message, file_path, file_size, file_sha256,
                             last_error)
SELECT 'done-' || n, 'label-' || (n % 20),
       CASE WHEN n % 50 = 0 THEN 'failed' ELSE 'downloaded' END,
       t, t + interval '1 hour', t + interval '1 hour', 3, 200,
       CASE WHEN n % 50 = 0 THEN 'batch processing failed' ELSE 'batch processing completed' END,
       CASE WHEN n % 50 = 0 THEN NULL ELSE '/srv/out/done-' || n || '.csv' END,
       CASE WHEN n % 50 = 0 THEN NULL ELSE 4096 END,
       CASE WHEN n % 50 = 0 THEN NULL ELSE md5(n::text) || md5(n::text) END,
       CASE WHEN n % 50 = 0 THEN 'Deepvue reported the batch failed' END
FROM generate_series(1, :rows) AS n,
     LATERAL (SELECT now() - interval '2 days' - (:rows - n) * interval '2 seconds') AS at(t)
"""
_SQLITE_FINISHED = """
WITH RECURSIVE seq(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM seq WHERE n < :rows)
INSERT INTO tracker_batches (request_id, label, state, created_at, updated_at, finished_at,
                             checks, api_status, api_message, file_path, file_size, file_sha256,
                             last_error)
SELECT 'done-' || n, 'label-' || (n % 20),
       CASE WHEN n % 50 = 0 THEN 'failed' ELSE 'downloaded' END,
       datetime('now', '-' || (172800 + (:rows - n) * 2) || ' seconds'),
       datetime('now', '-' || (169200 + (:rows - n) * 2) || ' seconds'),
       datetime('now', '-' || (169200 + (:rows - n) * 2) || ' seconds'), 3, 200,
       CASE WHEN n % 50 = 0 THEN 'batch processing failed' ELSE 'batch processing completed' END,
       CASE WHEN n % 50 = 0 THEN NULL ELSE '/srv/out/done-' || n || '.csv' END,
       CASE WHEN n % 50 = 0 THEN NULL ELSE 4096 END,
       CASE WHEN n % 50 = 0 THEN NULL ELSE printf('%064d', n) END,
       CASE WHEN n % 50 = 0 THEN 'Deepvue reported the batch failed' END
FROM seq
"""
# Unfinished rows of every age the overview buckets (up to 10 days), due in the next hour.
_PG_UNFINISHED = """
INSERT INTO tracker_batches (request_id, label, state, created_at, updated_at, next_check_at,
                             checks, api_status, api_message)
SELECT 'open-' || n, 'label-' || (n % 20), CASE WHEN n % 10 = 0 THEN 'pending' ELSE 'processing' END,
       now() - (n * 86.4) * interval '1 second', now(), now() + (n % 3600) * interval '1 second',
       n % 7, 200, 'batch processing in progress'
FROM generate_series(1, :rows) AS n
"""
_SQLITE_UNFINISHED = """
WITH RECURSIVE seq(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM seq WHERE n < :rows)
INSERT INTO tracker_batches (request_id, label, state, created_at, updated_at, next_check_at,
                             checks, api_status, api_message)
SELECT 'open-' || n, 'label-' || (n % 20), CASE WHEN n % 10 = 0 THEN 'pending' ELSE 'processing' END,
       datetime('now', '-' || CAST(n * 86.4 AS INTEGER) || ' seconds'), datetime('now'),
       datetime('now', '+' || (n % 3600) || ' seconds'),
       n % 7, 200, 'batch processing in progress'
FROM seq
"""


def load_rows(engine: sa.Engine, finished: int, unfinished: int) -> float:
    """Bulk-load the finished and unfinished batches; seconds taken."""
    started = time.monotonic()
    postgres = engine.dialect.name == "postgresql"
    with engine.begin() as connection:
        if postgres:
            # A wake-up NOTIFY per row is pointless work for a bulk load.
            connection.execute(sa.text("ALTER TABLE tracker_batches DISABLE TRIGGER USER"))
        if finished:  # (SQLite's recursive count starts at 1 whatever the limit)
            connection.execute(
                sa.text(_PG_FINISHED if postgres else _SQLITE_FINISHED), {"rows": finished}
            )
        connection.execute(
            sa.text(_PG_UNFINISHED if postgres else _SQLITE_UNFINISHED), {"rows": unfinished}
        )
        if postgres:
            connection.execute(sa.text("ALTER TABLE tracker_batches ENABLE TRIGGER USER"))
    return time.monotonic() - started


def load_budget_and_instances(engine: sa.Engine) -> None:
    """A day of status calls (Starter's 1,000, minute by minute) and two live instances."""
    from tracker.schema import quota_usage
    from tracker.store import Store

    store = Store(engine)
    now = time.time()
    minute = int(now // 60)
    with engine.begin() as connection:
        connection.execute(
            quota_usage.insert(),
            [
                {"window_name": "day", "bucket": minute - age, "used": 1}
                for age in range(0, 1440)
                if age % 36 < 25  # about 1,000 in the day, with quiet stretches
            ],
        )
    for number in (1, 2):
        owner = f"bench-host-{number}:{1000 + number}:cafe000{number}"
        store.register_instance(owner, f"bench-host-{number}", 1000 + number, None)


# --------------------------------------------------------------------------- the SQL behind a page

COMMIT = "-- commit"
ROLLBACK = "-- rollback"
Statement = tuple[str, Any]


@contextlib.contextmanager
def captured_sql(engine: sa.Engine) -> Iterator[list[Statement]]:
    """Every statement `engine` sends, with its parameters, and where transactions end."""
    captured: list[Statement] = []

    def statement(_conn: Any, _cursor: Any, text: str, parameters: Any, *_: Any) -> None:
        captured.append((text, parameters))

    def commit(_conn: Any) -> None:
        captured.append((COMMIT, None))

    def rollback(_conn: Any) -> None:
        captured.append((ROLLBACK, None))

    def reset(_dbapi: Any, _record: Any, *_: Any) -> None:
        # A connection going back to the pool is rolled back (its read transaction ends).
        captured.append((ROLLBACK, None))

    listeners: list[tuple[Any, str, Callable[..., None]]] = [
        (engine, "before_cursor_execute", statement),
        (engine, "commit", commit),
        (engine, "rollback", rollback),
        (engine.pool, "reset", reset),
    ]
    for target, name, listener in listeners:
        sa.event.listen(target, name, listener)
    try:
        yield captured
    finally:
        for target, name, listener in listeners:
            sa.event.remove(target, name, listener)


def replay(raw: Any, statements: list[Statement]) -> None:
    """Run `statements` as they were sent, on a bare DBAPI connection, fetching every row."""
    cursor = raw.cursor()
    try:
        for text, parameters in statements:
            if text == COMMIT:
                raw.commit()
            elif text == ROLLBACK:
                raw.rollback()
            else:
                cursor.execute(text, parameters)
                if cursor.description is not None:
                    cursor.fetchall()
    finally:
        cursor.close()


@dataclass(frozen=True)
class Page:
    name: str
    path: str
    heading: str  # the <h1> the answer must hold: the page rendered, not an error
    read: Callable[[ConsoleQueries], object]  # the reads behind the page


def pages(deep_id: int) -> list[Page]:
    from tracker.console.cursor import encode_cursor
    from tracker.console.queries import ListFilters

    def page_of(
        filters: ListFilters, before_id: int | None = None
    ) -> Callable[[ConsoleQueries], object]:
        return lambda queries: queries.batch_list(filters, before_id)

    return [
        Page("overview", "/", "Overview", lambda queries: queries.overview()),
        Page("list, first page", "/batches", "Batches", page_of(ListFilters())),
        Page(
            "list, state=processing",
            "/batches?state=processing",
            "Batches",
            page_of(ListFilters(state="processing")),
        ),
        Page(
            "list, request_id prefix",
            "/batches?q=done-12345",
            "Batches",
            page_of(ListFilters(request_id_prefix="done-12345")),
        ),
        Page(
            "list, a page deep in the table",
            f"/batches?cursor={encode_cursor(deep_id)}",
            "Batches",
            page_of(ListFilters(), deep_id),
        ),
    ]


@dataclass(frozen=True)
class ConsoleReads:
    """The console's reads, built as `tracker web` builds them, and the engine under them."""

    queries: ConsoleQueries
    engine: sa.Engine


@contextlib.contextmanager
def console_reads(url: str) -> Iterator[ConsoleReads]:
    from tracker.console.queries import ConsoleQueries
    from tracker.db import create_engine_for
    from tracker.services import make_budget, make_store
    from tracker.settings import load_settings

    settings = load_settings({"TRACKER_DATABASE_URL": url})
    engine = create_engine_for(url)
    try:
        queries = ConsoleQueries(
            make_store(settings, engine),
            make_budget(settings, engine),
            heartbeat_timeout=settings.heartbeat_timeout,
        )
        yield ConsoleReads(queries, engine)
    finally:
        engine.dispose()


def page_statements(reads: ConsoleReads, page: Page) -> list[Statement]:
    """The SQL `page` runs, captured from the console's own reads."""
    page.read(reads.queries)  # the first call connects and warms caches; capture the second
    with captured_sql(reads.engine) as captured:
        page.read(reads.queries)
    return list(captured)


def read_seconds(reads: ConsoleReads, page: Page) -> float:
    started = time.perf_counter()
    page.read(reads.queries)
    return time.perf_counter() - started


def query_plan(raw: Any, dialect: str, statements: list[Statement]) -> list[str]:
    """EXPLAIN of each SELECT among `statements` (not executed)."""
    lines: list[str] = []
    cursor = raw.cursor()
    try:
        for text, parameters in statements:
            if not text.lstrip().upper().startswith("SELECT"):
                continue
            first_line = " ".join(text.split())[:90]
            lines.append(f"{first_line} ...")
            if dialect == "postgresql":
                cursor.execute("EXPLAIN " + text, parameters)
                lines += ["  " + row[0] for row in cursor.fetchall()]
            else:
                cursor.execute("EXPLAIN QUERY PLAN " + text, parameters)
                lines += ["  " + row[3] for row in cursor.fetchall()]
        raw.rollback()
    finally:
        cursor.close()
    return lines


# --------------------------------------------------------------------------- `tracker web`


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def running_console(url: str, log_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, str]]:
    """`tracker web` over `url` on a free loopback port: (process, base URL, token)."""
    import httpx

    token = secrets.token_urlsafe(24)
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "TRACKER_DATABASE_URL": url,
        "TRACKER_CONSOLE_ADDR": f"127.0.0.1:{port}",
        "TRACKER_CONSOLE_TOKEN": token,
        "TRACKER_LOG_FORMAT": "json",
    }
    base = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [*TRACKER, "web"], env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
    try:

        def answering() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"tracker web exited early; see {log_path}")
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"{base}/login", timeout=2).status_code == 200
            return False

        wait_until(answering, 30, "tracker web to answer", poll=0.05)
        yield process, base, token
    finally:
        stop_process(process)


def fetch_seconds(client: Any, page: Page) -> float:
    started = time.perf_counter()
    response = client.get(page.path)
    elapsed = time.perf_counter() - started
    if response.status_code != 200 or f"<h1>{page.heading}" not in response.text:
        raise RuntimeError(f"GET {page.path} answered {response.status_code}, not the page")
    return elapsed


def sql_seconds(raw: Any, statements: list[Statement]) -> float:
    started = time.perf_counter()
    replay(raw, statements)
    return time.perf_counter() - started


# --------------------------------------------------------------------------- figures


def console_figures(
    backend: str, admin: sa.Engine | None, finished: int, runs: int, size_note: str
) -> list[Figure]:
    import httpx

    from tracker.db import create_engine_for

    with ExitStack() as stack:
        directory = stack.enter_context(temp_dir())
        url = stack.enter_context(database(backend, admin, directory))
        engine = create_engine_for(url)
        stack.callback(engine.dispose)
        say(f"console/{backend}: bulk-loading {finished:,} finished and {UNFINISHED:,} unfinished")
        load_seconds = load_rows(engine, finished, UNFINISHED)
        load_budget_and_instances(engine)
        analyze(engine)
        # The same console over the unfinished batches alone: what the finished ones cost.
        empty_directory = stack.enter_context(temp_dir())
        empty_url = stack.enter_context(database(backend, admin, empty_directory))
        empty_engine = create_engine_for(empty_url)
        stack.callback(empty_engine.dispose)
        load_rows(empty_engine, 0, UNFINISHED)
        load_budget_and_instances(empty_engine)
        analyze(empty_engine)
        with engine.connect() as connection:
            top = int(
                connection.execute(sa.text("SELECT max(id) FROM tracker_batches")).scalar_one()
            )
        chosen = pages(deep_id=top // 2)
        reads = stack.enter_context(console_reads(url))
        statements = {page.name: page_statements(reads, page) for page in chosen}
        raw = engine.raw_connection()
        stack.callback(raw.close)
        plans = {
            page.name: query_plan(raw, engine.dialect.name, statements[page.name])
            for page in chosen
        }
        process, base, token = stack.enter_context(running_console(url, directory / "console.log"))
        client = stack.enter_context(
            httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        )
        _, empty_base, empty_token = stack.enter_context(
            running_console(empty_url, empty_directory / "console.log")
        )
        empty_client = stack.enter_context(
            httpx.Client(
                base_url=empty_base, headers={"Authorization": f"Bearer {empty_token}"}, timeout=60
            )
        )
        rendered: dict[str, list[float]] = {page.name: [] for page in chosen}
        bare: dict[str, list[float]] = {page.name: [] for page in chosen}
        in_process: dict[str, list[float]] = {page.name: [] for page in chosen}
        without_finished: dict[str, list[float]] = {page.name: [] for page in chosen}
        say(f"console/{backend}: {runs} runs of {len(chosen)} pages, page and SQL alternating")
        for run in range(runs + 1):
            for page in chosen:
                # Alternate which goes first, so neither always meets the other's warm cache.
                if run % 2:
                    page_time = fetch_seconds(client, page)
                    sql_time = sql_seconds(raw, statements[page.name])
                else:
                    sql_time = sql_seconds(raw, statements[page.name])
                    page_time = fetch_seconds(client, page)
                # Where the rest goes: the same reads through the console's own code, here.
                read_time = read_seconds(reads, page)
                empty_time = fetch_seconds(empty_client, page)
                if run:  # the first run only warms caches, pools and templates
                    rendered[page.name].append(page_time)
                    bare[page.name].append(sql_time)
                    in_process[page.name].append(read_time)
                    without_finished[page.name].append(empty_time)
        memory = sample_process(process.pid)
    figures = []
    for page in chosen:
        value, baseline = median(rendered[page.name]), median(bare[page.name])
        ratio = ratio_of(value, baseline)
        figures.append(
            Figure(
                f"console: {page.name}, {backend}, {size_note}",
                value * 1000,
                baseline * 1000,
                "ms",
                "ms bare SQL",
                ratio,
                f"<= {RATIO_TARGET:g}",
                ratio is not None and ratio <= RATIO_TARGET,
                note=(
                    f"GET {page.path} over loopback HTTP with the bearer token, against its "
                    f"{sum(1 for s, _ in statements[page.name] if not s.startswith('--'))} "
                    f"statement(s) replayed bare; the same reads through the console's code "
                    f"in-process took {median(in_process[page.name]) * 1000:.2f} ms; the page "
                    f"with only the {UNFINISHED:,} unfinished took "
                    f"{median(without_finished[page.name]) * 1000:.2f} ms; median of "
                    f"{runs} alternating runs; rows bulk-loaded in {load_seconds:.1f} s"
                ),
                details=[f"query plans ({backend}):", *plans[page.name]]
                if page.name in ("overview", "list, request_id prefix")
                else [],
            )
        )
    baseline_peak = imports_peak_rss(BASELINE_IMPORTS)
    figures.append(
        Figure(
            f"console: tracker web peak RSS, {backend}, {size_note}",
            memory.peak_rss / MIB,
            baseline_peak / MIB,
            "MiB",
            f"MiB for {BASELINE_IMPORTS!r}",
            ratio_of(memory.peak_rss, baseline_peak),
            f"<= {RSS_LIMIT // MIB} MiB",
            memory.peak_rss <= RSS_LIMIT,
            note=(
                f"VmHWM after serving {len(chosen)} pages x {runs + 1} runs; VmRSS then "
                f"{memory.rss / MIB:.1f} MiB"
            ),
        )
    )
    return figures


def run(quick: bool) -> list[Figure]:
    finished = 100_000 if quick else 1_000_000
    runs = 5 if quick else 15
    size_note = f"{finished:,} finished + {UNFINISHED:,} unfinished"
    admin = pg_admin_engine()
    figures: list[Figure] = []
    try:
        # PostgreSQL first: the backend a console beside several instances reads.
        for backend in reversed(backends(admin)):
            figures += console_figures(backend, admin, finished, runs, size_note)
        if admin is None:
            figures.append(
                skipped("console: PostgreSQL", f"<= {RATIO_TARGET:g}", "no PostgreSQL answered")
            )
    finally:
        if admin is not None:
            admin.dispose()
    return figures


def main(argv: list[str]) -> int:
    return run_alone("console.py", run, argv, __doc__.splitlines()[0] if __doc__ else "")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
