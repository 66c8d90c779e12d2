"""Views for people escape control characters from the database: an ESC sequence in a
label must not retitle the operator's terminal or clear the screen."""

from __future__ import annotations

import io
from datetime import UTC, datetime

from rich.console import Console

from tests.rows import batch_row
from tracker.domain.states import State
from tracker.schema import UnreadableTimestamp
from tracker.store import BatchRow, TransitionRow
from tracker.views.render import print_batch, print_batches, status_view, watch_view
from tracker.views.snapshots import StatusReport, WatchSnapshot
from tracker.views.text import printable

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
TITLE = "\x1b]0;pwned\x07"
CLEAR = "\x1b[2J"
HOSTILE = f"{TITLE}{CLEAR}label\u202eevil"


def batch(**changes: object) -> BatchRow:
    """A rejected batch whose label and last error hold terminal control sequences."""
    values: dict[str, object] = dict(
        label=HOSTILE,
        state="rejected",
        file_path=None,
        file_size=None,
        file_sha256=None,
        last_error=f"Deepvue said {HOSTILE}",
        api_status=None,
        checks=0,
        download_attempts=0,
        lease_token=0,
        request_id="rid-1",
    )
    values.update(changes)
    return batch_row(**values)


def step() -> TransitionRow:
    return TransitionRow(1, 1, "rid-1", "pending", "rejected", NOW, 400, HOSTILE, HOSTILE)


def terminal() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=True, width=200, markup=False), out


def assert_escaped(shown: str) -> None:
    assert TITLE not in shown and CLEAR not in shown and "\u202e" not in shown
    assert "\\x1b]0;pwned\\x07" in shown


def test_printable_escapes_every_control_character_and_keeps_the_rest() -> None:
    assert printable("a\x00b\x1bc\x7fd\x9be\u2066f") == "a\\x00b\\x1bc\\x7fd\\x9be\\u2066f"
    assert printable("ok [bold] é, 你好") == "ok [bold] é, 你好"


def test_list_and_show_escape_what_the_database_holds() -> None:
    console, out = terminal()
    print_batches([batch()], as_json=False, console=console)
    print_batch(batch(), [step()], as_json=False, console=console)
    assert_escaped(out.getvalue())


def test_status_and_watch_escape_what_the_database_holds() -> None:
    console, out = terminal()
    report = StatusReport(
        now=NOW,
        host="h",
        counts={state.value: int(state is State.REJECTED) for state in State},
        quota={},
        oldest_unfinished=batch(state="pending", request_id=HOSTILE),
        last_sweep_any_host=None,
        last_sweep_this_host=None,
        recent_errors=[batch()],
    )
    console.print(status_view(report, console))
    snapshot = WatchSnapshot(at=NOW, counts={"rejected": 1}, recent=[step()])
    console.print(watch_view(snapshot, label=HOSTILE, interval=1.0, problem=None))
    assert_escaped(out.getvalue())


def test_a_value_that_is_not_a_timestamp_is_shown_as_written() -> None:
    console, out = terminal()
    unreadable = UnreadableTimestamp(f"soon{CLEAR}")
    print_batches([batch(updated_at=unreadable)], as_json=False, console=console)
    print_batch(batch(created_at=unreadable), [], as_json=False, console=console)
    shown = out.getvalue()
    assert "'soon\\x1b[2J' (not a timestamp)" in shown and CLEAR not in shown
