"""SIGTERM/SIGINT while `tracker run` is still starting up: exit 0, never death by signal.

Nothing is claimed before the daemon's own handlers are in place, so a signal that
early means "stop before anything started" (issue 9, item 9).
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.support import TRACKER, FakeApi, plain_env, tracker_env

pytestmark = pytest.mark.e2e

SIGNALS = [pytest.param(signal.SIGTERM, id="SIGTERM"), pytest.param(signal.SIGINT, id="SIGINT")]


def _stat_state(pid: int) -> str:
    """The one-letter scheduler state of `pid` (R running, S sleeping in a syscall, ...)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2]


def _catches_sigterm(pid: int) -> bool:
    """/proc says a handler is installed for SIGTERM (bit 15 of SigCgt)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool((int(line.split()[1], 16) >> (signal.SIGTERM - 1)) & 1)
    return False


def _poll(
    process: subprocess.Popen[str], condition: Callable[[], bool], what: str, timeout: float = 60
) -> None:
    """Poll tightly (1 ms) until `condition()`; fail at once if the process ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"tracker run exited ({process.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.001)


class _FifoWriter:
    """The write end of a FIFO, opened only once a reader is opening it.

    A non-blocking open for writing fails with ENXIO while nobody opens the FIFO for
    reading. Once it succeeds the reader's open() returns and its read() blocks for good:
    nothing is ever written, and the write end stays open until `close()`.
    """

    def __init__(self, fifo: Path) -> None:
        self.fifo = fifo
        self.fd: int | None = None

    def try_open(self) -> bool:
        try:
            self.fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as error:
            if error.errno != errno.ENXIO:
                raise
            return False
        return True

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@pytest.mark.parametrize("sig", SIGNALS)
def test_signal_while_settings_load_blocks_exits_0(
    tmp_path: Path, sqlite_url: str, sig: signal.Signals
) -> None:
    """Settings loading blocks in a syscall (reading a FIFO nobody writes); a signal there
    ends the process with exit 0 at once. Before the fix SIGTERM killed it (-15) and
    SIGINT ended it with exit 1."""
    fifo = tmp_path / "tracker.toml"
    os.mkfifo(fifo)
    env = plain_env(sqlite_url, TRACKER_CONFIG=str(fifo))
    process = subprocess.Popen(
        [*TRACKER, "run"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    writer = _FifoWriter(fifo)
    try:
        # The tracker has reached settings loading (it is opening the FIFO)...
        _poll(process, writer.try_open, "the tracker to open its config file")
        # ...and, with no other thread yet, sleeping now means blocked in read() on it.
        _poll(process, lambda: _stat_state(process.pid) == "S", "the tracker to block in read()")
        process.send_signal(sig)
        output, _ = process.communicate(timeout=10)
    finally:
        writer.close()
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=10)
    assert process.returncode == 0, output
    assert "Traceback" not in output, output


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.15, 0.3, 0.6, 1.0, 1.5])
def test_sigterm_early_in_a_normal_start_up_exits_0(
    tmp_path: Path, sqlite_url: str, fake_api: Callable[..., FakeApi], delay: float
) -> None:
    """SIGTERM `delay` s after the process first catches SIGTERM, somewhere between the
    imports and the first sweep: exit 0 within the shutdown grace."""
    api = fake_api()
    env = tracker_env(sqlite_url, api.url, tmp_path / "out")
    grace = float(env["TRACKER_SHUTDOWN_GRACE"])
    log_path = tmp_path / "daemon.log"
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            [*TRACKER, "run"], env=env, stdout=log_file, stderr=subprocess.STDOUT, text=True
        )
    try:
        # Before the interpreter runs any code at all a SIGTERM cannot be caught; the clock
        # starts once the tracker has a handler for it.
        _poll(process, lambda: _catches_sigterm(process.pid), "a SIGTERM handler")
        time.sleep(delay)
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        try:
            returncode: int | None = process.wait(timeout=grace + 5)
        except subprocess.TimeoutExpired:
            returncode = None
        took = time.monotonic() - sent
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    log = log_path.read_text()
    assert returncode == 0, f"returncode {returncode}\n{log}"
    assert took <= grace, f"took {took:.1f} s to stop\n{log}"
    assert "Traceback" not in log, log
