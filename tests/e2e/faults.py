"""Fault injection for the end-to-end tests: a TCP relay that can be cut, process helpers.

Everything here runs real sockets and real processes on loopback; nothing is mocked.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import resource
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from tests.e2e.support import TRACKER, Daemon, FakeApi, query, tracker_env, wait_until

__all__ = [
    "TRICKLED",
    "CannotMount",
    "DaemonLauncher",
    "TcpProxy",
    "events",
    "fault_env",
    "fetching",
    "full_downloads",
    "limit_file_size",
    "part_files",
    "sim_stats",
    "small_tmpfs",
    "terminate_backends",
    "wait_for_event",
    "wait_for_lost_ownership",
    "wait_for_part_file",
    "with_umask",
]


class TcpProxy:
    """A loopback TCP relay in front of one server (PostgreSQL here) that can be cut.

    `cut()` stops listening, so new connections are refused, and resets every relayed
    connection, as a crashed or unreachable server would. `restore()` listens again on the
    same port. The relay runs its own event loop on a daemon thread; its methods are safe to
    call from the test's thread.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = 0
        self.accepted = 0
        self.reset = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.WriteTransport] = set()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="tcp-proxy", daemon=True
        )

    def __enter__(self) -> TcpProxy:
        self._thread.start()
        self._call(self._listen())
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._call(self._cut())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def url_for(self, database_url: str) -> str:
        """`database_url` with its host and port replaced by this relay's."""
        url = sa.make_url(database_url).set(host="127.0.0.1", port=self.port)
        return url.render_as_string(hide_password=False)

    def cut(self) -> int:
        """Refuse new connections and reset the live ones; how many were reset."""
        result: int = self._call(self._cut())
        return result

    def restore(self) -> None:
        self._call(self._listen())

    def _call(self, coroutine: Any) -> Any:
        future: concurrent.futures.Future[Any] = asyncio.run_coroutine_threadsafe(
            coroutine, self._loop
        )
        return future.result(timeout=10)

    async def _listen(self) -> None:
        if self._server is not None:
            return
        # reuse_address: the old listener's port is reused at once, as a restarted server's.
        self._server = await asyncio.start_server(
            self._relay, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _cut(self) -> int:
        if self._server is not None:
            self._server.close()
            self._server = None
        transports = list(self._transports)
        self._transports.clear()
        for transport in transports:
            # abort() sends RST: the peer learns at once, as when a server process dies.
            transport.abort()
        self.reset += len(transports)
        return len(transports)

    async def _relay(
        self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter
    ) -> None:
        self.accepted += 1
        try:
            upstream_reader, upstream = await asyncio.open_connection(
                self.target_host, self.target_port
            )
        except OSError:
            client.transport.abort()
            return
        pair = (client.transport, upstream.transport)
        self._transports.update(pair)
        try:
            await asyncio.gather(_pipe(client_reader, upstream), _pipe(upstream_reader, client))
        finally:
            for transport in pair:
                self._transports.discard(transport)
                transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(OSError):
        if not writer.is_closing():
            writer.write_eof()


# Bytes of a `trickle-` file: about 4 s at the simulator's 2 KiB/s.
TRICKLED = 8192


# --------------------------------------------------------------------------- processes


def with_umask(mask: int) -> Callable[[], None]:
    """A preexec_fn giving the child process `mask` as its umask."""

    def apply() -> None:
        os.umask(mask)

    return apply


def limit_file_size(max_bytes: int) -> Callable[[], None]:
    """A preexec_fn capping every file the child writes at `max_bytes` (RLIMIT_FSIZE).

    Python ignores SIGXFSZ, so a write past the cap fails with EFBIG, as on a full disk.
    """

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return apply


@dataclass
class DaemonLauncher:
    """Starts `tracker run` subprocesses (optionally with a preexec_fn) and reaps them."""

    log_dir: Path
    started: list[Daemon]

    def __call__(
        self, env: dict[str, str], *, preexec_fn: Callable[[], None] | None = None
    ) -> Daemon:
        log_path = self.log_dir / f"daemon-{len(self.started)}.log"
        with log_path.open("w") as log_file:
            process = subprocess.Popen(
                [*TRACKER, "run"],
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                text=True,
                preexec_fn=preexec_fn,
            )
        daemon = Daemon(process, log_path)
        self.started.append(daemon)
        return daemon

    def reap(self) -> None:
        for daemon in self.started:
            if daemon.process.poll() is None:
                # A SIGSTOPped process must be continued, or SIGKILL is the only way out.
                with contextlib.suppress(ProcessLookupError):
                    daemon.process.send_signal(signal.SIGCONT)
                daemon.process.kill()
                daemon.process.wait(timeout=10)

    @contextlib.contextmanager
    def reaping(self) -> Iterator[DaemonLauncher]:
        try:
            yield self
        finally:
            self.reap()


def events(daemon: Daemon, name: str) -> list[dict[str, object]]:
    """The daemon's log lines with this event name (every line must be JSON)."""
    return [line for line in daemon.log_lines() if line.get("event") == name]


def wait_for_event(daemon: Daemon, name: str, timeout: float, count: int = 1) -> None:
    wait_until(
        lambda: f'"{name}"' in daemon.log_path.read_text() and len(events(daemon, name)) >= count,
        timeout,
        f"{count} x {name} in {daemon.log_path.name}",
    )


# --------------------------------------------------------------------------- database


def terminate_backends(admin_url: str, database_url: str) -> int:
    """pg_terminate_backend on every session connected to `database_url`'s database."""
    name = sa.make_url(database_url).database
    rows = query(
        admin_url,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = :name AND pid <> pg_backend_pid()",
        name=name,
    )
    return sum(1 for (done,) in rows if done)


# --------------------------------------------------------------------------- files


class CannotMount(Exception):
    """This environment may not mount a tmpfs (no root, or no CAP_SYS_ADMIN)."""


@contextlib.contextmanager
def small_tmpfs(mount_point: Path, size: int) -> Iterator[Callable[[int], None]]:
    """A tmpfs of `size` bytes at `mount_point`: a real disk that fills up (ENOSPC).

    Yields a function that resizes it in place, as an operator freeing space would.
    """
    mount_point.mkdir(mode=0o750)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0750", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        raise CannotMount(mounted.stderr.strip() or f"mount exited {mounted.returncode}")

    def resize(new_size: int) -> None:
        subprocess.run(
            ["mount", "-o", f"remount,size={new_size}", str(mount_point)],
            check=True,
            capture_output=True,
        )

    try:
        yield resize
    finally:
        subprocess.run(["umount", "--lazy", str(mount_point)], check=False, capture_output=True)


def part_files(output_dir: Path) -> list[str]:
    """Temp files of downloads in progress (or left behind)."""
    if not output_dir.exists():
        return []
    return sorted(p.name for p in output_dir.iterdir() if p.name.endswith(".part"))


def sim_stats(api: FakeApi) -> dict[str, Any]:
    """The simulator's /_sim/stats, typed for reading."""
    stats: dict[str, Any] = api.stats()
    return stats


def full_downloads(stats: dict[str, Any]) -> dict[str, int]:
    """Per file path, how many GETs asked for the whole file (Range resumes excluded)."""
    counts: dict[str, int] = {}
    for request in stats["downloads"]:
        if request["method"] == "GET" and "range" not in request["headers"]:
            counts[request["path"]] = counts.get(request["path"], 0) + 1
    return counts


def wait_for_part_file(output_dir: Path, timeout: float, *, min_bytes: int = 1) -> str:
    """Poll fast for a temp file holding at least `min_bytes`; its name."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError), os.scandir(output_dir) as entries:
            for entry in entries:
                if entry.name.endswith(".part"):
                    with contextlib.suppress(FileNotFoundError):
                        if entry.stat().st_size >= min_bytes:
                            return entry.name
        time.sleep(0.005)
    raise AssertionError(f"no .part file of {min_bytes}+ bytes in {output_dir} within {timeout} s")


def fetching(api: FakeApi, request_id: str) -> bool:
    """The file host has received a GET for this batch's output."""
    return f"/upi-basic-batch-output-files/{request_id}.csv" in full_downloads(sim_stats(api))


def wait_for_lost_ownership(daemon: Daemon) -> None:
    wait_until(
        lambda: bool(events(daemon, "batch.conflict") or events(daemon, "download.ownership_lost")),
        30,
        "the paused instance to notice it lost the batch",
    )


def fault_env(database_url: str, api_url: str, output_dir: Path, **extra: str) -> dict[str, str]:
    """tracker_env with a day budget so large that polling paces itself by the intervals.

    The budget-aware schedule stretches check intervals so that the open batches could be
    polled for a whole day within TRACKER_RATE_PER_DAY; these tests are about faults, not
    about the quota economy, so they keep the configured sub-second intervals.
    """
    extra.setdefault("TRACKER_RATE_PER_DAY", "10000000")
    return tracker_env(database_url, api_url, output_dir, **extra)
