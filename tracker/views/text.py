"""Values read from the database, as safe one-line text for terminals, logs and JSON.

Request ids, labels and error messages are data, and may contain control characters (an
ESC sequence in a label would retitle the terminal or clear the screen): every such value
is shown through `printable`. A value that is not a timestamp where one belongs is shown
as written.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from tracker.domain.durations import format_duration
from tracker.schema import UnreadableTimestamp

# How much of an error message a one-line cell shows.
ERROR_PREVIEW = 80

# C0 and C1 controls, DEL, and the bidirectional overrides that can reorder what is shown.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """`text` with every control character written as an escape (ESC becomes \\x1b)."""
    return _CONTROLS.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def iso_utc(moment: datetime | None) -> str | None:
    """ISO-8601 in UTC with a Z, the form most JSON readers expect; a stored value that is
    not a timestamp as it was written."""
    if moment is None:
        return None
    if isinstance(moment, UnreadableTimestamp):
        return moment.raw
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def when_utc(moment: datetime | None) -> str:
    """`2026-12-01 12:00:00` in UTC, "-" for none, a value that is not a timestamp quoted."""
    if moment is None:
        return "-"
    if isinstance(moment, UnreadableTimestamp):
        return printable(repr(moment.raw)) + " (not a timestamp)"
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def when_and_age(moment: datetime | None, now: datetime) -> str:
    """`when_utc` followed by how long before `now` it was; "never" for none."""
    if moment is None:
        return "never"
    if isinstance(moment, UnreadableTimestamp):
        return when_utc(moment)
    seconds = max(0.0, (now - moment).total_seconds())
    return f"{when_utc(moment)} ({format_duration(round(seconds))} ago)"


def one_line(text: str | None, limit: int = ERROR_PREVIEW) -> str:
    """`text` on one printable line, cut to `limit` characters with an ellipsis."""
    flat = printable(" ".join((text or "").split()))
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
