"""`tracker watch`: the live loop, redrawn on a terminal or one line per change on a pipe,
until a signal or, if asked, until every batch is finished."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

import sqlalchemy as sa
from rich.console import Console
from rich.live import Live

from tracker.db import describe_db_error
from tracker.store import Store
from tracker.views.console import make_console
from tracker.views.render import watch_summary, watch_view
from tracker.views.snapshots import WatchSnapshot, take_snapshot

RECENT_TRANSITIONS = 10


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGINT and SIGTERM end the watch calmly instead of raising mid-query."""

    def handle(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def watch_batches(
    store: Store,
    *,
    interval: float,
    label: str | None = None,
    until_done: bool = False,
    recent: int = RECENT_TRANSITIONS,
    console: Console | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Refresh a live view every `interval` seconds until a signal, or until done if asked.

    Piped, it prints one summary line whenever the counts change instead of redrawing.
    A database outage after the first read is shown and retried; the first read must
    succeed, so a wrong URL fails at once.
    """
    console = console or make_console()
    stop = stop or threading.Event()
    snapshot = take_snapshot(store, label, recent)
    problem: str | None = None
    with stop_on_signals(stop):
        if not console.is_terminal:
            return _watch_piped(store, console, snapshot, interval, label, until_done, stop)
        with Live(
            watch_view(snapshot, label=label, interval=interval, problem=None),
            console=console,
            auto_refresh=False,
            transient=False,
        ) as live:
            while not (until_done and snapshot.unfinished == 0) and not stop.wait(interval):
                try:
                    snapshot = take_snapshot(store, label, recent)
                    problem = None
                except sa.exc.OperationalError as error:
                    problem = f"database unreachable, retrying: {describe_db_error(error, with_type=False)}"
                live.update(
                    watch_view(snapshot, label=label, interval=interval, problem=problem),
                    refresh=True,
                )
    return 0


def _watch_piped(
    store: Store,
    console: Console,
    snapshot: WatchSnapshot,
    interval: float,
    label: str | None,
    until_done: bool,
    stop: threading.Event,
) -> int:
    def say(line: str) -> None:
        console.file.write(line + "\n")
        console.file.flush()

    say(watch_summary(snapshot))
    shown = snapshot.counts
    outage = False
    while not (until_done and snapshot.unfinished == 0) and not stop.wait(interval):
        try:
            snapshot = take_snapshot(store, label, recent=0)
        except sa.exc.OperationalError as error:
            if not outage:
                say(f"database unreachable, retrying: {describe_db_error(error, with_type=False)}")
            outage = True
            continue
        if snapshot.counts != shown or outage:
            say(watch_summary(snapshot))
            shown = snapshot.counts
        outage = False
    return 0
