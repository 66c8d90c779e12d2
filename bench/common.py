"""Shared helpers for the benchmarks: figures, the simulator, databases, processes.

Every benchmark measures the tracker and its baseline side by side in the same run, on
loopback only, and cleans up after itself (temp dirs, `bench_*` PostgreSQL databases).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

REPO = Path(__file__).resolve().parent.parent
# The benchmarks reuse the tests' support modules (simulator processes, settings, the
# PostgreSQL server), which live in the repository, not in the installed package. Appended,
# not prepended, so that an installed tracker still wins over the source tree.
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))

from tests import databases  # noqa: E402
from tests.e2e.support import (  # noqa: E402
    CLIENT_ID,
    CLIENT_SECRET,
    TRACKER,
    FakeApi,
    connection_env,
    migrate,
    start_fake_api,
    wait_until,
)

# Re-exported: the benchmark modules import everything they share from here.
__all__ = ["CLIENT_ID", "CLIENT_SECRET", "TRACKER", "FakeApi", "migrate", "wait_until"]

PYTHON = sys.executable
PG_ADMIN_URL = databases.PG_ADMIN_URL
MIB = 1024 * 1024
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


# --------------------------------------------------------------------------- figures


@dataclass
class Figure:
    """One row of the results table.

    `ratio` is what the target judges unless `target` says otherwise (for example an
    absolute memory limit); `met` is None when the figure could not be measured here.
    """

    name: str
    value: float | None
    baseline: float | None
    unit: str
    baseline_unit: str
    ratio: float | None
    target: str
    met: bool | None
    note: str = ""
    details: list[str] = field(default_factory=list)


def ratio_of(value: float | None, baseline: float | None) -> float | None:
    if value is None or baseline is None or baseline == 0:
        return None
    return value / baseline


def skipped(name: str, target: str, why: str) -> Figure:
    return Figure(name, None, None, "", "", None, target, None, note=f"not measured: {why}")


def _number(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 1:
        text = f"{value:.2f}"
    else:
        text = f"{value:.3g}"
    return f"{text} {unit}".strip()


def _met(figure: Figure, missed: str) -> str:
    if figure.met is None:
        return "info" if figure.target == "info" else "skip"
    return "yes" if figure.met else missed


def format_table(figures: Sequence[Figure]) -> str:
    header = ("figure", "value", "baseline", "ratio", "target", "met")
    rows = [header]
    for figure in figures:
        met = _met(figure, "NO")
        rows.append(
            (
                figure.name,
                _number(figure.value, figure.unit),
                _number(figure.baseline, figure.baseline_unit),
                "-" if figure.ratio is None else f"{figure.ratio:.3g}",
                figure.target,
                met,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)


def format_markdown(figures: Sequence[Figure]) -> str:
    lines = [
        "| figure | value | baseline | ratio | target | met |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for figure in figures:
        met = _met(figure, "**no**")
        ratio = "-" if figure.ratio is None else f"{figure.ratio:.3g}"
        lines.append(
            f"| {figure.name} | {_number(figure.value, figure.unit)} | "
            f"{_number(figure.baseline, figure.baseline_unit)} | {ratio} | {figure.target} | {met} |"
        )
    return "\n".join(lines)


def say(message: str) -> None:
    """Progress on stderr, so stdout stays the table."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the simulator


@contextlib.contextmanager
def fake_api(*args: str) -> Iterator[FakeApi]:
    """`tracker fake-api` in its own process, on a free loopback port."""
    api = start_fake_api("--host", "127.0.0.1", *args)
    try:
        yield api
    finally:
        stop_process(api.process)
        if api.process.stdout is not None:
            api.process.stdout.close()


def stop_process(process: subprocess.Popen[Any], timeout: float = 20.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout)


async def authorize(http: Any, api_url: str) -> dict[str, str]:
    """The headers of an authorized status call, as the tracker sends them (httpx client)."""
    response = await http.post(
        f"{api_url}/v1/authorize", data={"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
    )
    response.raise_for_status()
    token = response.json()["access_token"]
    return {"Authorization": f"Bearer {token}", "x-api-key": CLIENT_SECRET}


# --------------------------------------------------------------------------- databases


def pg_admin_engine() -> sa.Engine | None:
    """An AUTOCOMMIT engine on the PostgreSQL server, or None when none answers."""
    try:
        return databases.pg_admin_engine()
    except sa.exc.OperationalError:
        return None


@contextlib.contextmanager
def pg_database(admin: sa.Engine) -> Iterator[str]:
    """A fresh, migrated `bench_*` database of our own, dropped afterwards."""
    name = f"bench_{uuid.uuid4().hex[:12]}"
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = databases.with_database(PG_ADMIN_URL, name)
    try:
        migrate(url)
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@contextlib.contextmanager
def temp_dir(prefix: str = "tracker-bench-") -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def sqlite_database(directory: Path) -> Iterator[str]:
    url = f"sqlite:///{directory / 'tracker.db'}"
    migrate(url)
    yield url


@contextlib.contextmanager
def database(backend: str, admin: sa.Engine | None, directory: Path) -> Iterator[str]:
    if backend == "sqlite":
        with sqlite_database(directory) as url:
            yield url
    else:
        assert admin is not None
        with pg_database(admin) as url:
            yield url


def backends(admin: sa.Engine | None) -> list[str]:
    return ["sqlite", "postgresql"] if admin is not None else ["sqlite"]


def insert_batches(
    url: str, request_ids: Sequence[str], *, next_check_at: datetime | None = None
) -> None:
    """Bulk INSERT as another application would: one executemany in one transaction."""
    from tracker.db import create_engine_for
    from tracker.schema import batches

    engine = create_engine_for(url)
    try:
        with engine.begin() as connection:
            connection.execute(
                batches.insert(),
                [{"request_id": rid, "next_check_at": next_check_at} for rid in request_ids],
            )
    finally:
        engine.dispose()


def count_states(url: str) -> dict[str, int]:
    from tracker.db import create_engine_for
    from tracker.store import Store

    engine = create_engine_for(url)
    try:
        return Store(engine).count_by_state()
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- processes


def tracker_env(database_url: str, api_url: str, output_dir: Path, **extra: str) -> dict[str, str]:
    """Settings for a tracker subprocess; the rate limits are high enough never to throttle."""
    return (
        connection_env(database_url, api_url, output_dir)
        | {
            "HOME": os.environ.get("HOME", "/tmp"),
            "TRACKER_RATE_PER_SECOND": "1000000",
            "TRACKER_RATE_PER_MINUTE": "100000000",
            "TRACKER_RATE_PER_DAY": "1000000000",
            "TRACKER_LOG_LEVEL": "info",
        }
        | extra
    )


@dataclass
class Finished:
    returncode: int
    wall: float
    cpu: float  # user + system seconds of the child itself
    # Bytes. Not from rusage: Linux carries the forking parent's peak across exec into
    # ru_maxrss, so the benchmark's own memory would be counted. VmHWM is the child's.
    max_rss: int


def reap(pid: int, deadline: float, *, poll: float) -> tuple[int, Any] | None:
    """Wait for child `pid` until `deadline` (monotonic): its wait status and its own
    rusage (wait4), or None if it is still running then."""
    while True:
        found, status, usage = os.wait4(pid, os.WNOHANG)
        if found:
            return status, usage
        if time.monotonic() > deadline:
            return None
        time.sleep(poll)


def run_measured(
    command: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    stdout: Any = subprocess.DEVNULL,
    stderr: Any = subprocess.DEVNULL,
    timeout: float = 600.0,
) -> Finished:
    """Run a child to completion; its own rusage (wait4), not that of other children."""
    started = time.monotonic()
    process = subprocess.Popen(command, env=env, stdout=stdout, stderr=stderr)
    reaped = reap(process.pid, started + timeout, poll=0.005)
    if reaped is None:
        process.kill()
        os.wait4(process.pid, 0)
        raise TimeoutError(f"{' '.join(command[:4])} took longer than {timeout:g} s")
    status, usage = reaped
    wall = time.monotonic() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    return Finished(
        returncode=process.returncode,
        wall=wall,
        cpu=usage.ru_utime + usage.ru_stime,
        max_rss=0,
    )


def imports_peak_rss(imports: str) -> int:
    """Peak RSS (VmHWM) of a fresh interpreter that ran `imports`."""
    code = (
        f"{imports}\n"
        "for line in open('/proc/self/status'):\n"
        "    if line.startswith('VmHWM:'): print(int(line.split()[1]) * 1024)\n"
    )
    output = subprocess.run(
        [PYTHON, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return int(output.stdout.split()[-1])


@dataclass(frozen=True)
class ProcSample:
    cpu: float  # seconds (utime + stime)
    rss: int  # bytes, now
    peak_rss: int  # bytes, VmHWM


def sample_process(pid: int) -> ProcSample:
    """CPU and memory of a running process, from /proc/<pid>/stat and status."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name may hold spaces: fields start after the closing parenthesis.
    fields = stat[stat.rindex(")") + 2 :].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    rss = peak = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
        elif line.startswith("VmHWM:"):
            peak = int(line.split()[1]) * 1024
    return ProcSample(cpu=cpu, rss=rss, peak_rss=peak)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def log_events(path: Path) -> list[dict[str, Any]]:
    events = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
    return events


def event_time(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def utcnow() -> datetime:
    return datetime.now(UTC)


def machine_summary() -> str:
    """One line about the machine, for the results file."""
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = os.sysconf("SC_PHYS_PAGES") * PAGE_SIZE / 1024**3
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{os.cpu_count()} x {model}, {memory:.0f} GiB RAM, Python {sys.version.split()[0]}, "
        f"load average {load}"
    )


# --------------------------------------------------------------------------- the daemon


@dataclass
class RunningDaemon:
    """`tracker run` as a child whose rusage we collect ourselves (never Popen.poll)."""

    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        # A zombie still answers kill(0); /proc says whether it is one.
        with contextlib.suppress(OSError):
            state = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            return state != "Z"
        return False

    def events(self) -> list[dict[str, Any]]:
        return log_events(self.log_path)

    def wait_for_event(self, name: str, timeout: float) -> dict[str, Any]:
        found: list[dict[str, Any]] = []

        def seen() -> bool:
            if not self.alive():
                raise RuntimeError(f"tracker run exited early; see {self.log_path}")
            found[:] = [e for e in self.events() if e.get("event") == name]
            return bool(found)

        wait_until(seen, timeout, f"the daemon to log {name}", poll=0.02)
        return found[0]

    def stop(self, timeout: float = 30.0) -> Finished:
        """SIGTERM, then reap; `max_rss` is the peak (VmHWM) just before the signal."""
        started = time.monotonic()
        peak = 0
        with contextlib.suppress(OSError):
            peak = sample_process(self.pid).peak_rss
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        reaped = reap(self.pid, started + timeout, poll=0.01)
        if reaped is None:
            os.kill(self.pid, signal.SIGKILL)
            _, status, usage = os.wait4(self.pid, 0)
        else:
            status, usage = reaped
        self.process.returncode = os.waitstatus_to_exitcode(status)
        return Finished(
            returncode=self.process.returncode,
            wall=time.monotonic() - started,
            cpu=usage.ru_utime + usage.ru_stime,
            max_rss=peak,
        )


@contextlib.contextmanager
def running_daemon(env: dict[str, str], log_path: Path) -> Iterator[RunningDaemon]:
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [*TRACKER, "run"], env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
    daemon = RunningDaemon(process, log_path)
    try:
        yield daemon
    finally:
        if daemon.process.returncode is None:
            daemon.stop()


def run_alone(
    prog: str, run: Callable[[bool], Sequence[Figure]], argv: list[str], description: str = ""
) -> int:
    """`main()` of a benchmark module run on its own: figures, notes, exit 1 if a target is missed."""
    parser = argparse.ArgumentParser(prog=prog, description=description or None)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, a quick look")
    args = parser.parse_args(argv)
    figures = run(args.quick)
    print(format_table(figures))
    for figure in figures:
        if figure.note:
            print(f"- {figure.name}: {figure.note}")
        for line in figure.details:
            print(f"    {line}")
    return 0 if all(figure.met is not False for figure in figures) else 1
