"""Who this daemon is, and whether another daemon on the same machine is still alive.

A lease names its owner as host:pid:random. After a crash (kill -9, the OOM killer, the
watchdog), systemd starts a new daemon within seconds; that daemon can tell for certain
that its predecessor is gone when both ran on the same machine, in the same boot and the
same pid namespace, and the predecessor's pid no longer exists. Then its leases are freed
at once instead of after the heartbeat timeout.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from tracker.store import InstanceRow

BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
PID_NAMESPACE_PATH = Path("/proc/self/ns/pid")


def instance_name() -> str:
    """Who holds a lease: readable for operators, unique across restarts."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def boot_identity() -> str | None:
    """This machine's boot and pid namespace; None where /proc does not tell.

    Two daemons with the same identity see the same pids, so one may test the other's
    pid. The host name alone is not enough: two containers may share one.
    """
    try:
        boot = BOOT_ID_PATH.read_text(encoding="ascii").strip()
        namespace = os.stat(PID_NAMESPACE_PATH).st_ino
    except OSError:
        return None
    return f"{boot}/{namespace}" if boot else None


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def dead_predecessors(
    instances: Iterable[InstanceRow],
    *,
    me: str,
    my_pid: int,
    my_boot: str | None,
    pid_exists: Callable[[int], bool] = pid_exists,
) -> list[str]:
    """The owners among `instances` (on this host) that are certainly dead.

    Certain means the same boot identity and a pid that is gone, or that is our own (a
    predecessor whose pid the kernel has since handed to us). Anything less certain is
    left to the heartbeat timeout.
    """
    if my_boot is None:
        return []
    return [
        row.owner
        for row in instances
        if row.owner != me
        and row.boot_id == my_boot
        and (row.pid == my_pid or not pid_exists(row.pid))
    ]
