"""Fetch a batch's output file onto local disk: streamed, verified, published atomically.

The file holds customer KYC data and its URL may be a presigned bearer secret, so:
- the URL and every redirect target are checked against an allow-list before any
  connection (see `tracker.domain.urls`), and only redacted URLs reach logs and errors;
- the HTTP client carries no API credentials (httpx forwards custom headers such as
  `x-api-key` across hosts on redirects, so the download client must never have them);
- the bytes go to a hidden temp file in the destination directory with a fixed mode,
  and only a complete, length-checked, fsynced file is renamed to its final name.

Two costs shape the code below. A big file is hashed and written by a worker thread
while the event loop receives the next bytes (hashlib and os.write release the GIL), so
the tracker keeps up with the network. A small file, the common case by far, is written
on the event loop with no thread hop per chunk, and everything a fetch does per file
(name checks, log lines, the directory fsync shared by fetches that publish together)
is kept to what the file needs.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import http.cookiejar
import itertools
import os
import re
import secrets
import threading
import time
import urllib.request
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import structlog
import yarl

from tracker.domain.urls import (
    OUTPUT_EXTENSIONS,
    UrlRefused,
    check_download_url,
    output_extension,
    redact_url,
)

__all__ = [
    "DEFAULT_MAX_FILE_SIZE",
    "ChecksumMismatch",
    "DownloadError",
    "DownloadInterrupted",
    "DownloadRefused",
    "DownloadedFile",
    "Downloader",
    "FileTooLarge",
    "OutputUnwritable",
    "OwnershipLost",
    "UrlExpired",
    "make_download_http_client",
]

MAX_REDIRECTS = 5
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# S3 answers 403 "Request has expired" for a stale presigned URL; 401 and 410 mean the
# same for our purpose: this URL will not work again, a fresh one must be polled for.
_EXPIRED_STATUSES = frozenset({401, 403, 410})
# Errors that mean the connection broke while the body was arriving: worth a Range resume.
_CUT_SHORT = (httpx.RemoteProtocolError, httpx.ReadError, httpx.ReadTimeout)
# The output directory cannot take the file: an operator must act (free space, fix
# permissions, remount); the batch itself is fine, so these stay retryable.
_UNWRITABLE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
)
# A single-part S3 object's ETag is the MD5 of its bytes: 32 hex digits, quoted. A
# multipart upload's has a dash and a part count, and is no checksum of the content.
_MD5_ETAG = re.compile(r'"([0-9a-fA-F]{32})"')
# TRACKER_MAX_FILE_SIZE's default: the largest output file accepted.
DEFAULT_MAX_FILE_SIZE = 10 << 30
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.IGNORECASE)

# What aiohttp buffers per connection before it stops reading the socket (it pauses at
# twice this): enough to keep bytes coming while the writer catches up, little memory.
_SOCKET_BUFFER = 1 << 18
# Up to this many bytes of a file are written and hashed on the event loop: a thread hop
# costs more than writing a small file, and most output files are small.
_INLINE_BYTES = 1 << 20
# Bytes received while the writer thread is busy with the previous ones; past this, the
# event loop waits for the writer (and aiohttp stops reading the socket), which keeps the
# daemon's memory bounded whatever the network's speed against the disk's.
_QUEUE_BYTES = 2 << 20
_BATCH_BYTES = 1 << 20
# Every this many bytes the writer asks the kernel to start writing the file back, so
# that the fsync before publishing waits for the last few MiB instead of the whole file.
_WRITEBACK_BYTES = 8 << 20
_TEMP_SUFFIX = ".part"
_FADV_DONTNEED: int | None = getattr(os, "POSIX_FADV_DONTNEED", None)  # not on macOS


@dataclass(frozen=True)
class DownloadedFile:
    path: Path
    size: int
    sha256: str


class DownloadError(Exception):
    """A download did not complete. The message is safe to log (redacted URLs only)."""

    retryable: bool = True


class DownloadRefused(DownloadError):
    """The URL, or a redirect target, is not allowed: retrying the same URL cannot help."""

    retryable = False


class UrlExpired(DownloadError):
    """The file host refused the URL (401/403/410): poll the API again for a fresh URL."""


class DownloadInterrupted(DownloadError):
    """Network failure, server error, truncation, deadline or length mismatch."""


class OutputUnwritable(DownloadError):
    """The output directory cannot be written (full, quota, read-only, permissions)."""


class FileTooLarge(OutputUnwritable):
    """The file is larger than TRACKER_MAX_FILE_SIZE, by its Content-Length or its body.

    Like a full disk, an operator must act (raise the limit) and the batch is not at
    fault, so it stays ready and retryable without counting an attempt.
    """


class ChecksumMismatch(DownloadInterrupted):
    """The bytes received disagree with the file host's own MD5 (a single-part ETag)."""


class OwnershipLost(DownloadError):
    """keep_alive() said another instance owns the batch now; nothing was published."""

    retryable = False


def make_download_http_client(
    timeout: float, *, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    """The client for output files: no API headers at all, redirects handled by Downloader.

    `transport` exists for tests (httpx.MockTransport); production leaves it None.
    """
    # Deliberately no `headers=`: this client talks to S3 (or wherever a redirect
    # points), and Deepvue credentials must never travel there. Redirects are off so
    # that Downloader can check every hop against the allow-list before connecting.
    return httpx.AsyncClient(
        timeout=timeout,
        follow_redirects=False,
        # httpx keeps the cookies a server sets and sends them back, to any host the
        # cookie's domain covers; a file host has no business tracking the tracker.
        cookies=http.cookiejar.CookieJar(http.cookiejar.DefaultCookiePolicy(allowed_domains=[])),
        transport=transport if transport is not None else _FileHostTransport(),
    )


# -- the transport -----------------------------------------------------------------


class _FileHostTransport(httpx.AsyncBaseTransport):
    """httpx's API over an aiohttp connection pool, for output files.

    httpx's own pool (httpcore) reads 64 KiB at a time and costs several times aiohttp's
    CPU per request; both matter here, for a 1 GiB file and for thousands of 48-byte ones.
    The URL goes to aiohttp as already-encoded text: yarl would otherwise re-encode it
    (%2F in a query becomes /, for one), which breaks a presigned S3 URL's signature.
    """

    def __init__(self) -> None:
        # httpx's default context (certifi, SSL_CERT_FILE/DIR honoured), the same trust
        # the API client has; verification stays on.
        self._ssl_context = httpx.create_ssl_context()
        self._session: aiohttp.ClientSession | None = None
        self._timeout_given: dict[str, float | None] | None = None
        self._timeout = aiohttp.ClientTimeout()

    def _open_session(self) -> aiohttp.ClientSession:
        # Opened on the first request, inside the event loop that will use it.
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=100, ssl=self._ssl_context),
            cookie_jar=aiohttp.DummyCookieJar(),
            # Honour HTTPS_PROXY / NO_PROXY like httpx does, but only when one is set:
            # aiohttp then looks them (and ~/.netrc) up again for every request.
            trust_env=bool(urllib.request.getproxies_environment()),
            auto_decompress=False,
            read_bufsize=_SOCKET_BUFFER,
        )

    def _timeout_of(self, request: httpx.Request) -> aiohttp.ClientTimeout:
        given: dict[str, float | None] = request.extensions.get("timeout", {})
        if given != self._timeout_given:  # the same every time, in practice
            self._timeout_given = given
            # aiohttp's `connect` covers waiting for a pooled connection, httpx's `pool`.
            # No total: the Downloader's own deadline bounds a whole download, and
            # aiohttp's default total of 300 s would cut a big file short.
            self._timeout = aiohttp.ClientTimeout(
                total=None,
                connect=given.get("pool"),
                sock_connect=given.get("connect"),
                sock_read=given.get("read"),
            )
        return self._timeout

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method != "GET":
            raise httpx.UnsupportedProtocol(
                "the output file transport only sends GET requests", request=request
            )
        if self._session is None:
            self._session = self._open_session()
        try:
            response = await self._session.request(
                "GET",
                yarl.URL(str(request.url), encoded=True),
                headers=request.headers.multi_items(),
                allow_redirects=False,
                timeout=self._timeout_of(request),
            )
        except aiohttp.ClientError as exc:
            raise _httpx_error(exc, request) from exc
        return httpx.Response(
            response.status,
            headers=response.raw_headers,
            stream=_ResponseBody(response, request),
            request=request,
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class _ResponseBody(httpx.AsyncByteStream):
    def __init__(self, response: aiohttp.ClientResponse, request: httpx.Request) -> None:
        self._response = response
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        content = self._response.content
        try:
            while True:
                # The pieces as they came off the socket: read(n) would join and split
                # them, copying every byte once more.
                chunk, end_of_http_chunk = await content.readchunk()
                if chunk:
                    yield chunk
                elif not end_of_http_chunk:
                    return
        except aiohttp.ClientError as exc:
            raise _httpx_error(exc, self._request) from exc

    async def aclose(self) -> None:
        # Back to the pool when the body was read to its end; closed otherwise.
        self._response.release()


def _httpx_error(exc: aiohttp.ClientError, request: httpx.Request) -> httpx.TransportError:
    """The httpx exception that httpx's own transport raises for the same failure."""
    kind: type[httpx.TransportError]
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        kind = httpx.ConnectTimeout
    elif isinstance(exc, aiohttp.ServerTimeoutError):
        kind = httpx.ReadTimeout
    elif isinstance(exc, aiohttp.ClientProxyConnectionError | aiohttp.ClientHttpProxyError):
        kind = httpx.ProxyError
    elif isinstance(exc, aiohttp.ClientConnectorError):
        kind = httpx.ConnectError
    elif isinstance(
        exc,
        aiohttp.ClientPayloadError | aiohttp.ServerDisconnectedError | aiohttp.ClientResponseError,
    ):
        # A body cut short, a connection closed before the answer, an answer that is not
        # HTTP: what h11 calls a protocol error, and a reason to resume.
        kind = httpx.RemoteProtocolError
    elif isinstance(exc, aiohttp.ClientConnectionError):
        kind = httpx.ReadError
    elif isinstance(exc, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError):
        kind = httpx.UnsupportedProtocol
    else:
        kind = httpx.TransportError
    # aiohttp's message can quote the URL; only its class name travels on.
    return kind(type(exc).__name__, request=request)


# -- the temp file -----------------------------------------------------------------


class _TempFile:
    """The temp file of one fetch: its bytes written and hashed in the order received.

    The first `_INLINE_BYTES` are written and hashed on the event loop. Past that a
    `_Writer` thread takes over, so that hashing and disk writes overlap with receiving
    the next bytes (hashlib and os.write release the GIL).

    The descriptor is closed by whoever is last to use it: a cancelled fetch cannot wait
    for a thread still writing or syncing, and closing the descriptor under that thread
    could make it write into whatever file gets the same number next.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.size = 0  # bytes accepted; all of them are in the file unless an error is raised
        self.hasher = hashlib.sha256()
        # The MD5 of the bytes, kept only while the file host's ETag is one to check it by.
        self.md5: hashlib._Hash | None = None
        self._writer: _Writer | None = None
        self._batch: list[bytes] = []  # chunks not yet handed to the writer
        self._batch_size = 0
        self._lock = threading.Lock()
        self._threads_using_fd = 0
        self._close_requested = False
        self._closed = False

    async def write(self, chunk: bytes) -> None:
        if self._writer is None and self.size + len(chunk) <= _INLINE_BYTES:
            _write_all(self.fd, chunk)
            self.hasher.update(chunk)
            if self.md5 is not None:
                self.md5.update(chunk)
            self.size += len(chunk)
            return
        self.size += len(chunk)
        self._batch.append(chunk)
        self._batch_size += len(chunk)
        if self._batch_size >= _BATCH_BYTES:
            await self._hand_over()

    async def drain(self) -> None:
        """Wait until every accepted byte is hashed and in the file (raises OSError)."""
        if self._batch:
            await self._hand_over()
        writer, self._writer = self._writer, None
        if writer is not None:
            await writer.finish()

    async def restart(self) -> None:
        await self.drain()
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)
        self.size = 0
        self.hasher = hashlib.sha256()
        self.md5 = None

    def track_md5(self) -> None:
        """Hash MD5 too, from here on; called while the file is still empty."""
        self.md5 = hashlib.md5(usedforsecurity=False)

    async def md5_hexdigest(self) -> str | None:
        """The MD5 of every accepted byte (None when not tracked); waits for the writer."""
        await self.drain()
        return None if self.md5 is None else self.md5.hexdigest()

    async def close_durably(self) -> int:
        """fsync and close the file; return its length on disk."""
        await self.drain()
        self.lend_fd()
        # fsync can take long on a big file: in a thread, so the event loop stays responsive.
        # Shielded: a cancelled fetch leaves the thread to finish, and to close the file.
        job = asyncio.get_running_loop().run_in_executor(None, self._sync_and_close)
        job.add_done_callback(_mark_retrieved)
        return await asyncio.shield(job)

    def discard(self) -> None:
        """Close the descriptor now, or when the last thread using it is done."""
        if self._writer is not None:
            self._writer.abandon()
            self._writer = None
        with self._lock:
            if self._closed:
                return
            if self._threads_using_fd:
                self._close_requested = True
                return
            self._closed = True
        os.close(self.fd)

    def lend_fd(self) -> None:
        """Called on the event loop before a thread starts using the descriptor."""
        with self._lock:
            self._threads_using_fd += 1

    def return_fd(self, *, close: bool = False) -> None:
        """Called by that thread when done with it (`close`: it is done with the file)."""
        with self._lock:
            self._threads_using_fd -= 1
            close = (close or self._close_requested) and not self._closed
            if close:
                self._closed = True
        if close:
            os.close(self.fd)

    async def _hand_over(self) -> None:
        # Chunks go over in batches of about a MiB: one thread wake-up per batch rather
        # than per socket read (measured: a fifth less CPU per GiB).
        batch, size = self._batch, self._batch_size
        self._batch, self._batch_size = [], 0
        if self._writer is None:
            self._writer = _Writer(self, asyncio.get_running_loop(), offset=self.size - size)
        await self._writer.put(batch, size)

    def _sync_and_close(self) -> int:
        try:
            os.fsync(self.fd)
            return os.fstat(self.fd).st_size
        finally:
            self.return_fd(close=True)


class _Writer:
    """A thread that hashes and writes a temp file's bytes, in order, as they arrive.

    A thread of its own for the whole body, not a job per chunk in the shared executor:
    handing each chunk over as a new job left the thread idle while the event loop
    noticed the previous job's end. The queue is bounded: when it is full the event loop
    waits (and aiohttp stops reading the socket), so memory stays flat whatever the
    network's speed against the disk's. (Hashing in a second thread, beside the writing
    one, used more CPU per GiB and was no faster on two busy cores.)
    """

    def __init__(self, file: _TempFile, loop: asyncio.AbstractEventLoop, *, offset: int) -> None:
        self._file = file
        self._loop = loop
        self._batches: deque[tuple[list[bytes], int]] = deque()
        self._queued = 0
        self._wake = threading.Condition(threading.Lock())
        self._room: asyncio.Future[None] | None = None  # the event loop waits for room
        self._stopping = False
        self._error: OSError | None = None
        self._finished: asyncio.Future[None] = loop.create_future()
        self._written = self._written_back = offset  # where the file ends, for writeback
        file.lend_fd()
        threading.Thread(target=self._run, name="download-writer", daemon=True).start()

    async def put(self, batch: list[bytes], size: int) -> None:
        if self._error is not None:
            raise self._error
        with self._wake:
            self._batches.append((batch, size))
            self._queued += size
            self._wake.notify()
            if self._queued < _QUEUE_BYTES:
                return
            room = self._room = self._loop.create_future()
        await room
        if self._error is not None:
            raise self._error

    async def finish(self) -> None:
        """Let the thread work through the queue, then end; raise its error if it had one."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        await asyncio.shield(self._finished)
        if self._error is not None:
            raise self._error

    def abandon(self) -> None:
        """End the thread after the batch in hand; what is still queued is dropped."""
        with self._wake:
            self._batches.clear()
            self._stopping = True
            self._wake.notify()

    def _run(self) -> None:
        try:
            while (item := self._next_batch()) is not None:
                batch, size = item
                if self._error is None:
                    try:
                        for chunk in batch:
                            self._write(chunk)
                    except OSError as exc:
                        self._error = exc  # raised on the event loop; the rest is dropped
                with self._wake:
                    self._queued -= size
                    room = self._room
                    if room is not None and (
                        self._queued <= _QUEUE_BYTES // 2 or self._error is not None
                    ):
                        self._room = None
                        self._call_soon(room)
        finally:
            self._file.return_fd()
            self._call_soon(self._finished)

    def _next_batch(self) -> tuple[list[bytes], int] | None:
        with self._wake:
            while not self._batches and not self._stopping:
                self._wake.wait()
            return self._batches.popleft() if self._batches else None

    def _write(self, chunk: bytes) -> None:
        file = self._file
        file.hasher.update(chunk)
        if file.md5 is not None:
            file.md5.update(chunk)
        _write_all(file.fd, chunk)
        self._written += len(chunk)
        behind = self._written - self._written_back
        if behind >= _WRITEBACK_BYTES and _FADV_DONTNEED is not None:
            # On dirty pages DONTNEED starts their writeback without waiting for it: the
            # disk works while the network does, the kernel never throttles us for having
            # too much dirty data, and the fsync before publishing has only the last few
            # MiB left (measured: 0.01 s instead of 0.1-0.4 s for 256 MiB-1 GiB).
            os.posix_fadvise(file.fd, self._written_back, behind, _FADV_DONTNEED)
            self._written_back = self._written

    def _call_soon(self, future: asyncio.Future[None]) -> None:
        # RuntimeError: the event loop is closed, nobody is waiting any more.
        with suppress(RuntimeError):
            self._loop.call_soon_threadsafe(_resolve, future)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _write_all(fd: int, chunk: bytes) -> None:
    written = os.write(fd, chunk)
    if written < len(chunk):
        view = memoryview(chunk)[written:]
        while view:
            view = view[os.write(fd, view) :]


class _DirectorySync:
    """Directory fsyncs shared by the renames that happen together (a group commit).

    A rename is durable once a directory fsync that started after it has finished. A
    caller that finds an fsync already running cannot use that one (it may have started
    before the rename), so it waits for the next, which starts when the running one ends
    and serves every rename made meanwhile: N files published together cost two fsyncs,
    not N.
    """

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running: asyncio.Future[None] | None = None
        self._next: asyncio.Future[None] | None = None

    async def after_rename(self) -> None:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new event loop (tests): nothing carries over
            self._loop, self._running, self._next = loop, None, None
        if self._running is None:
            round_ = self._start(loop)
        else:
            if self._next is None:
                self._next = loop.create_future()
                self._next.add_done_callback(_mark_retrieved)
            round_ = self._next
        # Shielded: a cancelled waiter must not cancel the fsync the others wait for.
        await asyncio.shield(round_)

    def _start(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        running = loop.run_in_executor(None, _fsync_directory, self._directory)
        self._running = running
        running.add_done_callback(self._finished)
        return running

    def _finished(self, done: asyncio.Future[None]) -> None:
        _mark_retrieved(done)
        if self._running is not done:
            return  # from an abandoned event loop
        self._running = None
        waiting, self._next = self._next, None
        if waiting is None or self._loop is None:
            return
        following = self._start(self._loop)
        following.add_done_callback(lambda finished: _copy_outcome(finished, waiting))


def _mark_retrieved(future: asyncio.Future[Any]) -> None:
    # Every waiter may have been cancelled; an fsync error must not then be reported as
    # "never retrieved" by asyncio.
    if not future.cancelled():
        future.exception()


def _copy_outcome(source: asyncio.Future[None], target: asyncio.Future[None]) -> None:
    if target.done():
        return
    if source.cancelled():
        target.cancel()
    elif (error := source.exception()) is not None:
        target.set_exception(error)
    else:
        target.set_result(None)


# -- one fetch -----------------------------------------------------------------------


@dataclass
class _Progress:
    """What the temp file holds so far, and what the server said about the whole."""

    file: _TempFile
    total: int | None = None  # expected full length, once the server has said it
    validator: str | None = None  # ETag or Last-Modified of the bytes we hold
    md5: str | None = None  # the whole file's MD5, when its ETag is one
    announced: bool = False  # download.start has been logged

    @property
    def size(self) -> int:
        return self.file.size

    async def restart(self) -> None:
        await self.file.restart()
        self.total = None
        self.validator = None
        self.md5 = None

    def still_to_write(self) -> int:
        """Bytes this fetch is yet to write, as far as the server has said."""
        return 0 if self.total is None else max(self.total - self.size, 0)


@dataclass(slots=True)
class _FetchLog:
    """Log lines of one fetch, each carrying its request_id and redacted URL.

    Fields are passed per line instead of bound up front: most fetches write one line.
    """

    logger: Any
    request_id: str
    url: str
    path: str = ""  # the final file's, once known

    def info(self, event: str, **fields: Any) -> None:
        self.logger.info(event, request_id=self.request_id, url=self.url, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self.logger.warning(event, request_id=self.request_id, url=self.url, **fields)


@dataclass
class _Watch:
    """The clocks one fetch runs against: the overall deadline and the keep-alive beat."""

    started: float
    deadline: float
    monotonic: Callable[[], float]
    keep_alive: Callable[[], Awaitable[bool]] | None
    keep_alive_every: float
    last_beat: float

    def check_deadline(self) -> None:
        elapsed = self.monotonic() - self.started
        if elapsed > self.deadline:
            raise DownloadInterrupted(
                f"overall download deadline of {self.deadline:g}s exceeded after {elapsed:.1f}s"
            )

    async def beat(self, *, force: bool = False) -> None:
        if self.keep_alive is None:
            return
        now = self.monotonic()
        if not force and now - self.last_beat < self.keep_alive_every:
            return
        self.last_beat = now
        if not await self.keep_alive():
            raise OwnershipLost("another instance owns this batch now; download abandoned")


class Downloader:
    """Downloads output files into `output_dir`; one instance serves many fetches."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        output_dir: Path,
        allowed_hosts: Sequence[str],
        file_mode: int = 0o640,
        deadline: float = 3600.0,
        max_resumes: int = 3,
        max_file_size: int = DEFAULT_MAX_FILE_SIZE,
        chunk_size: int = 1 << 16,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._http = http
        self._timeout = http.timeout.as_dict()
        self._output_dir = output_dir
        # Resolved once: every name is joined to it, and a relative path must keep meaning
        # what it meant when the daemon started.
        self._directory = output_dir.resolve()
        self._directory_made = False
        self._directory_sync = _DirectorySync(self._directory)
        self._allowed_hosts = tuple(allowed_hosts)
        self._file_mode = file_mode
        self._deadline = deadline
        self._max_resumes = max_resumes
        self._max_file_size = max_file_size
        # The fetches under way, for the space they are about to take on the disk.
        self._in_flight: dict[int, _Progress] = {}
        # Kept for callers that pass it; the transport decides how bytes arrive.
        self._chunk_size = chunk_size
        self._monotonic = monotonic
        self._log = structlog.get_logger(__name__)
        # Temp names: unique per fetch without a uuid each time; the random part keeps
        # two processes sharing the directory apart.
        self._temp_tag = secrets.token_hex(6)
        self._temp_serial = itertools.count()

    def final_path(self, request_id: str, url: str) -> Path:
        return self._inside_output_dir(f"{request_id}.{output_extension(url)}")

    def remove_temp_files(self, request_id: str) -> None:
        """Remove leftovers of an earlier fetch of this batch (crash, kill -9)."""
        prefixes = tuple(f".{request_id}.{extension}." for extension in OUTPUT_EXTENSIONS)
        try:
            entries = os.scandir(self._directory)
        except FileNotFoundError:
            return
        with entries:
            for entry in entries:
                name = entry.name
                # A fetch still running elsewhere (a paused old owner) keeps writing to its
                # open file; removing the name only makes its own publish fail, and it is
                # fenced anyway.
                if name.startswith(prefixes) and _is_temp_tail(name, prefixes):
                    with suppress(FileNotFoundError):
                        os.unlink(entry.path)

    async def fetch(
        self,
        url: str,
        request_id: str,
        *,
        keep_alive: Callable[[], Awaitable[bool]] | None = None,
        keep_alive_every: float = 30.0,
        clean_leftovers: bool = True,
    ) -> DownloadedFile:
        """Download `url` to final_path(request_id, url) and return what was published.

        Raises a DownloadError subclass; in every failure case no temp file is left and
        nothing new is published. `keep_alive` is awaited at least every
        `keep_alive_every` seconds while bytes arrive (a stalled read is bounded by the
        client's read timeout) and once more right before publishing. `clean_leftovers`
        removes temp files an earlier, interrupted fetch of this batch may have left (a
        scan of the output directory); a caller that knows there was none passes False.
        """
        log = _FetchLog(self._log, request_id, redact_url(url))
        started = self._monotonic()
        watch = _Watch(
            started=started,
            deadline=self._deadline,
            monotonic=self._monotonic,
            keep_alive=keep_alive,
            keep_alive_every=keep_alive_every,
            last_beat=started,
        )
        try:
            target = self._checked_url(url)
            extension = output_extension(url)
            final = self._inside_output_dir(f"{request_id}.{extension}")
            temp = self._inside_output_dir(
                f".{request_id}.{extension}.{self._temp_tag}{next(self._temp_serial):x}"
                f"{_TEMP_SUFFIX}"
            )
            log.path = str(final)
            with _classify_os_errors(f"preparing output directory {self._output_dir}"):
                if not self._directory_made:
                    self._make_directory()
                if clean_leftovers:
                    self.remove_temp_files(request_id)
            size, digest, resumes = await self._download_to(target, temp, final, watch, log)
        except DownloadError as exc:
            log.warning(
                "download.failed",
                error=type(exc).__name__,
                reason=str(exc),
                retryable=exc.retryable,
                seconds=round(self._monotonic() - started, 3),
            )
            raise
        seconds = max(self._monotonic() - started, 1e-9)
        log.info(
            "download.done",
            path=log.path,
            size=size,
            sha256=digest,
            resumes=resumes,
            seconds=round(seconds, 3),
            bytes_per_second=round(size / seconds),
        )
        return DownloadedFile(path=final, size=size, sha256=digest)

    # -- paths ---------------------------------------------------------------------

    def _make_directory(self) -> None:
        self._directory.mkdir(mode=0o750, parents=True, exist_ok=True)
        self._directory_made = True

    def _inside_output_dir(self, name: str) -> Path:
        # The caller validates request_id; this is defence in depth against a name
        # that would climb out of (or replace) the output directory.
        if "/" in name or "\0" in name or name in ("", ".", ".."):
            raise DownloadRefused(f"file name {name[:80]!r} escapes the output directory")
        return self._directory / name

    def _checked_url(self, url: str) -> httpx.URL:
        """`url` as httpx will connect to it, after the allow-list check."""
        try:
            check_download_url(url, self._allowed_hosts)
            parsed = httpx.URL(url)
            # Check httpx's own reading too: the host it connects to is the one that
            # must be allowed, whatever the stdlib parser made of the text. When httpx
            # writes it back unchanged, that check has just been made.
            as_sent = str(parsed)
            if as_sent != url:
                check_download_url(as_sent, self._allowed_hosts)
        except UrlRefused as exc:
            raise DownloadRefused(str(exc)) from None
        except httpx.InvalidURL:
            raise DownloadRefused(
                f"refusing download URL {redact_url(url)}: not a valid URL"
            ) from None
        return parsed

    # -- the transfer --------------------------------------------------------------

    def _open_temp(self, temp: Path) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            return os.open(temp, flags, self._file_mode)
        except FileNotFoundError:
            # The directory was removed since the last fetch: make it again, once.
            self._make_directory()
            return os.open(temp, flags, self._file_mode)

    async def _download_to(
        self,
        target: httpx.URL,
        temp: Path,
        final: Path,
        watch: _Watch,
        log: _FetchLog,
    ) -> tuple[int, str, int]:
        published = False
        with _classify_os_errors(f"creating {temp.name} in {self._output_dir}"):
            file = _TempFile(self._open_temp(temp))
        progress = _Progress(file)
        self._in_flight[id(progress)] = progress
        try:
            with _classify_os_errors(f"setting the mode of {temp.name} in {self._output_dir}"):
                # os.open's mode is filtered by the umask; fchmod makes it exact, so a
                # loose umask cannot expose KYC data and a tight one cannot hide it
                # from the group that processes it.
                os.fchmod(file.fd, self._file_mode)
            # A real-time backstop beside the per-chunk check on the injected clock:
            # it also bounds a connect or a first byte that never comes.
            timeout = asyncio.timeout(self._deadline)
            try:
                async with timeout:
                    resumes = await self._transfer(target, progress, watch, log)
            except TimeoutError:
                if timeout.expired():
                    raise DownloadInterrupted(
                        f"overall download deadline of {self._deadline:g}s exceeded"
                    ) from None
                raise
            with _classify_os_errors(f"flushing {temp.name} in {self._output_dir}"):
                on_disk = await file.close_durably()
            if on_disk != file.size:
                raise DownloadInterrupted(
                    f"length mismatch: wrote {file.size} bytes, {on_disk} on disk"
                )
            self._verify_md5(progress)
            await watch.beat(force=True)
            with _classify_os_errors(f"publishing {final.name} in {self._output_dir}"):
                os.replace(temp, final)
                published = True
                # Makes the rename itself durable: without it a crash can lose the new name.
                await self._directory_sync.after_rename()
            return file.size, file.hasher.hexdigest(), resumes
        finally:
            self._in_flight.pop(id(progress), None)
            file.discard()
            if not published:
                # Never leave a partial file behind, whatever went wrong (including
                # cancellation); a failure to remove it must not mask the real error.
                try:
                    temp.unlink(missing_ok=True)
                except OSError:
                    log.warning("download.temp_not_removed", path=str(temp))

    async def _transfer(
        self, target: httpx.URL, progress: _Progress, watch: _Watch, log: _FetchLog
    ) -> int:
        """Fill the temp file, resuming as needed; return how many resumes it took."""
        resumes = 0
        while True:
            watch.check_deadline()
            headers = {
                # Byte counts must match Content-Length and Range offsets, which refer
                # to the bytes as sent: ask for no transfer compression.
                "Accept-Encoding": "identity",
            }
            if progress.size > 0:
                headers["Range"] = f"bytes={progress.size}-"
                if progress.validator is not None:
                    # Only resume if the file is still the same one; otherwise the
                    # server answers 200 with the whole new file and we start over.
                    headers["If-Range"] = progress.validator
            reason = await self._attempt(target, headers, progress, watch, log)
            if reason is None:
                return resumes
            if resumes >= self._max_resumes:
                raise DownloadInterrupted(
                    f"download incomplete after {resumes} resumes: {reason} "
                    f"({progress.size} of {_describe_total(progress.total)} bytes)"
                )
            resumes += 1
            log.info(
                "download.resumed",
                offset=progress.size,
                resume=resumes,
                max_resumes=self._max_resumes,
                reason=reason,
            )

    async def _attempt(
        self,
        url: httpx.URL,
        headers: dict[str, str],
        progress: _Progress,
        watch: _Watch,
        log: _FetchLog,
    ) -> str | None:
        """One request (following redirects). None when complete, else why not."""
        for _hop in range(MAX_REDIRECTS + 1):
            try:
                # A ready-made request through send(): the client's build_request (URL and
                # header merging) cost about a tenth of a small file's fetch.
                request = httpx.Request(
                    "GET", url, headers=headers, extensions={"timeout": self._timeout}
                )
                response = await self._http.send(request, stream=True)
                try:
                    if response.status_code in _REDIRECT_STATUSES:
                        url = self._redirect_target(response, url, log)
                        continue
                    return await self._consume(response, progress, watch, log)
                finally:
                    await response.aclose()
            except DownloadError:
                raise
            except _CUT_SHORT as exc:
                # Raised before any body byte (headers cut, read timeout waiting for
                # them): as good a reason to resume as a cut in the middle.
                return f"connection failed: {type(exc).__name__}"
            except httpx.HTTPError as exc:
                raise DownloadInterrupted(
                    f"request to {redact_url(str(url))} failed: {type(exc).__name__}"
                ) from None
        raise DownloadInterrupted(f"more than {MAX_REDIRECTS} redirects")

    def _redirect_target(
        self, response: httpx.Response, url: httpx.URL, log: _FetchLog
    ) -> httpx.URL:
        location = response.headers.get("Location")
        if not location:
            raise DownloadInterrupted(
                f"redirect {response.status_code} without Location from {redact_url(str(url))}"
            )
        try:
            joined = url.join(location)
        except httpx.InvalidURL:
            raise DownloadRefused(
                f"redirect from {redact_url(str(url))} to an invalid URL"
            ) from None
        target = self._checked_url(str(joined))
        log.info("download.redirected", to=redact_url(str(target)))
        return target

    async def _consume(
        self,
        response: httpx.Response,
        progress: _Progress,
        watch: _Watch,
        log: _FetchLog,
    ) -> str | None:
        status = response.status_code
        ranged = progress.size > 0
        if status in _EXPIRED_STATUSES:
            raise UrlExpired(
                f"file host answered {status} for {redact_url(str(response.url))}: the URL "
                "has expired or is not authorised; poll the batch status for a fresh URL"
            )
        if status == 404 or status >= 500:
            raise DownloadInterrupted(
                f"file host answered {status} for {redact_url(str(response.url))}"
            )
        if status == 416 and ranged:
            await self._restart(progress)
            return "server refused the range (416), starting over"
        if status == 200:
            if ranged:
                # A full answer to a Range request: the server ignored the range or
                # the file changed (If-Range failed). Either way, start over.
                log.info("download.restarted", reason="200 to a range request")
                await self._restart(progress)
            progress.total = _content_length(response)
            progress.validator = _validator(response)
            progress.md5 = _etag_md5(response)
            if progress.md5 is not None:
                progress.file.track_md5()
        elif status == 206:
            problem = self._accept_partial(response, progress)
            if problem is not None:
                log.info("download.restarted", reason=problem)
                await self._restart(progress)
                return problem
        else:
            raise DownloadInterrupted(
                f"file host answered unexpected {status} for {redact_url(str(response.url))}"
            )

        self._check_room(progress)
        file = progress.file
        total = progress.total
        limit = self._max_file_size
        try:
            with _classify_os_errors(f"writing to {self._output_dir}"):
                async for chunk in response.aiter_raw():
                    if total is not None and file.size + len(chunk) > total:
                        raise DownloadInterrupted(
                            f"length mismatch: server sent more than {total} bytes"
                        )
                    if file.size + len(chunk) > limit:
                        raise FileTooLarge(
                            f"refused: the file grew past the size limit of {limit} bytes "
                            "(TRACKER_MAX_FILE_SIZE) while downloading"
                        )
                    await file.write(chunk)
                    if not progress.announced and (total is None or file.size < total):
                        # The body did not arrive in one piece: a transfer worth a line while
                        # it runs. A small file gets only download.done, one line, not two.
                        progress.announced = True
                        log.info("download.start", path=log.path, total=total)
                    watch.check_deadline()
                    await watch.beat()
        except _CUT_SHORT as exc:
            return f"connection cut: {type(exc).__name__}"
        if progress.total is None:
            if "chunked" in response.headers.get("Transfer-Encoding", "").lower():
                # Chunked encoding: the transport raises on a chunked stream that ends
                # early, so a clean end is the whole file.
                return None
            # Neither a length nor chunks: the body ends where the connection closed,
            # which a cut looks like too. Only the file host's checksum can say whether
            # this is the whole file.
            if progress.md5 is None:
                raise DownloadInterrupted(
                    "the file host sent no Content-Length, no chunked encoding and no MD5 "
                    f"ETag: {progress.size} bytes arrived, and nothing confirms that this is "
                    "the whole file"
                )
            with _classify_os_errors(f"writing to {self._output_dir}"):
                received = await progress.file.md5_hexdigest()
            if received == progress.md5:
                return None
            return "body without Content-Length ended before its MD5 matched the ETag"
        if progress.size < progress.total:
            return "body shorter than announced"
        return None

    def _check_room(self, progress: _Progress) -> None:
        """Refuse a file above the size limit, or one the output directory has no room for."""
        total = progress.total
        if total is None:
            return  # checked as the body grows; a full disk still raises ENOSPC
        if total > self._max_file_size:
            raise FileTooLarge(
                f"refused: the file host announced {total} bytes, above the size limit of "
                f"{self._max_file_size} bytes (TRACKER_MAX_FILE_SIZE)"
            )
        needed = progress.still_to_write()
        with _classify_os_errors(f"checking the free space of {self._output_dir}"):
            fs = os.statvfs(self._directory)
        free = fs.f_bavail * fs.f_frsize
        # What the other downloads under way are about to write is not free for this one.
        promised = sum(
            other.still_to_write() for other in self._in_flight.values() if other is not progress
        )
        if needed > free - promised:
            raise OutputUnwritable(
                f"output directory {self._output_dir} has no room for the file: "
                f"{needed} bytes still to write, {free} bytes free"
                + (f", {promised} of them promised to other downloads" if promised else "")
            )

    def _verify_md5(self, progress: _Progress) -> None:
        """Raise ChecksumMismatch if the file host's MD5 disagrees with the bytes written."""
        expected, hasher = progress.md5, progress.file.md5
        if expected is None or hasher is None:
            return
        received = hasher.hexdigest()
        if received != expected:
            raise ChecksumMismatch(
                f"checksum mismatch: the {progress.size} bytes received have MD5 {received}, "
                f"the file host's ETag says {expected}; not published"
            )

    def _accept_partial(self, response: httpx.Response, progress: _Progress) -> str | None:
        """None if this 206 continues exactly where we are; else why we start over."""
        match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
        if match is None:
            return "206 without a usable Content-Range"
        start, end = int(match.group(1)), int(match.group(2))
        total = None if match.group(3) == "*" else int(match.group(3))
        if start != progress.size:
            return f"206 starts at {start}, expected {progress.size}"
        if end < start or (total is not None and end >= total):
            return "206 with an inconsistent Content-Range"
        if progress.total is not None and total is not None and total != progress.total:
            return "file length changed between requests"
        validator = _validator(response)
        if progress.validator and validator and validator != progress.validator:
            return "file changed between requests"
        if total is None:
            length = _content_length(response)
            total = None if length is None else start + length
        if progress.total is None:
            progress.total = total
        if progress.validator is None:
            progress.validator = validator
        return None

    async def _restart(self, progress: _Progress) -> None:
        with _classify_os_errors(f"truncating a partial download in {self._output_dir}"):
            await progress.restart()


def _is_temp_tail(name: str, prefixes: tuple[str, ...]) -> bool:
    """Whether `name`, which starts with one of `prefixes`, is a temp file of that fetch.

    Temp names are `.<request_id>.<ext>.<tag>.part` (older versions wrote `.<...>.part`
    with no tag, or `.<...>.<tag>part`); the tag never holds a dot, which keeps request
    "a" from claiming the temp files of request "a.csv".
    """
    for prefix in prefixes:
        if name.startswith(prefix):
            tail = name[len(prefix) :]
            if tail.endswith("part") and "." not in tail[: -len(_TEMP_SUFFIX)]:
                return True
    return False


@contextmanager
def _classify_os_errors(what: str) -> Iterator[None]:
    """Turn an OSError into the DownloadError that tells the operator what to fix."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        if exc.errno in _UNWRITABLE_ERRNOS:
            raise OutputUnwritable(
                f"output directory is unwritable while {what}: {reason} "
                f"({errno.errorcode.get(exc.errno or 0, '?')})"
            ) from exc
        raise DownloadError(f"file system error while {what}: {reason}") from exc


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("Content-Length", "").strip()
    return int(value) if value.isdigit() else None


def _validator(response: httpx.Response) -> str | None:
    # A weak ETag never satisfies If-Range (RFC 9110 13.1.5), so prefer Last-Modified
    # then; a weak one alone is still sent, and the 200 it earns means a safe restart.
    etag: str = response.headers.get("ETag", "")
    last_modified: str = response.headers.get("Last-Modified", "")
    if etag and not etag.startswith("W/"):
        return etag
    return last_modified or etag or None


def _etag_md5(response: httpx.Response) -> str | None:
    """The content MD5 that a single-part S3 object's ETag is, in lower case; else None."""
    match = _MD5_ETAG.fullmatch(response.headers.get("ETag", "").strip())
    return None if match is None else match.group(1).lower()


def _describe_total(total: int | None) -> str:
    return "unknown" if total is None else str(total)
