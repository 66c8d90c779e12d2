"""Telling a dead predecessor on this machine from a live one, and the database's clock."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

from tracker.clock import DatabaseClock
from tracker.instance import boot_identity, dead_predecessors, pid_exists
from tracker.store import InstanceRow

BOOT = "0f6c1d2e-boot/4026531836"


def row(owner: str, pid: int, boot: str | None = BOOT) -> InstanceRow:
    return InstanceRow(owner=owner, host="h", pid=pid, boot_id=boot, heartbeat_at=None)


def test_only_predecessors_of_the_same_boot_whose_pid_is_gone_are_certainly_dead() -> None:
    alive = {100}
    instances = [
        row("gone", 200),
        row("running", 100),
        row("other-machine", 201, boot="another-boot/4026531836"),
        row("old-version", 202, boot=None),
        row("me", 300),
        # Our own pid, held by an earlier daemon: the kernel reused it, so that one is gone.
        row("pid-reused-by-me", 300),
    ]
    dead = dead_predecessors(
        instances, me="me", my_pid=300, my_boot=BOOT, pid_exists=lambda pid: pid in alive
    )
    assert dead == ["gone", "pid-reused-by-me"]


def test_without_a_boot_identity_nothing_is_presumed_dead() -> None:
    dead = dead_predecessors([row("gone", 200)], me="me", my_pid=1, my_boot=None)
    assert dead == []


def test_pid_exists_for_a_live_and_a_reaped_process() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert pid_exists(os.getpid())
    assert not pid_exists(child.pid)


def test_boot_identity_is_stable_and_names_boot_and_pid_namespace() -> None:
    identity = boot_identity()
    assert identity is not None
    assert identity == boot_identity()
    boot, namespace = identity.rsplit("/", 1)
    assert len(boot) == 36 and namespace.isdigit()


def test_database_clock_carries_the_reading_forward_on_the_monotonic_clock() -> None:
    ticks = [1000.0]
    reading = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    clock = DatabaseClock(reading, monotonic=lambda: ticks[0])
    assert clock.now() == reading
    ticks[0] += 2.5
    assert clock.now() == reading + timedelta(seconds=2.5)
    # A fresh reading replaces the old one, whatever the host's own clock did meanwhile.
    clock.sync(reading + timedelta(seconds=10))
    ticks[0] += 1.0
    assert clock.now() == reading + timedelta(seconds=11)
