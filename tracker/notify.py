"""systemd's sd_notify protocol: readiness, status text, watchdog pings and stopping.

The protocol is one datagram of newline-separated `KEY=value` lines sent to the AF_UNIX
socket named by NOTIFY_SOCKET, so it is written here by hand rather than pulled in as a
dependency. Outside systemd (no NOTIFY_SOCKET) every method is a no-op.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import structlog

_log = structlog.get_logger(__name__)


def _socket_address(notify_socket: str) -> str | None:
    """The address to send to, or None when NOTIFY_SOCKET names nothing we can use."""
    if notify_socket.startswith("/"):
        return notify_socket
    if notify_socket.startswith("@") and len(notify_socket) > 1:
        # Linux abstract namespace: systemd writes the leading NUL as "@".
        return "\0" + notify_socket[1:]
    # Empty, relative, or another family (systemd also knows "vsock:"): libsystemd refuses
    # these too, so act as if we were not under systemd.
    return None


def _watchdog_usec(environ: Mapping[str, str]) -> int | None:
    """WATCHDOG_USEC when the watchdog is meant for this very process, else None."""
    raw_usec = environ.get("WATCHDOG_USEC", "")
    if not raw_usec.isdigit() or int(raw_usec) <= 0:
        return None
    raw_pid = environ.get("WATCHDOG_PID")
    # A child that inherited its parent's environment must not ping on the parent's behalf;
    # systemd sets WATCHDOG_PID to say whose watchdog it is.
    if raw_pid is not None and (not raw_pid.isdigit() or int(raw_pid) != os.getpid()):
        return None
    return int(raw_usec)


def _one_line(text: str) -> str:
    # A newline would end the assignment and start a bogus one.
    return " ".join(text.splitlines())


class Notifier:
    """Tells systemd how the service is doing; never raises into the caller."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._display_address = env.get("NOTIFY_SOCKET", "")
        self._address = _socket_address(self._display_address)
        self._watchdog_usec = _watchdog_usec(env) if self._address is not None else None
        self._socket: socket.socket | None = None
        self._closed = False
        # Log the first failure of a run of failures only: the watchdog pings every few
        # seconds, and a vanished socket would otherwise flood the log.
        self._failing = False

    @property
    def enabled(self) -> bool:
        return self._address is not None and not self._closed

    def ready(self, status: str | None = None) -> None:
        lines = ["READY=1"]
        if status is not None:
            lines.append(f"STATUS={_one_line(status)}")
        self._send(lines)

    def status(self, text: str) -> None:
        self._send([f"STATUS={_one_line(text)}"])

    def watchdog(self) -> None:
        if self._watchdog_usec is not None:
            self._send(["WATCHDOG=1"])

    def stopping(self) -> None:
        self._send(["STOPPING=1"])

    def watchdog_interval(self) -> float | None:
        """Seconds between pings: half the watchdog timeout, as systemd recommends."""
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def close(self) -> None:
        self._closed = True
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _send(self, lines: list[str]) -> None:
        if self._address is None or self._closed:
            return
        message = "\n".join(lines).encode()
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                # The daemon's event loop must not stall if systemd stops reading: a
                # message that does not fit right away is dropped and logged instead.
                self._socket.setblocking(False)
            # Unconnected sendto resolves the path each time, so a socket that systemd
            # re-creates (daemon-reexec) is found again without reopening anything.
            self._socket.sendto(message, self._address)
        except OSError as error:
            if not self._failing:
                self._failing = True
                _log.warning(
                    "notify.failed",
                    socket=self._display_address,
                    notification=lines[0],
                    error=f"{type(error).__name__}: {error}",
                )
            return
        self._failing = False
