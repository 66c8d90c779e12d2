"""The rich renderables people see: `list` and `show` tables, the `status` screen, the
`watch` screen and its one-line summary for pipes.

Every value read from the database is rendered as Text, never as rich markup: request
ids, labels and error messages are data and may contain brackets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import datetime

from rich import box
from rich.columns import Columns
from rich.console import Console, Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from tracker.domain.durations import format_duration
from tracker.domain.states import State
from tracker.schema import UnreadableTimestamp
from tracker.store import BatchRow, TransitionRow
from tracker.views.console import emit, emit_json, make_console
from tracker.views.documents import batch_json, status_json, transition_json
from tracker.views.snapshots import StatusReport, WatchSnapshot
from tracker.views.text import one_line, printable, when_and_age, when_utc

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


def _data(value: object) -> Text:
    """A value from the database, for people: as text, control characters escaped."""
    return Text(printable("-" if value is None else str(value)))


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
            Text(when_utc(row.updated_at)),
            Text(
                printable(row.file_path) if row.file_path else one_line(row.last_error),
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
            shown = Text(when_utc(value))
        elif isinstance(value, datetime):
            shown = Text(when_utc(value) + " UTC")
        else:
            shown = _data(value)
        details.add_row(Text(field.name), shown)

    steps = _table(console, title="transitions")
    steps.add_column("AT (UTC)", no_wrap=True)
    steps.add_column("FROM", no_wrap=True)
    steps.add_column("TO", no_wrap=True)
    steps.add_column("API", justify="right", no_wrap=True)
    # "webhook": the check that made this step was brought forward by a delivery.
    steps.add_column("VIA", no_wrap=True)
    steps.add_column("DETAIL", overflow="fold")
    for step in history:
        steps.add_row(
            Text(when_utc(step.at)),
            _state(step.from_state),
            _state(step.to_state),
            _data(step.api_status),
            Text("webhook" if step.brought_forward else ""),
            _data(step.detail or step.api_message or ""),
        )
    emit(console, Group(details, Text(""), steps))


# --- status ---------------------------------------------------------------------------

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
            f") created {when_and_age(oldest.created_at, report.now)}",
        ),
    )
    facts.add_row(
        Text("last sweep, any host"), Text(when_and_age(report.last_sweep_any_host, report.now))
    )
    facts.add_row(
        Text(f"last sweep, {report.host}"),
        Text(when_and_age(report.last_sweep_this_host, report.now)),
    )
    facts.add_row(
        Text("last webhook delivery"), Text(when_and_age(report.last_delivery, report.now))
    )

    errors = _table(console, title="recent errors")
    errors.add_column("UPDATED (UTC)", no_wrap=True)
    errors.add_column("REQUEST_ID", no_wrap=True)
    errors.add_column("STATE", no_wrap=True)
    errors.add_column("LAST ERROR", overflow="fold")
    for row in report.recent_errors:
        errors.add_row(
            Text(when_utc(row.updated_at)),
            _data(row.request_id),
            _state(row.state),
            Text(one_line(row.last_error, 200)),
        )
    gap = Text("")
    return Group(
        Text(f"tracker status at {when_utc(report.now)} UTC", style="bold"),
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


def watch_summary(snapshot: WatchSnapshot) -> str:
    """The snapshot on one plain line, for logs and pipes."""
    states = ", ".join(f"{state} {count}" for state, count in snapshot.counts.items() if count)
    return f"{when_utc(snapshot.at)} UTC finished {snapshot.finished}/{snapshot.total}" + (
        f" ({states})" if states else ""
    )


def watch_view(
    snapshot: WatchSnapshot, *, label: str | None, interval: float, problem: str | None
) -> RenderableType:
    scope = f"label {printable(repr(label))}" if label is not None else "all batches"
    header = Text.assemble(
        ("tracker watch", "bold"),
        f"  {scope}  {when_utc(snapshot.at)} UTC, every {format_duration(interval)}  (Ctrl-C quits)",
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
            Text(one_line(step.detail or step.api_message), no_wrap=True, overflow="ellipsis"),
        )
    gap = Text("")
    parts: list[RenderableType] = [header, gap, counts, progress, gap]
    parts.append(recent if snapshot.recent else Text("no transitions yet", style="dim"))
    if problem is not None:
        parts.append(Text(problem, style="bold red"))
    return Group(*parts)
