"""What a webhook delivery names: the strings that may be request_ids, and a log preview.

Pure and tolerant: Deepvue publishes no payload format, so every string that looks like a
request_id counts, wherever it stands. JSON at any depth, keys and values alike (a payload
may key its results by id), a form (names and values), the query string (names and
values). A JSON string counts only whole (`"abc123"`, not a sentence naming it). Nothing
here raises: an unreadable body names nothing. The candidates are only looked up; the
store decides which are tracked, unfinished batches.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from urllib.parse import parse_qsl

from tracker.domain.redact import redact
from tracker.domain.request_ids import REQUEST_ID_PATTERN

__all__ = ["MAX_CANDIDATES", "PREVIEW_LIMIT", "body_preview", "request_ids_in"]

# However large the delivery, at most this many distinct candidates go to the database.
MAX_CANDIDATES = 500
# A form or query string is read up to this many fields.
MAX_FIELDS = 2_000
PREVIEW_LIMIT = 300
# The preview redacts at most this much of the body: redacting is linear, but a log line
# needs only its start.
_PREVIEW_SOURCE = 16_384
_LONGEST_ID = 128
# A JSON string literal, found without parsing the structure around it: any depth costs
# nothing (no recursion), and a truncated or broken document still gives its strings.
_JSON_STRING = re.compile(r'"([^"\\]*(?:\\.[^"\\]*)*)"', re.DOTALL)
# The longest literal that can decode to a usable id (every character escaped as \uXXXX).
_LONGEST_LITERAL = 6 * _LONGEST_ID


def request_ids_in(content_type: str | None, body: bytes, query_string: str) -> set[str]:
    """The distinct strings in the delivery shaped like a request_id, at most MAX_CANDIDATES.

    The query string first, then the body: JSON when the content type says so or the body
    starts like JSON, a form when it says so (or, without a known type, holds `=`).
    """
    found: set[str] = set()
    for candidate in _strings(content_type, body, query_string):
        if len(found) >= MAX_CANDIDATES:
            break
        if len(candidate) <= _LONGEST_ID and REQUEST_ID_PATTERN.fullmatch(candidate):
            found.add(candidate)
    return found


def body_preview(body: bytes, secrets: Iterable[str] = (), limit: int = PREVIEW_LIMIT) -> str:
    """The body's start as one redacted line of at most `limit` characters, for a log."""
    text = body[: _PREVIEW_SOURCE * 4].decode("utf-8", errors="replace")
    cut = len(text) > _PREVIEW_SOURCE or len(body) > _PREVIEW_SOURCE * 4
    text = " ".join("".join(c if c.isprintable() else " " for c in text[:_PREVIEW_SOURCE]).split())
    shown = redact(text, secrets)
    if cut:
        # The source was cut mid-way: its last word may be half a token that redaction no
        # longer recognises. Drop it.
        shown = (shown[: shown.rfind(" ") + 1] + "...").lstrip()
    if len(shown) > limit:
        shown = shown[: limit - 3] + "..."
    return shown


def _strings(content_type: str | None, body: bytes, query_string: str) -> Iterator[str]:
    yield from _fields(query_string)
    text = body.decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    if kind.endswith("json") or text[:1] in ("{", "[", '"'):
        yield from _json_strings(text)
    elif kind == "application/x-www-form-urlencoded" or (
        kind in ("", "text/plain") and "=" in text
    ):
        yield from _fields(text)
    else:
        yield text.strip()


def _fields(encoded: str) -> Iterator[str]:
    # Split by hand: parse_qsl's own max_num_fields raises instead of stopping.
    for field in encoded.split("&", MAX_FIELDS)[:MAX_FIELDS]:
        for name, value in parse_qsl(field, keep_blank_values=True):
            yield name
            yield value


def _json_strings(text: str) -> Iterator[str]:
    for match in _JSON_STRING.finditer(text):
        literal = match.group(1)
        if len(literal) > _LONGEST_LITERAL:
            continue
        if "\\" not in literal:
            yield literal
            continue
        try:
            decoded = json.loads(f'"{literal}"')
        except ValueError:  # an invalid escape: this string names nothing
            continue
        if isinstance(decoded, str):
            yield decoded
