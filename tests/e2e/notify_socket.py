"""A stand-in for systemd's notification socket that records what the daemon tells it.

The daemon (tracker/notify.py) sends one AF_UNIX datagram per notification, made of
newline-separated `KEY=value` lines, to the path in NOTIFY_SOCKET; it pings the watchdog
(`WATCHDOG=1`) only when WATCHDOG_USEC is set (and WATCHDOG_PID, if set, is its own pid).
`NotifySocket` binds such a socket in a temp dir of its own (short enough for the 108-byte
limit on socket paths), receives on a background thread, and stamps every datagram with its
`time.monotonic()` arrival, so tests can measure the gaps between pings.

    with NotifySocket() as notify:
        daemon = launch(env | notify.env(watchdog_usec=2_000_000))
        ...
        assert max_gap(notify.pings()) < 2.0
"""

from __future__ import annotations

import itertools
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType

__all__ = ["NotifySocket", "max_gap"]


class NotifySocket:
    """Records every datagram sent to `path`, with its arrival time (time.monotonic())."""

    def __init__(self) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="notify-"))
        self.path = self._dir / "notify.sock"
        self._received: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._thread = threading.Thread(target=self._receive, name="notify-socket", daemon=True)

    def __enter__(self) -> NotifySocket:
        try:
            self._socket.bind(str(self.path))
            # Short, so that close() does not wait long for the thread to notice.
            self._socket.settimeout(0.1)
            self._thread.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def env(self, *, watchdog_usec: int | None = None) -> dict[str, str]:
        """The environment that points a daemon at this socket (and arms its watchdog)."""
        env = {"NOTIFY_SOCKET": str(self.path)}
        if watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        return env

    def messages(self) -> list[tuple[float, str]]:
        """Every datagram so far, as (arrival time, text), in arrival order."""
        with self._lock:
            return list(self._received)

    def lines(self) -> list[tuple[float, str]]:
        """Every `KEY=value` line so far, with the arrival time of its datagram."""
        return [(at, line) for at, text in self.messages() for line in text.splitlines()]

    def times_of(self, line: str) -> list[float]:
        """Arrival times of the datagrams holding exactly this line (say "READY=1")."""
        return [at for at, text in self.messages() if line in text.splitlines()]

    def pings(self) -> list[float]:
        """Arrival times of the watchdog pings ("WATCHDOG=1")."""
        return self.times_of("WATCHDOG=1")

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._socket.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._socket.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return  # closed under us
            at = time.monotonic()
            with self._lock:
                self._received.append((at, data.decode("utf-8", "replace")))


def max_gap(times: list[float], *, start: float | None = None, end: float | None = None) -> float:
    """The longest stretch without an event between `start` and `end` (default: the first
    and last event); with no event in between, the whole stretch."""
    inside = [t for t in times if (start is None or t >= start) and (end is None or t <= end)]
    points = [*([start] if start is not None else []), *inside, *([end] if end is not None else [])]
    if len(points) < 2:
        return 0.0
    return max(b - a for a, b in itertools.pairwise(points))
