"""The sd_notify client against real AF_UNIX datagram sockets standing in for systemd."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from tracker.notify import Notifier


def _receiver(address: str) -> socket.socket:
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(address)
    # A datagram sent over AF_UNIX is queued before sendto returns, so "nothing arrived"
    # can be checked at once, without waiting.
    receiver.setblocking(False)
    return receiver


def _received(receiver: socket.socket) -> list[bytes]:
    datagrams: list[bytes] = []
    for _ in range(100):
        try:
            datagrams.append(receiver.recv(4096))
        except BlockingIOError:
            return datagrams
    raise AssertionError("more datagrams than any test sends")


@pytest.fixture
def socket_path(tmp_path: Path) -> str:
    path = str(tmp_path / "notify")
    assert len(path) < 100, "AF_UNIX paths are limited to 108 bytes"
    return path


@pytest.fixture
def systemd(socket_path: str) -> Iterator[socket.socket]:
    receiver = _receiver(socket_path)
    yield receiver
    receiver.close()


def test_sends_the_exact_datagrams(socket_path: str, systemd: socket.socket) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": socket_path})
    assert notifier.enabled
    notifier.ready()
    notifier.ready(status="tracking 3 batches")
    notifier.status("sweeping")
    notifier.stopping()
    notifier.close()

    assert _received(systemd) == [
        b"READY=1",
        b"READY=1\nSTATUS=tracking 3 batches",
        b"STATUS=sweeping",
        b"STOPPING=1",
    ]


def test_status_text_cannot_inject_another_assignment(
    socket_path: str, systemd: socket.socket
) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": socket_path})
    notifier.status("line one\nREADY=1")
    notifier.close()
    assert _received(systemd) == [b"STATUS=line one READY=1"]


def test_abstract_socket() -> None:
    name = f"tracker-test-{uuid.uuid4().hex}"
    receiver = _receiver("\0" + name)
    try:
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        notifier.ready(status="up")
        notifier.close()
        assert _received(receiver) == [b"READY=1\nSTATUS=up"]
    finally:
        receiver.close()


def test_watchdog_for_this_process(socket_path: str, systemd: socket.socket) -> None:
    notifier = Notifier(
        {
            "NOTIFY_SOCKET": socket_path,
            "WATCHDOG_USEC": "3000000",
            "WATCHDOG_PID": str(os.getpid()),
        }
    )
    assert notifier.watchdog_interval() == 1.5
    notifier.watchdog()
    notifier.close()
    assert _received(systemd) == [b"WATCHDOG=1"]


def test_watchdog_without_pid_applies_to_us(socket_path: str, systemd: socket.socket) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": socket_path, "WATCHDOG_USEC": "500000"})
    assert notifier.watchdog_interval() == 0.25
    notifier.watchdog()
    notifier.close()
    assert _received(systemd) == [b"WATCHDOG=1"]


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}, id="another-pid"),
        pytest.param({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "x"}, id="garbled-pid"),
        pytest.param({}, id="no-watchdog"),
        pytest.param({"WATCHDOG_USEC": "0"}, id="zero"),
        pytest.param({"WATCHDOG_USEC": "soon"}, id="garbled-usec"),
    ],
)
def test_no_watchdog_for_us(
    socket_path: str, systemd: socket.socket, extra: dict[str, str]
) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": socket_path, **extra})
    assert notifier.watchdog_interval() is None
    notifier.watchdog()
    notifier.ready()
    notifier.close()
    # Readiness still goes out: only the watchdog belongs to another process.
    assert _received(systemd) == [b"READY=1"]


@pytest.mark.parametrize(
    "environ",
    [
        pytest.param({}, id="unset"),
        pytest.param({"NOTIFY_SOCKET": ""}, id="empty"),
        pytest.param({"NOTIFY_SOCKET": "relative/path"}, id="relative"),
        pytest.param({"NOTIFY_SOCKET": "vsock:2:1234"}, id="vsock"),
        pytest.param({"WATCHDOG_USEC": "3000000"}, id="watchdog-without-socket"),
    ],
)
def test_disabled_outside_systemd(environ: dict[str, str]) -> None:
    notifier = Notifier(environ)
    assert not notifier.enabled
    assert notifier.watchdog_interval() is None
    with capture_logs() as logs:
        notifier.ready(status="up")
        notifier.status("x")
        notifier.watchdog()
        notifier.stopping()
        notifier.close()
    assert logs == []


def test_reads_os_environ_by_default(
    socket_path: str, systemd: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", socket_path)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    notifier = Notifier()
    assert notifier.enabled
    notifier.ready()
    notifier.close()
    assert _received(systemd) == [b"READY=1"]


@pytest.mark.parametrize("unlink", [True, False], ids=["unlinked", "nobody-listening"])
def test_vanished_socket_is_logged_once_and_recovers(socket_path: str, unlink: bool) -> None:
    receiver = _receiver(socket_path)
    notifier = Notifier({"NOTIFY_SOCKET": socket_path, "WATCHDOG_USEC": "1000000"})
    notifier.ready()
    assert _received(receiver) == [b"READY=1"]

    receiver.close()
    if unlink:
        os.unlink(socket_path)
    with capture_logs() as logs:
        notifier.watchdog()
        notifier.watchdog()
        notifier.status("still here")
    assert [entry["event"] for entry in logs] == ["notify.failed"]
    assert logs[0]["log_level"] == "warning"
    assert logs[0]["socket"] == socket_path
    assert logs[0]["notification"] == "WATCHDOG=1"

    # systemd comes back on the same path (daemon-reexec): messages flow again, and a later
    # failure is reported afresh.
    if not unlink:
        os.unlink(socket_path)
    receiver = _receiver(socket_path)
    try:
        with capture_logs() as logs:
            notifier.watchdog()
            assert _received(receiver) == [b"WATCHDOG=1"]
            receiver.close()
            notifier.stopping()
        assert [entry["event"] for entry in logs] == ["notify.failed"]
    finally:
        receiver.close()
        notifier.close()


def test_closed_notifier_sends_nothing(socket_path: str, systemd: socket.socket) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": socket_path})
    notifier.close()
    assert not notifier.enabled
    notifier.ready()
    notifier.close()
    assert _received(systemd) == []
