"""What `tracker list`, `show`, `status` and `watch` print: rich tables for people, JSON for programs.

On a terminal the tables have colours and wrap to the window. Piped, they are plain text
with one line per row (no colours, no box, no trailing blanks), so grep and awk work.
Every value read from the database is rendered as Text, never as rich markup: request ids,
labels and error messages are data and may contain brackets. They may also contain control
characters (an ESC sequence in a label would retitle the terminal or clear the screen), so
every such value is shown through `printable`, and a value that is not a timestamp where
one belongs is shown as written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import socket
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import FrameType
from typing import Any, TextIO

import sqlalchemy as sa
from rich import box
from rich.columns import Columns
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from tracker.budget import DatabaseBudget
from tracker.db import describe_db_error
from tracker.domain.durations import format_duration
from tracker.domain.quota import plan_windows
from tracker.domain.states import ACTIVE_STATES, TERMINAL_STATES, State
from tracker.schema import UnreadableTimestamp
from tracker.settings import Settings
from tracker.store import BatchRow, Store, TransitionRow

# Piped output is read by programs and in logs, not squeezed into a window: wide enough
# for a 32-character id, a label, a timestamp and a useful piece of the last error.
PIPE_WIDTH = 160
ERROR_PREVIEW = 80
RECENT_TRANSITIONS = 10

STATE_STYLES: dict[str, str] = {
    State.PENDING: "yellow",
    State.PROCESSING: "cyan",
    State.READY: "blue",
    State.DOWNLOADED: "green",
    State.FAILED: "bold red",
    State.REJECTED: "magenta",
    State.EXPIRED: "red",
    State.CANCELLED: "dim",
}


# --- output plumbing ------------------------------------------------------------------


def make_console(file: TextIO | None = None) -> Console:
    """A console for stdout: rich's own terminal detection, a fixed width when piped."""
    console = Console(file=file or sys.stdout, markup=False, highlight=False, emoji=False)
    if not console.is_terminal:
        console.width = _pipe_width()
    return console


def _pipe_width() -> int:
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        return PIPE_WIDTH
    return columns if columns >= 40 else PIPE_WIDTH


def emit(console: Console, renderable: RenderableType) -> None:
    """Print; when piped, without the blanks rich pads every line with to the full width."""
    if console.is_terminal:
        console.print(renderable)
        return
    with console.capture() as captured:
        console.print(renderable)
    lines = [line.rstrip() for line in captured.get().splitlines()]
    console.file.write("".join(line + "\n" for line in lines))
    console.file.flush()


def emit_json(console: Console, document: Any) -> None:
    console.file.write(json.dumps(document, indent=2) + "\n")
    console.file.flush()


# C0 and C1 controls, DEL, and the bidirectional overrides that can reorder what is shown.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """`text` with every control character written as an escape (ESC becomes \\x1b)."""
    return _CONTROLS.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def _data(value: object) -> Text:
    """A value from the database, for people: as text, control characters escaped."""
    return Text(printable("-" if value is None else str(value)))


def iso_utc(moment: datetime | None) -> str | None:
    """ISO-8601 in UTC with a Z, the form most JSON readers expect; a stored value that is
    not a timestamp as it was written."""
    if moment is None:
        return None
    if isinstance(moment, UnreadableTimestamp):
        return moment.raw
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _when(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    if isinstance(moment, UnreadableTimestamp):
        return printable(repr(moment.raw)) + " (not a timestamp)"
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _ago(moment: datetime | None, now: datetime) -> str:
    if moment is None:
        return "never"
    if isinstance(moment, UnreadableTimestamp):
        return _when(moment)
    seconds = max(0.0, (now - moment).total_seconds())
    return f"{_when(moment)} ({format_duration(round(seconds))} ago)"


def _state(state: str) -> Text:
    return Text(printable(str(state)), style=STATE_STYLES.get(state, ""))


def _table(console: Console, *, title: str | None = None) -> Table:
    if console.is_terminal:
        return Table(
            title=title,
            title_justify="left",
            box=box.SIMPLE_HEAD,
            show_edge=False,
            header_style="bold",
        )
    # Piped: kubectl-like columns, one line per row; the title becomes a plain line above.
    return Table(title=title, title_justify="left", box=None, pad_edge=False, header_style="")


def _heading(name: str) -> Text:
    """A column heading cut short, never wrapped onto lines of its own."""
    return Text(name, no_wrap=True, overflow="ellipsis")


def _one_line(text: str | None, limit: int = ERROR_PREVIEW) -> str:
    flat = printable(" ".join((text or "").split()))
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


# --- JSON shapes ----------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return iso_utc(value)
    # SQLite keeps whatever another application wrote, a blob included.
    return repr(value) if isinstance(value, bytes) else value


def batch_json(row: BatchRow) -> dict[str, Any]:
    """Every column of the batch; timestamps ISO-8601 UTC."""
    return {f.name: _jsonable(getattr(row, f.name)) for f in dataclasses.fields(row)}


def transition_json(row: TransitionRow) -> dict[str, Any]:
    return {f.name: _jsonable(getattr(row, f.name)) for f in dataclasses.fields(row)}


# --- list and show ----------------------------------------------------------------------


def print_batches(
    rows: Sequence[BatchRow], *, as_json: bool, console: Console | None = None
) -> None:
    console = console or make_console()
    if as_json:
        emit_json(console, [batch_json(row) for row in rows])
        return
    # One line per batch, even in a narrow window: `tracker show` has the whole text.
    table = _table(console)
    table.add_column("REQUEST_ID", no_wrap=True)
    table.add_column(_heading("LABEL"), max_width=24)
    table.add_column("STATE", no_wrap=True)
    table.add_column("CHECKS", justify="right", no_wrap=True)
    table.add_column("UPDATED (UTC)", no_wrap=True)
    table.add_column(_heading("FILE / LAST ERROR"))
    for row in rows:
        # Wrappable columns holding no-wrap text: rich narrows these first, so the
        # short columns keep their width and the long text is cut with an ellipsis.
        table.add_row(
            _data(row.request_id),
            Text(printable(row.label or ""), no_wrap=True, overflow="ellipsis"),
            _state(row.state),
            _data(row.checks),
            Text(_when(row.updated_at)),
            Text(
                printable(row.file_path) if row.file_path else _one_line(row.last_error),
                style="" if row.file_path else "red",
                no_wrap=True,
                overflow="ellipsis",
            ),
        )
    emit(console, table)


def print_batch(
    row: BatchRow,
    history: Sequence[TransitionRow],
    *,
    as_json: bool,
    console: Console | None = None,
) -> None:
    console = console or make_console()
    if as_json:
        emit_json(console, batch_json(row) | {"transitions": [transition_json(t) for t in history]})
        return
    details = Table.grid(padding=(0, 2))
    details.add_column(style="bold" if console.is_terminal else "", no_wrap=True)
    details.add_column(overflow="fold")
    for field in dataclasses.fields(row):
        value = getattr(row, field.name)
        if field.name == "state":
            shown: Text = _state(value)
        elif isinstance(value, UnreadableTimestamp):
            shown = Text(_when(value))
        elif isinstance(value, datetime):
            shown = Text(_when(value) + " UTC")
        else:
            shown = _data(value)
        details.add_row(Text(field.name), shown)

    steps = _table(console, title="transitions")
    steps.add_column("AT (UTC)", no_wrap=True)
    steps.add_column("FROM", no_wrap=True)
    steps.add_column("TO", no_wrap=True)
    steps.add_column("API", justify="right", no_wrap=True)
    steps.add_column("DETAIL", overflow="fold")
    for step in history:
        steps.add_row(
            Text(_when(step.at)),
            _state(step.from_state),
            _state(step.to_state),
            _data(step.api_status),
            _data(step.detail or step.api_message or ""),
        )
    emit(console, Group(details, Text(""), steps))


# --- status ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StatusReport:
    now: datetime
    host: str
    counts: dict[str, int]  # every state, zeros included, in the state machine's order
    quota: dict[str, tuple[int, int]]  # window name -> (used, limit)
    oldest_unfinished: BatchRow | None
    last_sweep_any_host: datetime | None
    last_sweep_this_host: datetime | None
    recent_errors: list[BatchRow]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def unfinished(self) -> int:
        return sum(self.counts[state] for state in ACTIVE_STATES)


def collect_status(
    store: Store, settings: Settings, *, host: str | None = None, now: datetime | None = None
) -> StatusReport:
    counted = store.count_by_state()
    windows = plan_windows(
        settings.rate_per_second, settings.rate_per_minute, settings.rate_per_day
    )
    host = host or socket.gethostname()
    return StatusReport(
        now=now or datetime.now(UTC),
        host=host,
        counts={state.value: counted.get(state.value, 0) for state in State},
        quota=DatabaseBudget(store.engine, windows).usage_now(),
        oldest_unfinished=store.oldest_unfinished(),
        last_sweep_any_host=store.last_sweep(),
        last_sweep_this_host=store.last_sweep(host),
        recent_errors=store.recent_errors(10),
    )


def status_json(report: StatusReport) -> dict[str, Any]:
    oldest = report.oldest_unfinished
    return {
        "now": iso_utc(report.now),
        "counts": report.counts,
        "total": report.total,
        "unfinished": report.unfinished,
        "quota": {
            name: {"used": used, "limit": limit, "left": max(0, limit - used)}
            for name, (used, limit) in report.quota.items()
        },
        "oldest_unfinished": None
        if oldest is None
        else {
            "request_id": oldest.request_id,
            "label": oldest.label,
            "state": oldest.state,
            "created_at": iso_utc(oldest.created_at),
            "age_seconds": None
            if isinstance(oldest.created_at, UnreadableTimestamp)
            else round((report.now - oldest.created_at).total_seconds(), 3),
        },
        "last_sweep": {
            "any_host": iso_utc(report.last_sweep_any_host),
            "this_host": iso_utc(report.last_sweep_this_host),
            "host": report.host,
        },
        "recent_errors": [
            {
                "request_id": row.request_id,
                "state": row.state,
                "updated_at": iso_utc(row.updated_at),
                "last_error": row.last_error,
            }
            for row in report.recent_errors
        ],
    }


_WINDOW_NAMES = {"second": "per second", "minute": "per minute", "day": "per day (last 24 h)"}


def status_view(report: StatusReport, console: Console) -> RenderableType:
    counts = _table(console, title="batches")
    counts.add_column("STATE", no_wrap=True)
    counts.add_column("COUNT", justify="right", no_wrap=True)
    for state, count in report.counts.items():
        counts.add_row(_state(state), Text(str(count)))
    counts.add_row(Text("unfinished", style="bold"), Text(str(report.unfinished), style="bold"))
    counts.add_row(Text("total", style="bold"), Text(str(report.total), style="bold"))

    quota = _table(console, title="call budget (all instances)")
    quota.add_column("WINDOW", no_wrap=True)
    for heading in ("USED", "LIMIT", "LEFT"):
        quota.add_column(heading, justify="right", no_wrap=True)
    for name, (used, limit) in report.quota.items():
        left = max(0, limit - used)
        quota.add_row(
            Text(_WINDOW_NAMES.get(name, name)),
            Text(str(used)),
            Text(str(limit)),
            Text(str(left), style="red" if left == 0 else ""),
        )

    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold" if console.is_terminal else "", no_wrap=True)
    facts.add_column(overflow="fold")
    oldest = report.oldest_unfinished
    facts.add_row(
        Text("oldest unfinished"),
        Text("none")
        if oldest is None
        else Text.assemble(
            printable(oldest.request_id),
            " (",
            _state(oldest.state),
            f") created {_ago(oldest.created_at, report.now)}",
        ),
    )
    facts.add_row(Text("last sweep, any host"), Text(_ago(report.last_sweep_any_host, report.now)))
    facts.add_row(
        Text(f"last sweep, {report.host}"), Text(_ago(report.last_sweep_this_host, report.now))
    )

    errors = _table(console, title="recent errors")
    errors.add_column("UPDATED (UTC)", no_wrap=True)
    errors.add_column("REQUEST_ID", no_wrap=True)
    errors.add_column("STATE", no_wrap=True)
    errors.add_column("LAST ERROR", overflow="fold")
    for row in report.recent_errors:
        errors.add_row(
            Text(_when(row.updated_at)),
            _data(row.request_id),
            _state(row.state),
            Text(_one_line(row.last_error, 200)),
        )
    gap = Text("")
    return Group(
        Text(f"tracker status at {_when(report.now)} UTC", style="bold"),
        gap,
        counts,
        gap,
        quota,
        gap,
        facts,
        gap,
        errors if report.recent_errors else Text("recent errors: none"),
    )


def print_status(report: StatusReport, *, as_json: bool, console: Console | None = None) -> None:
    console = console or make_console()
    if as_json:
        emit_json(console, status_json(report))
    else:
        emit(console, status_view(report, console))


# --- watch ----------------------------------------------------------------------------


@dataclass(frozen=True)
class WatchSnapshot:
    at: datetime
    counts: dict[str, int]
    recent: list[TransitionRow]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def finished(self) -> int:
        return sum(self.counts.get(state, 0) for state in TERMINAL_STATES)

    @property
    def unfinished(self) -> int:
        return self.total - self.finished

    def summary(self) -> str:
        """One plain line, for logs and pipes."""
        states = ", ".join(f"{state} {count}" for state, count in self.counts.items() if count)
        return f"{_when(self.at)} UTC finished {self.finished}/{self.total}" + (
            f" ({states})" if states else ""
        )


def take_snapshot(store: Store, label: str | None, recent: int) -> WatchSnapshot:
    counted = store.count_by_state(label)
    return WatchSnapshot(
        at=datetime.now(UTC),
        counts={state.value: counted.get(state.value, 0) for state in State},
        recent=store.recent_transitions(recent, label) if recent > 0 else [],
    )


def watch_view(
    snapshot: WatchSnapshot, *, label: str | None, interval: float, problem: str | None
) -> RenderableType:
    scope = f"label {printable(repr(label))}" if label is not None else "all batches"
    header = Text.assemble(
        ("tracker watch", "bold"),
        f"  {scope}  {_when(snapshot.at)} UTC, every {format_duration(interval)}  (Ctrl-C quits)",
    )
    # Flowing cells rather than a column per state: eight columns do not fit 80 wide.
    counts = Columns(
        [Text.assemble(_state(state), f" {count}") for state, count in snapshot.counts.items()],
        padding=(0, 3),
    )

    progress = Table.grid(padding=(0, 2))
    progress.add_column(no_wrap=True)
    progress.add_column(no_wrap=True)
    share = snapshot.finished / snapshot.total if snapshot.total else 1.0
    progress.add_row(
        ProgressBar(
            total=max(snapshot.total, 1),
            completed=snapshot.finished,
            width=40,
            complete_style="cyan",
            finished_style="green",
        )
        if snapshot.total
        else Text("no batches"),
        Text(f"{snapshot.finished}/{snapshot.total} finished ({share:.0%})"),
    )

    recent = Table(
        title="recent transitions",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        header_style="bold",
    )
    recent.add_column("AGO", justify="right", no_wrap=True)
    recent.add_column("REQUEST_ID", no_wrap=True)
    recent.add_column("FROM", no_wrap=True)
    recent.add_column("TO", no_wrap=True)
    recent.add_column(_heading("DETAIL"))
    for step in snapshot.recent:
        age = max(0.0, (snapshot.at - step.at).total_seconds())
        recent.add_row(
            Text(format_duration(round(age))),
            _data(step.request_id),
            _state(step.from_state),
            _state(step.to_state),
            Text(_one_line(step.detail or step.api_message), no_wrap=True, overflow="ellipsis"),
        )
    gap = Text("")
    parts: list[RenderableType] = [header, gap, counts, progress, gap]
    parts.append(recent if snapshot.recent else Text("no transitions yet", style="dim"))
    if problem is not None:
        parts.append(Text(problem, style="bold red"))
    return Group(*parts)


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

    say(snapshot.summary())
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
            say(snapshot.summary())
            shown = snapshot.counts
        outage = False
    return 0
