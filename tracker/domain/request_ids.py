"""What a request_id may look like before it is sent to Deepvue or used in a file name."""

from __future__ import annotations

import re

# Deepvue's ids are 32 hex characters; this allows a little more (the simulator's
# prefixed ids, other products) while keeping every id safe as a URL parameter and
# as a file name: no separators, no dots, no control characters, bounded length.
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")


def request_id_problem(request_id: str | None) -> str | None:
    """Why `request_id` is unusable, or None when it is fine."""
    if request_id is None or request_id == "":
        return "request_id is empty"
    if REQUEST_ID_PATTERN.fullmatch(request_id) is None:
        # ascii() escapes control and non-ASCII characters: the message stays one safe line.
        shown = ascii(request_id[:40])
        return (
            f"request_id {shown}{'...' if len(request_id) > 40 else ''} is malformed: "
            "expected 1-128 characters of A-Z, a-z, 0-9, '_' or '-', starting with a letter or digit"
        )
    return None
