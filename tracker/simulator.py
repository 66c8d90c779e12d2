"""Local stand-in for Deepvue's bulk-verification API and the S3 bucket holding its output files.

Deepvue publishes no sandbox, so tests, the demo and the benchmark talk to this asyncio
server instead. It imitates what /work/shared/deepvue/API-NOTES.md documents: form-based
``POST /v1/authorize`` returning an HS256 JWT, the two auth headers (``Authorization: Bearer``
and ``x-api-key`` = client secret), FastAPI-style ``{"detail": ...}`` errors, per-key rate
limits, the batch-status envelope, presigned S3-style output URLs that expire, and the UPI
batch submission endpoint. It only ever binds loopback.

Status answers depend on the request_id's prefix, so one server can play every scenario:

=============  ==========================================================================
prefix         behaviour of ``GET /v1/verification/batch-processing-status``
=============  ==========================================================================
(none)         in progress (``data.status`` 201, URL null) until ``completion_delay`` has
               passed since the first status call for the id, then completed
               (``data.status`` 200, a freshly signed ``batch_output_file_url``).
``fail-``      in progress, then ``data.status`` 500 "batch processing failed", URL null.
``invalid-``   HTTP 400 ``{"detail": "Invalid request_id"}``.
``missing-``   HTTP 404 ``{"detail": "request_id not found"}``.
``flaky-``     every odd-numbered status call for the id (1st, 3rd, ...) answers 503
               "Source Unavailable"; the others behave as the default.
``garbage-``   the first 2 calls answer HTTP 200 with the HTML body
               ``<html>upstream gateway</html>``; then the default.
``slow-``      completes after 5 x ``completion_delay``.
``trunc-``     default, but the first GET of the output file is cut (connection closed)
               after half of the response body; later requests, Range resumes included,
               work.
``expire-``    default, but the first output URL handed out is already expired.
``xlsx-``      the output URL path ends in ``.xlsx`` instead of ``.csv``.
``big-``       the output file is ``big_file_size`` bytes instead of ``file_size``.
``ratelimit-`` every status call answers 429 with ``Retry-After: 1``.
``trickle-``   default, but the output file is sent at about 2 KiB/s (256-byte chunks with
               a pause between them): exercises the tracker's overall download deadline.
``stall-``     default, but the output file response sends its headers and first 1 KiB,
               then no byte for an hour (the wait ends early on server shutdown or when
               the client goes away).
``badurl-``    default, but the completed answer carries a URL the tracker must refuse
               before connecting. The simulator never fetches any of these itself:
``badurl-http-``      ``http://bulk-data-processing.s3.ap-south-1.amazonaws.com/...``
                      (plain http to a non-loopback host).
``badurl-file-``      ``file:///etc/passwd``.
``badurl-userinfo-``  the simulator's own signed URL with ``user:pass@`` before the host.
``badurl-host-``      ``https://evil.example.com/...``.
``badurl-metadata-``  ``http://169.254.169.254/latest/meta-data/``.
``badurl-redirect-``  the simulator's own signed file URL, which answers 302 to
                      ``http://169.254.169.254/latest/meta-data/`` (recorded in
                      ``downloads`` with status 302 and counted in ``redirects_served``).
``huge-``      every status call answers HTTP 200 with a valid-looking JSON envelope padded
               to ``huge_answer_size`` bytes (64 MiB), streamed (counted in
               ``errors_served``).
``gzipbomb-``  every status call answers HTTP 200, ``Content-Encoding: gzip``, a few hundred
               KiB on the wire that inflate to ``gzip_bomb_size`` bytes (256 MiB) of
               valid-looking JSON (counted in ``errors_served``).
``endless-``   default, but the output file is sent chunked and never ends (until the
               client goes away or the server stops).
``badetag-``   default, but the output file's ETag is an MD5 that its bytes do not have.
``unframed-``  default, but a full (200) answer for the output file is HTTP/1.0-style: no
               Content-Length, no chunked encoding, the end of the body is the close. At
               random (the ``seed``), half of them close early at a random offset; Range
               answers (206) are framed as usual.
``unframed-noetag-``  as ``unframed-``, and the file has no ETag at all, so nothing can
                      confirm that a body is complete.
=============  ==========================================================================

Order of checks for a status call: ``latency`` sleep, auth (401/403), missing
``request_id`` (422), ``throttle_first`` (429 with ``Retry-After: throttle_retry_after``
for the first N status calls since start or the last reset, whatever their id), configured
rate limits (429, no Retry-After), ``error_rate`` (503), then the prefix table above.

Output files (``GET /upi-basic-batch-output-files/<id>.<csv|xlsx>``) are deterministic CSV
(see :func:`output_bytes`), streamed in 64 KiB chunks with a strong ETag, ``Accept-Ranges``,
single-range ``Range`` support and ``If-Range``. As on S3, the ETag of a file up to
``MULTIPART_THRESHOLD`` (64 MiB) is the quoted MD5 of its bytes (a single-part upload);
a bigger file's is that of a multipart upload, ``"<hex>-<parts>"``, which is no MD5. Test hooks: ``GET /_sim/stats`` and
``POST /_sim/reset``. In the stats, ``status_calls`` counts every authenticated status call
that named a request_id (429 and 503 answers included); ``rate_limited`` counts 429s
(``throttle_first``, limits and the ``ratelimit-`` prefix); ``errors_served`` counts injected
faults (``error_rate`` and ``flaky-`` 503s, ``garbage-`` HTML); ``redirects_served`` counts
``badurl-redirect-`` 302s; ``downloads`` keeps the newest 10,000 requests.
``overlapping_status_calls`` counts the status calls that arrived while another status call
for the same request_id was still being answered (``latency`` makes answers take time), and
``overlapping_by_id`` says how many per request_id: a client that never asks twice at once
about one batch keeps both at zero. Only calls counted in ``status_calls`` count as
overlapping, but every in-flight call for the id (authenticated or not) is overlapped.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import hashlib
import hmac
import ipaddress
import json
import math
import random
import re
import secrets
import signal
import sys
import threading
import time
import uuid
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, Final
from urllib.parse import quote

from aiohttp import BodyPartReader, web

__all__ = [
    "SimulatorConfig",
    "SimulatorHandle",
    "build_app",
    "expected_md5",
    "expected_sha256",
    "expected_size",
    "output_bytes",
    "running_simulator",
    "serve_forever",
]


@dataclass(frozen=True)
class SimulatorConfig:
    client_id: str = "demo-client"
    # The demo's own credentials, valid only against this loopback simulator.
    client_secret: str = "demo-secret"  # noqa: S105
    token_ttl: float = 86400.0
    completion_delay: float = 2.0
    latency: float = 0.0
    error_rate: float = 0.0
    rate_per_second: int | None = None
    rate_per_minute: int | None = None
    rate_per_day: int | None = None
    url_ttl: float = 600.0
    file_size: int = 4096
    big_file_size: int = 8 * 1024 * 1024
    seed: int = 0
    # The first `throttle_first` status calls (since start or /_sim/reset) answer 429 with
    # this Retry-After header, sent verbatim: "300", "1e12" or an HTTP-date.
    throttle_first: int = 0
    throttle_retry_after: str = "300"
    # What ``huge-`` status answers are padded to, and what ``gzipbomb-`` ones inflate to.
    huge_answer_size: int = 64 * 1024 * 1024
    gzip_bomb_size: int = 256 * 1024 * 1024


# --------------------------------------------------------------------------- output content

CHUNK_SIZE: Final = 64 * 1024
OUTPUT_DIR: Final = "/upi-basic-batch-output-files/"
# Bump when the content layout changes, so ETags of old and new content never collide.
_CONTENT_VERSION: Final = "v1"
_ROW_LEN: Final = 128
_ROWS_PER_BLOCK: Final = CHUNK_SIZE // _ROW_LEN
_BLOCK_DIGITS: Final = 8
_HEADER: Final = b"row_id,vpa,name_at_bank,status,match_score,reference\n"
# One column of identical digits per value: rewriting a block's row ids then costs a few
# strided memcpy calls instead of formatting 512 rows in Python.
# Where every hostile output URL below points: cloud metadata, the classic SSRF target.
METADATA_URL: Final = "http://169.254.169.254/latest/meta-data/"
TRICKLE_CHUNK: Final = 256
# 256 bytes every 0.125 s is about 2 KiB/s.
TRICKLE_PAUSE: Final = 0.125
STALL_AFTER: Final = 1024
STALL_SECONDS: Final = 3600.0
_DIGIT_COLUMNS: Final = tuple(bytes([0x30 + d]) * _ROWS_PER_BLOCK for d in range(10))
_HANDLES: Final = ("asha", "ravi", "meera", "arjun", "kavya", "rohan", "divya", "vikram")
_BANKS: Final = ("okaxis", "oksbi", "okhdfcbank", "okicici", "ybl", "paytm", "ibl", "upi")
_FIRST: Final = ("ASHA", "RAVI", "MEERA", "ARJUN", "KAVYA", "ROHAN", "DIVYA", "VIKRAM")
_LAST: Final = ("SHARMA", "IYER", "REDDY", "GUPTA", "NAIR", "PATEL", "SINGH", "RAO")


@lru_cache(maxsize=256)
def _block_template(request_id: str) -> bytes:
    """512 fixed-width CSV rows for one id; each 64 KiB block stamps its number into it."""
    rows = []
    for i in range(_ROWS_PER_BLOCK):
        digest = hashlib.sha256(f"{request_id}\x00{i}".encode()).hexdigest()
        vpa = f"{_HANDLES[int(digest[0], 16) % 8]}{digest[1:7]}@{_BANKS[int(digest[7], 16) % 8]}"
        name = f"{_FIRST[int(digest[8], 16) % 8]} {_LAST[int(digest[9], 16) % 8]}"
        status = "NOT_FOUND" if int(digest[10:12], 16) < 26 else "VERIFIED"
        score = int(digest[12:14], 16) * 100 // 255
        prefix = f"{'0' * _BLOCK_DIGITS}-{i:03d},{vpa},{name},{status},{score},"
        filler = (digest * 2)[: _ROW_LEN - 1 - len(prefix)]
        row = f"{prefix}{filler}\n".encode()
        assert len(row) == _ROW_LEN
        rows.append(row)
    return b"".join(rows)


def _iter_content(request_id: str, end: int, start: int = 0) -> Iterator[bytes]:
    """Bytes [start, end) of the id's content stream; a shorter file is a prefix of a longer."""
    header_len = len(_HEADER)
    pos = start
    if pos < header_len and pos < end:
        stop = min(header_len, end)
        yield _HEADER[pos:stop]
        pos = stop
    if pos >= end:
        return
    buf = bytearray(_block_template(request_id))
    block, offset = divmod(pos - header_len, CHUNK_SIZE)
    while pos < end:
        digits = b"%08d" % (block % 10**_BLOCK_DIGITS)
        for column, digit in enumerate(digits):
            buf[column::_ROW_LEN] = _DIGIT_COLUMNS[digit - 0x30]
        take = min(CHUNK_SIZE - offset, end - pos)
        yield bytes(buf[offset : offset + take]) if take != CHUNK_SIZE else bytes(buf)
        pos += take
        block += 1
        offset = 0


def output_bytes(request_id: str, size: int) -> Iterator[bytes]:
    """The deterministic output file for ``request_id``: exactly ``size`` bytes, in chunks."""
    return _iter_content(request_id, size)


def expected_sha256(request_id: str, size: int) -> str:
    digest = hashlib.sha256()
    for chunk in _iter_content(request_id, size):
        digest.update(chunk)
    return digest.hexdigest()


def expected_size(request_id: str, config: SimulatorConfig) -> int:
    return config.big_file_size if request_id.startswith("big-") else config.file_size


# S3's console and CLIs switch to multipart uploads for big files; their ETags are no MD5.
MULTIPART_THRESHOLD: Final = 64 * 1024 * 1024
_MULTIPART_PART: Final = 8 * 1024 * 1024
# Files up to this size are hashed for their ETag on the event loop; bigger ones in a thread.
_INLINE_MD5_BYTES: Final = 1024 * 1024


@lru_cache(maxsize=1024)
def _etag(request_id: str, size: int) -> str | None:
    """The file's ETag as S3 gives it: the content MD5, quoted, for a single-part object."""
    if request_id.startswith("unframed-noetag-"):
        return None
    if request_id.startswith("badetag-"):
        other = hashlib.md5(b"other bytes " + request_id.encode(), usedforsecurity=False)
        return f'"{other.hexdigest()}"'
    if size > MULTIPART_THRESHOLD:
        # Content is a pure function of (id, size, layout version): no need to hash it.
        token = hashlib.sha256(f"{_CONTENT_VERSION}\x00{request_id}\x00{size}".encode()).hexdigest()
        return f'"{token[:32]}-{-(-size // _MULTIPART_PART)}"'
    return f'"{expected_md5(request_id, size)}"'


def expected_md5(request_id: str, size: int) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    for chunk in _iter_content(request_id, size):
        digest.update(chunk)
    return digest.hexdigest()


class _UnframedResponse(web.StreamResponse):
    """An answer with neither Content-Length nor chunked encoding: the close ends it."""

    _length_check = False


@lru_cache(maxsize=4)
def _gzip_bomb(size: int) -> bytes:
    """A gzip stream of a JSON envelope padded with spaces to `size` bytes: ~0.1 % of it."""
    squeeze = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    head, tail = _padded_envelope_ends()
    parts = [squeeze.compress(head)]
    block = b" " * CHUNK_SIZE
    blocks, rest = divmod(max(size - len(head) - len(tail), 0), CHUNK_SIZE)
    for _ in range(blocks):
        parts.append(squeeze.compress(block))
    parts.append(squeeze.compress(block[:rest] + tail) + squeeze.flush())
    return b"".join(parts)


def _padded_envelope_ends() -> tuple[bytes, bytes]:
    """The start and end of a status envelope whose padding goes in between."""
    head = (
        b'{"transaction_id": "0", "timestamp": 0, "code": 200, "message": "Batch Upload '
        b'status fetched successfully", "sub_code": "SUCCESS", "data": {"status": 201, '
        b'"message": "batch processing in progress", "batch_output_file_url": null, "pad": "'
    )
    return head, b'"}}'


# --------------------------------------------------------------------------- helpers


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _now_ms() -> int:
    return int(time.time() * 1000)


def _detail(status: int, detail: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"detail": detail}, status=status, headers=headers)


def _missing_field(location: str, name: str) -> web.Response:
    return _detail(
        422, [{"loc": [location, name], "msg": "field required", "type": "value_error.missing"}]
    )


def _s3_error(status: int, code: str, message: str) -> web.Response:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message></Error>"
    )
    return web.Response(status=status, text=body, content_type="application/xml")


_RANGE_RE: Final = re.compile(r"bytes=(\d*)-(\d*)", re.ASCII | re.IGNORECASE)


def _parse_range(header: str, size: int) -> tuple[int, int] | str | None:
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


# --------------------------------------------------------------------------- server state


@dataclass
class _IdState:
    first_call: float | None = None
    dispatched: int = 0
    urls_issued: int = 0
    downloads: int = 0


class _RateLimiter:
    """Independent sliding windows per API key; only admitted calls consume quota."""

    def __init__(self, limits: list[tuple[float, int]]) -> None:
        self._limits = limits
        self._hits: dict[str, list[deque[float]]] = {}

    @property
    def enabled(self) -> bool:
        return bool(self._limits)

    def allow(self, key: str, now: float) -> bool:
        queues = self._hits.get(key)
        if queues is None:
            queues = self._hits[key] = [deque() for _ in self._limits]
        for (window, limit), hits in zip(self._limits, queues, strict=True):
            cutoff = now - window
            while hits and hits[0] <= cutoff:
                hits.popleft()
            if len(hits) >= limit:
                return False
        for hits in queues:
            hits.append(now)
        return True


# Downloads are recorded for tests; a benchmark may make millions, so keep only the newest.
_MAX_RECORDED_DOWNLOADS: Final = 10_000


class _Simulator:
    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.base_url: str | None = None
        # Fresh per instance: a restarted simulator invalidates old tokens and URLs, as a
        # real key rotation would, which exercises the tracker's re-authorize path.
        self._key = secrets.token_bytes(32)
        # Separate stream so submissions never shift the error_rate sequence for a seed.
        self._id_rng = random.Random(f"{config.seed}:request-ids")
        # Set on shutdown so `stall-` responses end instead of holding the server for an hour.
        self.stopping = asyncio.Event()
        self._generation = 0
        self.reset()

    def reset(self) -> None:
        cfg = self.config
        self._rng = random.Random(cfg.seed)
        limits = [
            (window, limit)
            for window, limit in (
                (1.0, cfg.rate_per_second),
                (60.0, cfg.rate_per_minute),
                (86400.0, cfg.rate_per_day),
            )
            if limit is not None
        ]
        self._limiter = _RateLimiter(limits)
        self._ids: dict[str, _IdState] = {}
        self.authorize_calls = 0
        self.status_calls: dict[str, int] = {}
        self.status_calls_total = 0
        self.rate_limited = 0
        self.errors_served = 0
        self.downloads: deque[dict[str, Any]] = deque(maxlen=_MAX_RECORDED_DOWNLOADS)
        self.submissions = 0
        self.redirects_served = 0
        # Status calls being answered right now, per request_id. A call remembers the
        # generation it started in, so that one still in flight across a reset does not
        # uncount a call of the new generation.
        self._generation += 1
        self._in_flight: dict[str, int] = {}
        self.overlapping_status_calls = 0
        self.overlapping_by_id: dict[str, int] = {}

    def snapshot(self) -> dict[str, Any]:
        stats = {
            "authorize_calls": self.authorize_calls,
            "status_calls": self.status_calls,
            "status_calls_total": self.status_calls_total,
            "rate_limited": self.rate_limited,
            "errors_served": self.errors_served,
            "downloads": list(self.downloads),
            "submissions": self.submissions,
            "redirects_served": self.redirects_served,
            "overlapping_status_calls": self.overlapping_status_calls,
            "overlapping_by_id": self.overlapping_by_id,
        }
        # A deep, JSON-identical copy: callers on other threads must not see later mutation.
        result: dict[str, Any] = json.loads(json.dumps(stats))
        return result

    def _base_url(self, request: web.Request) -> str:
        if self.base_url is not None:
            return self.base_url
        return f"{request.scheme}://{request.host}"

    def _state(self, request_id: str) -> _IdState:
        state = self._ids.get(request_id)
        if state is None:
            state = self._ids[request_id] = _IdState()
        return state

    # ----------------------------------------------------------------------- tokens

    def _sign(self, data: str) -> bytes:
        return hmac.new(self._key, data.encode(), hashlib.sha256).digest()

    def _make_token(self, subject: str, expires_at: int) -> str:
        header = _b64url(b'{"alg":"HS256","typ":"JWT"}')
        payload = _b64url(
            json.dumps({"sub": subject, "exp": expires_at}, separators=(",", ":")).encode()
        )
        signature = _b64url(self._sign(f"{header}.{payload}"))
        return f"{header}.{payload}.{signature}"

    def _token_valid(self, token: str) -> bool:
        parts = token.split(".")
        if len(parts) != 3:
            return False
        expected = _b64url(self._sign(f"{parts[0]}.{parts[1]}"))
        if not hmac.compare_digest(expected.encode(), parts[2].encode("utf-8", "replace")):
            return False
        try:
            claims = json.loads(_b64url_decode(parts[1]))
        except (ValueError, binascii.Error):
            return False
        if not isinstance(claims, dict):
            return False
        expires_at = claims.get("exp")
        if not isinstance(expires_at, int | float) or time.time() >= expires_at:
            return False
        return bool(claims.get("sub") == self.config.client_id)

    def _auth_error(self, request: web.Request) -> web.Response | None:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        token = token.strip()
        api_key = request.headers.get("x-api-key")
        if scheme.lower() != "bearer" or not token or not api_key:
            return _detail(401, "Not authenticated")
        if not self._token_valid(token):
            return _detail(403, "Not a valid token")
        if not hmac.compare_digest(
            api_key.encode("utf-8", "replace"), self.config.client_secret.encode()
        ):
            return _detail(401, "Could not validate credentials")
        return None

    # ----------------------------------------------------------------------- presigned URLs

    def _url_signature(self, name: str, date: str, expires: str) -> str:
        return hmac.new(
            self._key, f"{name}\n{date}\n{expires}".encode(), hashlib.sha256
        ).hexdigest()

    def _signed_url(self, request: web.Request, request_id: str, state: _IdState) -> str:
        ext = "xlsx" if request_id.startswith("xlsx-") else "csv"
        name = f"{request_id}.{ext}"
        expires = max(0, math.ceil(self.config.url_ttl))
        issued = int(time.time())
        state.urls_issued += 1
        if request_id.startswith("expire-") and state.urls_issued == 1:
            issued -= expires + 60
        date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(issued))
        signature = self._url_signature(name, date, str(expires))
        path_and_query = (
            f"{OUTPUT_DIR}{quote(name, safe='')}"
            f"?X-Amz-Expires={expires}&X-Amz-Date={date}&X-Amz-Signature={signature}"
        )
        base_url = self._base_url(request)
        if request_id.startswith("badurl-http-"):
            return f"http://bulk-data-processing.s3.ap-south-1.amazonaws.com{path_and_query}"
        if request_id.startswith("badurl-file-"):
            return "file:///etc/passwd"
        if request_id.startswith("badurl-userinfo-"):
            scheme, _, host = base_url.partition("://")
            return f"{scheme}://user:pass@{host}{path_and_query}"
        if request_id.startswith("badurl-host-"):
            return f"https://evil.example.com{path_and_query}"
        if request_id.startswith("badurl-metadata-"):
            return METADATA_URL
        return f"{base_url}{path_and_query}"

    # ----------------------------------------------------------------------- handlers

    async def authorize(self, request: web.Request) -> web.StreamResponse:
        self.authorize_calls += 1
        try:
            form = await request.post()
        except ValueError:
            return _missing_field("body", "client_id")
        values: dict[str, str] = {}
        for name in ("client_id", "client_secret"):
            value = form.get(name)
            if isinstance(value, web.FileField):
                value = value.file.read().decode("utf-8", "replace")
            if not isinstance(value, str):
                return _missing_field("body", name)
            values[name] = value
        good_id = hmac.compare_digest(values["client_id"].encode(), self.config.client_id.encode())
        good_secret = hmac.compare_digest(
            values["client_secret"].encode(), self.config.client_secret.encode()
        )
        if not (good_id and good_secret):
            return _detail(401, "Invalid client_id or client_secret, access Denied")
        expires_at = int(time.time() + self.config.token_ttl)
        return web.json_response(
            {
                "access_token": self._make_token(values["client_id"], expires_at),
                "token_type": "bearer",
                "expiry": datetime.fromtimestamp(expires_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
        )

    async def status(self, request: web.Request) -> web.StreamResponse:
        request_id = request.query.get("request_id")
        if request_id is None:
            return await self._status(request, None, overlapping=False)
        # In flight from arrival to answer, the latency sleep included.
        generation = self._generation
        in_flight = self._in_flight
        overlapping = in_flight.get(request_id, 0) > 0
        in_flight[request_id] = in_flight.get(request_id, 0) + 1
        try:
            return await self._status(request, request_id, overlapping=overlapping)
        finally:
            if generation == self._generation:
                left = in_flight[request_id] - 1
                if left:
                    in_flight[request_id] = left
                else:
                    del in_flight[request_id]

    async def _status(
        self, request: web.Request, request_id: str | None, *, overlapping: bool
    ) -> web.StreamResponse:
        cfg = self.config
        if cfg.latency > 0:
            await asyncio.sleep(cfg.latency)
        error = self._auth_error(request)
        if error is not None:
            return error
        if request_id is None:
            return _missing_field("query", "request_id")
        self.status_calls_total += 1
        self.status_calls[request_id] = self.status_calls.get(request_id, 0) + 1
        if overlapping:
            self.overlapping_status_calls += 1
            self.overlapping_by_id[request_id] = self.overlapping_by_id.get(request_id, 0) + 1
        if self.status_calls_total <= cfg.throttle_first:
            self.rate_limited += 1
            return _detail(
                429,
                "Rate limit exceeded. Please retry after some time.",
                headers={"Retry-After": cfg.throttle_retry_after},
            )
        if self._limiter.enabled and not self._limiter.allow(
            request.headers["x-api-key"], time.monotonic()
        ):
            self.rate_limited += 1
            return _detail(429, "Rate limit exceeded. Please retry after some time.")
        if cfg.error_rate > 0 and self._rng.random() < cfg.error_rate:
            self.errors_served += 1
            return _detail(503, "Source Unavailable")
        if request_id.startswith(("huge-", "gzipbomb-")):
            self._state(request_id).dispatched += 1
            self.errors_served += 1
            return await self._oversized_answer(request, request_id)
        return self._status_by_prefix(request, request_id)

    async def _oversized_answer(self, request: web.Request, request_id: str) -> web.StreamResponse:
        """``huge-``: a padded envelope streamed in full; ``gzipbomb-``: its gzip bomb."""
        if request_id.startswith("gzipbomb-"):
            loop = asyncio.get_running_loop()
            bomb = await loop.run_in_executor(None, _gzip_bomb, self.config.gzip_bomb_size)
            return web.Response(
                body=bomb,
                headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
            )
        head, tail = _padded_envelope_ends()
        size = max(self.config.huge_answer_size, len(head) + len(tail))
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = size
        await response.prepare(request)
        block = b" " * CHUNK_SIZE
        try:
            await response.write(head)
            left = size - len(head) - len(tail)
            while left > 0 and not self.stopping.is_set():
                await response.write(block[: min(left, CHUNK_SIZE)])
                left -= CHUNK_SIZE
            await response.write(tail)
            await response.write_eof()
        except ConnectionError:
            pass  # the client stopped reading, as it should
        return response

    def _status_by_prefix(self, request: web.Request, request_id: str) -> web.Response:
        now = time.monotonic()
        state = self._state(request_id)
        if state.first_call is None:
            state.first_call = now
        state.dispatched += 1
        if request_id.startswith("invalid-"):
            return _detail(400, "Invalid request_id")
        if request_id.startswith("missing-"):
            return _detail(404, "request_id not found")
        if request_id.startswith("ratelimit-"):
            self.rate_limited += 1
            return _detail(
                429,
                "Rate limit exceeded. Please retry after some time.",
                headers={"Retry-After": "1"},
            )
        if request_id.startswith("flaky-") and state.dispatched % 2 == 1:
            self.errors_served += 1
            return _detail(503, "Source Unavailable")
        if request_id.startswith("garbage-") and state.dispatched <= 2:
            self.errors_served += 1
            return web.Response(text="<html>upstream gateway</html>", content_type="text/html")

        delay = self.config.completion_delay * (5 if request_id.startswith("slow-") else 1)
        if now - state.first_call < delay:
            data = {"status": 201, "message": "batch processing in progress", "url": None}
        elif request_id.startswith("fail-"):
            data = {"status": 500, "message": "batch processing failed", "url": None}
        else:
            data = {
                "status": 200,
                "message": "batch processing completed",
                "url": self._signed_url(request, request_id, state),
            }
        return web.json_response(
            {
                "transaction_id": uuid.uuid4().hex,
                "timestamp": _now_ms(),
                "code": 200,
                "message": "Batch Upload status fetched successfully",
                "sub_code": "SUCCESS",
                "data": {
                    "request_id": request_id,
                    "status": data["status"],
                    "product_id": "",
                    "message": data["message"],
                    "batch_output_file_url": data["url"],
                },
            }
        )

    async def submit(self, request: web.Request) -> web.StreamResponse:
        error = self._auth_error(request)
        if error is not None:
            return error
        found = False
        if request.content_type == "multipart/form-data":
            try:
                reader = await request.multipart()
                # Drain part by part: uploads may be large and must not be held in memory.
                while (part := await reader.next()) is not None:
                    if isinstance(part, BodyPartReader) and part.name == "batch_file":
                        found = True
                    await part.release()
            except ValueError:
                found = False
        if not found:
            return _missing_field("body", "batch_file")
        self.submissions += 1
        return web.json_response(
            {
                "code": 201,
                "timestamp": _now_ms(),
                "transaction_id": uuid.uuid4().hex,
                "request_id": f"{self._id_rng.getrandbits(128):032x}",
                "message": "batch processing in progress",
                "sub_code": "SUCCESS",
                "output_batch_file": "",
            }
        )

    async def download(self, request: web.Request) -> web.StreamResponse:
        record: dict[str, Any] = {
            "method": request.method,
            "path": request.path,
            "headers": {key.lower(): value for key, value in request.headers.items()},
            "status": 0,
        }
        self.downloads.append(record)
        response = await self._serve_file(request, record)
        return response

    def _check_presigned(self, request: web.Request, name: str) -> web.Response | None:
        query = request.query
        date = query.get("X-Amz-Date", "")
        expires = query.get("X-Amz-Expires", "")
        signature = query.get("X-Amz-Signature", "")
        expected = self._url_signature(name, date, expires)
        if not hmac.compare_digest(expected.encode(), signature.encode("utf-8", "replace")):
            return _s3_error(403, "SignatureDoesNotMatch", "Signature does not match")
        issued = datetime.strptime(date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()
        if time.time() >= issued + int(expires):
            return _s3_error(403, "AccessDenied", "Request has expired")
        return None

    async def _serve_file(self, request: web.Request, record: dict[str, Any]) -> web.StreamResponse:
        name = request.match_info["name"]
        denied = self._check_presigned(request, name)
        if denied is not None:
            record["status"] = denied.status
            return denied
        request_id, dot, ext = name.rpartition(".")
        if not dot or ext not in ("csv", "xlsx"):
            record["status"] = 404
            return _s3_error(404, "NoSuchKey", "The specified key does not exist.")
        if request_id.startswith("badurl-redirect-"):
            self.redirects_served += 1
            record["status"] = 302
            record["location"] = METADATA_URL
            return web.Response(status=302, headers={"Location": METADATA_URL})

        size = expected_size(request_id, self.config)
        if size <= _INLINE_MD5_BYTES:
            etag = _etag(request_id, size)  # microseconds, and cached
        else:
            # Hashed once per file (cached), in a thread: up to 64 MiB of MD5.
            etag = await asyncio.get_running_loop().run_in_executor(None, _etag, request_id, size)
        headers = {
            "Accept-Ranges": "bytes",
            "Content-Type": (
                "text/csv"
                if ext == "csv"
                else "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
            ),
        }
        if etag is not None:
            headers["ETag"] = etag
        first, last, status = 0, size - 1, 200
        range_header = request.headers.get("Range")
        if_range = request.headers.get("If-Range")
        if range_header is not None and (if_range is None or if_range.strip() == etag):
            parsed = _parse_range(range_header, size)
            if parsed == "416":
                record["status"] = 416
                return web.Response(
                    status=416,
                    headers={
                        "Content-Range": f"bytes */{size}",
                        **({"ETag": etag} if etag else {}),
                    },
                )
            if isinstance(parsed, tuple):
                first, last = parsed
                status = 206
                headers["Content-Range"] = f"bytes {first}-{last}/{size}"
        length = last - first + 1

        cut: int | None = None
        if request.method == "GET":
            state = self._state(request_id)
            state.downloads += 1
            if request_id.startswith("trunc-") and state.downloads == 1:
                cut = length // 2
        unframed = request_id.startswith("unframed-") and status == 200
        if unframed and request.method == "GET" and length > 1 and self._rng.random() < 0.5:
            cut = self._rng.randrange(1, length)

        record["status"] = status
        response: web.StreamResponse
        if request_id.startswith("endless-") and status == 200:
            response = web.StreamResponse(status=status, headers=headers)
            response.enable_chunked_encoding()
            await response.prepare(request)
            if request.method == "GET":
                await self._endless(response, request_id)
            return response
        if unframed:
            response = _UnframedResponse(status=status, headers=headers)
            response.force_close()
        else:
            response = web.StreamResponse(status=status, headers=headers)
            response.content_length = length
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        stop = first + (cut if cut is not None else length)
        if request_id.startswith("trickle-"):
            await self._trickle(response, request_id, first, stop)
        elif request_id.startswith("stall-"):
            await self._stall(request, response, request_id, first, stop)
            return response
        else:
            for chunk in _iter_content(request_id, stop, first):
                await response.write(chunk)
        if cut is not None:
            # Closing the socket mid-body is what a reset S3 connection looks like: the client
            # gets a short read against Content-Length and must resume with Range.
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write_eof()
        return response

    async def _endless(self, response: web.StreamResponse, request_id: str) -> None:
        """The content stream of a file that never ends, until the client goes away."""
        try:
            for chunk in _iter_content(request_id, 1 << 62):
                if self.stopping.is_set():
                    break
                await response.write(chunk)
        except ConnectionError:
            return

    async def _trickle(
        self, response: web.StreamResponse, request_id: str, first: int, stop: int
    ) -> None:
        pending = b"".join(_iter_content(request_id, stop, first))
        for offset in range(0, len(pending), TRICKLE_CHUNK):
            if offset:
                await asyncio.sleep(TRICKLE_PAUSE)
            await response.write(pending[offset : offset + TRICKLE_CHUNK])

    async def _stall(
        self,
        request: web.Request,
        response: web.StreamResponse,
        request_id: str,
        first: int,
        stop: int,
    ) -> None:
        head = b"".join(_iter_content(request_id, min(stop, first + STALL_AFTER), first))
        await response.write(head)
        deadline = time.monotonic() + STALL_SECONDS
        # Poll for a gone client too: aiohttp does not cancel handlers on disconnect, and a
        # long-running fake-api must not pile up hour-long stalled handlers.
        while not self.stopping.is_set() and time.monotonic() < deadline:
            transport = request.transport
            if transport is None or transport.is_closing():
                return
            try:
                await asyncio.wait_for(self.stopping.wait(), timeout=0.5)
            except TimeoutError:
                continue
        # Never complete the body: the client sees a short read against Content-Length.
        if request.transport is not None:
            request.transport.close()

    async def stats(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.snapshot())

    async def reset_endpoint(self, request: web.Request) -> web.StreamResponse:
        self.reset()
        return web.json_response({"reset": True})


_SIMULATOR_KEY: Final = web.AppKey("deepvue_simulator", _Simulator)


def build_app(config: SimulatorConfig) -> web.Application:
    simulator = _Simulator(config)
    app = web.Application()
    app[_SIMULATOR_KEY] = simulator

    async def stop_stalls(app: web.Application) -> None:
        simulator.stopping.set()

    app.on_shutdown.append(stop_stalls)
    app.router.add_post("/v1/authorize", simulator.authorize)
    app.router.add_get("/v1/verification/batch-processing-status", simulator.status)
    app.router.add_post("/v1/verification/upi-basic/batch", simulator.submit)
    app.router.add_get(OUTPUT_DIR + "{name}", simulator.download)
    app.router.add_get("/_sim/stats", simulator.stats)
    app.router.add_post("/_sim/reset", simulator.reset_endpoint)
    return app


# --------------------------------------------------------------------------- running it


def _loopback_host(host: str) -> str:
    if host == "localhost":
        # "localhost" may resolve to several (or odd) addresses; pin the IPv4 loopback.
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"the simulator binds loopback only; {host!r} is not an IP") from None
    if not address.is_loopback:
        raise ValueError(f"the simulator binds loopback only; {host!r} is not loopback")
    return host


async def _start(
    config: SimulatorConfig, host: str, port: int
) -> tuple[web.AppRunner, _Simulator, str]:
    app = build_app(config)
    # access_log=None: aiohttp's access log would print presigned query strings.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    try:
        # A deep backlog so a benchmark's connection burst is queued, not refused.
        site = web.TCPSite(runner, host, port, backlog=1024)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_host, bound_port = runner.addresses[0][:2]
    url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
    base_url = f"http://{url_host}:{bound_port}"
    simulator = app[_SIMULATOR_KEY]
    simulator.base_url = base_url
    return runner, simulator, base_url


def serve_forever(
    config: SimulatorConfig,
    host: str = "127.0.0.1",
    port: int = 0,
    announce: Callable[[str], None] = print,
) -> None:
    """Serve until SIGTERM or SIGINT (must run on the main thread); announce the base URL once."""
    bind_host = _loopback_host(host)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        runner, _, base_url = await _start(config, bind_host, port)
        signals = (signal.SIGTERM, signal.SIGINT)
        try:
            for signum in signals:
                loop.add_signal_handler(signum, stop.set)
            announce(base_url)
            if announce is print:
                # Whoever launched us is likely reading our stdout through a pipe.
                sys.stdout.flush()
            await stop.wait()
        finally:
            for signum in signals:
                loop.remove_signal_handler(signum)
            await runner.cleanup()

    asyncio.run(main())


class SimulatorHandle:
    """A simulator running on a background thread; methods are safe to call from any thread."""

    def __init__(
        self, base_url: str, loop: asyncio.AbstractEventLoop, simulator: _Simulator
    ) -> None:
        self.base_url = base_url
        self._loop = loop
        self._simulator = simulator

    def _on_loop(self, fn: Callable[[], Any]) -> Any:
        async def call() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(timeout=30)

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self._on_loop(self._simulator.snapshot)
        return result

    def reset(self) -> None:
        self._on_loop(self._simulator.reset)


@contextmanager
def running_simulator(config: SimulatorConfig) -> Iterator[SimulatorHandle]:
    """Run a simulator on 127.0.0.1:<free port> in a daemon thread with its own event loop."""
    started: concurrent.futures.Future[tuple[SimulatorHandle, Callable[[], None]]] = (
        concurrent.futures.Future()
    )

    async def main() -> None:
        runner, simulator, base_url = await _start(config, "127.0.0.1", 0)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        handle = SimulatorHandle(base_url, loop, simulator)

        def request_stop() -> None:
            loop.call_soon_threadsafe(stop.set)

        started.set_result((handle, request_stop))
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:
            if started.done():
                raise
            # A failure to start belongs to the caller waiting on `started`.
            started.set_exception(exc)

    thread = threading.Thread(target=run, name="deepvue-simulator", daemon=True)
    thread.start()
    handle, request_stop = started.result(timeout=30)
    try:
        yield handle
    finally:
        request_stop()
        thread.join(timeout=30)
