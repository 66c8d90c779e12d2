"""Canned answers: FastAPI-style and S3-style errors, hostile bodies, Range parsing."""

from __future__ import annotations

import re
import time
import zlib
from functools import lru_cache
from typing import Any, Final

from aiohttp import web

from tracker.simulator.content import CHUNK_SIZE


class UnframedResponse(web.StreamResponse):
    """An answer with neither Content-Length nor chunked encoding: the close ends it."""

    _length_check = False


@lru_cache(maxsize=4)
def gzip_bomb(size: int) -> bytes:
    """A gzip stream of a JSON envelope padded with spaces to `size` bytes: ~0.1 % of it."""
    squeeze = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    head, tail = padded_envelope_ends()
    parts = [squeeze.compress(head)]
    block = b" " * CHUNK_SIZE
    blocks, rest = divmod(max(size - len(head) - len(tail), 0), CHUNK_SIZE)
    for _ in range(blocks):
        parts.append(squeeze.compress(block))
    parts.append(squeeze.compress(block[:rest] + tail) + squeeze.flush())
    return b"".join(parts)


def padded_envelope_ends() -> tuple[bytes, bytes]:
    """The start and end of a status envelope whose padding goes in between."""
    head = (
        b'{"transaction_id": "0", "timestamp": 0, "code": 200, "message": "Batch Upload '
        b'status fetched successfully", "sub_code": "SUCCESS", "data": {"status": 201, '
        b'"message": "batch processing in progress", "batch_output_file_url": null, "pad": "'
    )
    return head, b'"}}'


def now_ms() -> int:
    return int(time.time() * 1000)


def detail(status: int, detail: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"detail": detail}, status=status, headers=headers)


def missing_field(location: str, name: str) -> web.Response:
    return detail(
        422, [{"loc": [location, name], "msg": "field required", "type": "value_error.missing"}]
    )


def s3_error(status: int, code: str, message: str) -> web.Response:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message></Error>"
    )
    return web.Response(status=status, text=body, content_type="application/xml")


_RANGE_RE: Final = re.compile(r"bytes=(\d*)-(\d*)", re.ASCII | re.IGNORECASE)


def parse_range(header: str, size: int) -> tuple[int, int] | str | None:
    """Inclusive (first, last) for one satisfiable range; None to ignore it; "416" if unsatisfiable.

    Multi-range and malformed headers are ignored (RFC 9110 allows answering 200 in full).
    """
    match = _RANGE_RE.fullmatch(header.strip())
    if match is None:
        return None
    first_s, last_s = match.groups()
    if not first_s:
        if not last_s:
            return None
        suffix = int(last_s)
        if suffix == 0 or size == 0:
            return "416"
        return max(0, size - suffix), size - 1
    first = int(first_s)
    if first >= size:
        return "416"
    last = min(int(last_s), size - 1) if last_s else size - 1
    if last < first:
        return None
    return first, last


def not_http(request: web.Request) -> web.Response:
    """A server that does not speak HTTP: a banner line, then the connection closed.

    The response returned only ends the handler; its connection is gone before it is sent.
    """
    transport = request.transport
    if transport is not None:
        transport.write(b"SSH-2.0-OpenSSH_9.6\r\n")
        transport.close()
    return web.Response(status=204)
