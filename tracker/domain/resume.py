"""The HTTP resume protocol of a download: what to ask for, and what the answer allows.

A download that broke off asks for the rest (`Range`, guarded by `If-Range`); the file
host's answer says whether its body continues the bytes already held, replaces them with
the whole file, or is no use and the file starts over. Plain values in, plain values out:
header values as text ('' when absent), the bytes held as counts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "Answer",
    "Continuation",
    "Held",
    "Mismatch",
    "RangeRefused",
    "Verdict",
    "WholeFile",
    "content_length",
    "etag_md5",
    "judge",
    "request_headers",
    "validator",
]

_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.IGNORECASE)
# A single-part S3 object's ETag is the MD5 of its bytes: 32 hex digits, quoted. A
# multipart upload's has a dash and a part count, and is no checksum of the content.
_MD5_ETAG = re.compile(r'"([0-9a-fA-F]{32})"')


@dataclass(frozen=True, slots=True)
class Held:
    """What the temp file holds, and what the file host has said about the whole file."""

    size: int = 0
    total: int | None = None  # the full length, once the server has said it
    validator: str | None = None  # ETag or Last-Modified of the bytes held


@dataclass(frozen=True, slots=True)
class Answer:
    """The parts of the file host's answer that a resume depends on."""

    status: int
    content_range: str = ""
    content_length: str = ""
    etag: str = ""
    last_modified: str = ""


@dataclass(frozen=True, slots=True)
class Continuation:
    """A 206 that carries on exactly where the held bytes end: append its body."""

    total: int | None
    validator: str | None


@dataclass(frozen=True, slots=True)
class WholeFile:
    """A 200: its body is the whole file. `replaces` says why held bytes are dropped."""

    total: int | None
    validator: str | None
    md5: str | None  # the file's MD5, when its ETag is one
    replaces: str | None = None


@dataclass(frozen=True, slots=True)
class Mismatch:
    """A 206 that does not continue the held bytes: drop them and ask again."""

    reason: str


@dataclass(frozen=True, slots=True)
class RangeRefused:
    """A 416 to a range request: drop the held bytes and ask again."""

    reason: str


Verdict = Continuation | WholeFile | Mismatch | RangeRefused


def request_headers(held: Held) -> dict[str, str]:
    """The headers of the next request for the file, given what is held of it."""
    headers = {
        # Byte counts must match Content-Length and Range offsets, which refer to the
        # bytes as sent: ask for no transfer compression.
        "Accept-Encoding": "identity",
    }
    if held.size > 0:
        headers["Range"] = f"bytes={held.size}-"
        if held.validator is not None:
            # Only resume if the file is still the same one; otherwise the server
            # answers 200 with the whole new file and we start over.
            headers["If-Range"] = held.validator
    return headers


def judge(answer: Answer, held: Held) -> Verdict | None:
    """What `answer` means for the held bytes; None for a status that carries no file."""
    if answer.status == 200:
        return WholeFile(
            total=content_length(answer.content_length),
            validator=validator(answer.etag, answer.last_modified),
            md5=etag_md5(answer.etag),
            # A full answer to a Range request: the server ignored the range or the
            # file changed (If-Range failed). Either way, start over.
            replaces="200 to a range request" if held.size > 0 else None,
        )
    if answer.status == 206:
        return _continuation(answer, held)
    if answer.status == 416 and held.size > 0:
        return RangeRefused("server refused the range (416), starting over")
    return None


def _continuation(answer: Answer, held: Held) -> Continuation | Mismatch:
    match = _CONTENT_RANGE.fullmatch(answer.content_range.strip())
    if match is None:
        return Mismatch("206 without a usable Content-Range")
    start, end = int(match.group(1)), int(match.group(2))
    total = None if match.group(3) == "*" else int(match.group(3))
    if start != held.size:
        return Mismatch(f"206 starts at {start}, expected {held.size}")
    if end < start or (total is not None and end >= total):
        return Mismatch("206 with an inconsistent Content-Range")
    if held.total is not None and total is not None and total != held.total:
        return Mismatch("file length changed between requests")
    answered = validator(answer.etag, answer.last_modified)
    if held.validator and answered and answered != held.validator:
        return Mismatch("file changed between requests")
    if total is None:
        length = content_length(answer.content_length)
        total = None if length is None else start + length
    return Continuation(
        total=held.total if held.total is not None else total,
        validator=held.validator if held.validator is not None else answered,
    )


def content_length(value: str) -> int | None:
    """A Content-Length header's value as a count; None when absent or not one."""
    value = value.strip()
    return int(value) if value.isdigit() else None


def validator(etag: str, last_modified: str) -> str | None:
    """What identifies this version of the file, for If-Range; None when nothing does."""
    # A weak ETag never satisfies If-Range (RFC 9110 13.1.5), so prefer Last-Modified
    # then; a weak one alone is still sent, and the 200 it earns means a safe restart.
    if etag and not etag.startswith("W/"):
        return etag
    return last_modified or etag or None


def etag_md5(etag: str) -> str | None:
    """The content MD5 that a single-part S3 object's ETag is, in lower case; else None."""
    match = _MD5_ETAG.fullmatch(etag.strip())
    return None if match is None else match.group(1).lower()
