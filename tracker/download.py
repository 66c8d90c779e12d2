"""Fetch a batch's output file onto local disk: streamed, verified, published atomically.

The file holds customer KYC data and its URL may be a presigned bearer secret, so:
- the URL and every redirect target are checked against an allow-list before any
  connection (see `tracker.domain.urls`), and only redacted URLs reach logs and errors;
- the HTTP client carries no API credentials (httpx forwards custom headers such as
  `x-api-key` across hosts on redirects, so the download client must never have them);
- the bytes go to a hidden temp file in the destination directory with a fixed mode,
  and only a complete, length-checked, fsynced file is renamed to its final name.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import structlog
from structlog.typing import FilteringBoundLogger

from tracker.domain.urls import (
    OUTPUT_EXTENSIONS,
    UrlRefused,
    check_download_url,
    output_extension,
    redact_url,
)

__all__ = [
    "DownloadError",
    "DownloadInterrupted",
    "DownloadRefused",
    "DownloadedFile",
    "Downloader",
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
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.IGNORECASE)


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
    # httpx's own transport (httpcore) on purpose, unlike the API client: the aiohttp
    # transport hands the URL to yarl as text, which re-encodes it (%2F in a query becomes
    # /) and so can break presigned S3 signatures, a failure no local test would show.
    return httpx.AsyncClient(timeout=timeout, follow_redirects=False, transport=transport)


@dataclass
class _Progress:
    """What has been written to the temp file so far."""

    fd: int
    size: int = 0
    total: int | None = None  # expected full length, once the server has said it
    validator: str | None = None  # ETag or Last-Modified of the bytes we hold
    hasher: hashlib._Hash = field(default_factory=hashlib.sha256)

    def restart(self) -> None:
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)
        self.size = 0
        self.total = None
        self.validator = None
        self.hasher = hashlib.sha256()


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
        chunk_size: int = 1 << 16,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._http = http
        self._output_dir = output_dir
        self._allowed_hosts = tuple(allowed_hosts)
        self._file_mode = file_mode
        self._deadline = deadline
        self._max_resumes = max_resumes
        self._chunk_size = chunk_size
        self._monotonic = monotonic
        self._log = structlog.get_logger(__name__)

    def final_path(self, request_id: str, url: str) -> Path:
        return self._inside_output_dir(f"{request_id}.{output_extension(url)}")

    def remove_temp_files(self, request_id: str) -> None:
        """Remove leftovers of an earlier fetch of this batch (crash, kill -9)."""
        for extension in OUTPUT_EXTENSIONS:
            # A fetch still running elsewhere (a paused old owner) keeps writing to its open
            # file; removing the name only makes its own publish fail, and it is fenced anyway.
            for stale in self._output_dir.glob(f".{request_id}.{extension}.*part"):
                stale.unlink(missing_ok=True)

    async def fetch(
        self,
        url: str,
        request_id: str,
        *,
        keep_alive: Callable[[], Awaitable[bool]] | None = None,
        keep_alive_every: float = 30.0,
    ) -> DownloadedFile:
        """Download `url` to final_path(request_id, url) and return what was published.

        Raises a DownloadError subclass; in every failure case no temp file is left and
        nothing new is published. `keep_alive` is awaited at least every
        `keep_alive_every` seconds while bytes arrive (a stalled read is bounded by the
        client's read timeout) and once more right before publishing.
        """
        log = self._log.bind(request_id=request_id, url=redact_url(url))
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
            final = self.final_path(request_id, url)
            temp = self._temp_path(request_id, output_extension(url))
            with _classify_os_errors(f"preparing output directory {self._output_dir}"):
                self._output_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
                self.remove_temp_files(request_id)
            log.info("download.start", path=str(final))
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
            path=str(final),
            size=size,
            sha256=digest,
            resumes=resumes,
            seconds=round(seconds, 3),
            bytes_per_second=round(size / seconds),
        )
        return DownloadedFile(path=final, size=size, sha256=digest)

    # -- paths ---------------------------------------------------------------------

    def _temp_path(self, request_id: str, extension: str) -> Path:
        # Hidden, and named after the final file, so a stale one is easy to find and
        # nothing scanning for "*.csv" picks up a partial file.
        # Unique per fetch: a paused old owner waking up must never touch (or remove) the
        # temp file of the instance that took the batch over.
        return self._inside_output_dir(f".{request_id}.{extension}.{uuid.uuid4().hex[:12]}.part")

    def _inside_output_dir(self, name: str) -> Path:
        # The caller validates request_id; this is defence in depth against a name
        # that would climb out of (or replace) the output directory.
        directory = self._output_dir.resolve()
        candidate = directory / name
        if candidate.parent != directory or candidate.name != name or "/" in name:
            raise DownloadRefused(f"file name {name[:80]!r} escapes the output directory")
        return candidate

    def _checked_url(self, url: str) -> httpx.URL:
        """`url` as httpx will connect to it, after the allow-list check."""
        try:
            check_download_url(url, self._allowed_hosts)
            parsed = httpx.URL(url)
            # Check httpx's own reading too: the host it connects to is the one that
            # must be allowed, whatever the stdlib parser made of the text.
            check_download_url(str(parsed), self._allowed_hosts)
        except UrlRefused as exc:
            raise DownloadRefused(str(exc)) from None
        except httpx.InvalidURL:
            raise DownloadRefused(
                f"refusing download URL {redact_url(url)}: not a valid URL"
            ) from None
        return parsed

    # -- the transfer --------------------------------------------------------------

    async def _download_to(
        self,
        target: httpx.URL,
        temp: Path,
        final: Path,
        watch: _Watch,
        log: FilteringBoundLogger,
    ) -> tuple[int, str, int]:
        published = False
        with _classify_os_errors(f"creating {temp.name} in {self._output_dir}"):
            fd = os.open(
                temp,
                os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                self._file_mode,
            )
        try:
            with _classify_os_errors(f"setting the mode of {temp.name} in {self._output_dir}"):
                # os.open's mode is filtered by the umask; fchmod makes it exact, so a
                # loose umask cannot expose KYC data and a tight one cannot hide it
                # from the group that processes it.
                os.fchmod(fd, self._file_mode)
            progress = _Progress(fd=fd)
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
                # fsync can take long on a big file; keep the event loop responsive.
                await asyncio.to_thread(os.fsync, fd)
                on_disk = os.fstat(fd).st_size
                os.close(fd)
                fd = -1
            if on_disk != progress.size:
                raise DownloadInterrupted(
                    f"length mismatch: wrote {progress.size} bytes, {on_disk} on disk"
                )
            await watch.beat(force=True)
            with _classify_os_errors(f"publishing {final.name} in {self._output_dir}"):
                os.replace(temp, final)
                published = True
                _fsync_directory(self._output_dir)
            return progress.size, progress.hasher.hexdigest(), resumes
        finally:
            if fd >= 0:
                os.close(fd)
            if not published:
                # Never leave a partial file behind, whatever went wrong (including
                # cancellation); a failure to remove it must not mask the real error.
                try:
                    temp.unlink(missing_ok=True)
                except OSError:
                    log.warning("download.temp_not_removed", path=str(temp))

    async def _transfer(
        self, target: httpx.URL, progress: _Progress, watch: _Watch, log: FilteringBoundLogger
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
        log: FilteringBoundLogger,
    ) -> str | None:
        """One request (following redirects). None when complete, else why not."""
        for _hop in range(MAX_REDIRECTS + 1):
            try:
                async with self._http.stream("GET", url, headers=headers) as response:
                    if response.status_code in _REDIRECT_STATUSES:
                        url = self._redirect_target(response, url, log)
                        continue
                    return await self._consume(response, progress, watch, log)
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
        self, response: httpx.Response, url: httpx.URL, log: FilteringBoundLogger
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
        log: FilteringBoundLogger,
    ) -> str | None:
        status = response.status_code
        shown = redact_url(str(response.url))
        ranged = progress.size > 0
        if status in _EXPIRED_STATUSES:
            raise UrlExpired(
                f"file host answered {status} for {shown}: the URL has expired or is not "
                "authorised; poll the batch status for a fresh URL"
            )
        if status == 404:
            raise DownloadInterrupted(f"file host answered 404 for {shown}")
        if status >= 500:
            raise DownloadInterrupted(f"file host answered {status} for {shown}")
        if status == 416 and ranged:
            self._restart(progress)
            return "server refused the range (416), starting over"
        if status == 200:
            if ranged:
                # A full answer to a Range request: the server ignored the range or
                # the file changed (If-Range failed). Either way, start over.
                log.info("download.restarted", reason="200 to a range request")
                self._restart(progress)
            progress.total = _content_length(response)
            progress.validator = _validator(response)
        elif status == 206:
            problem = self._accept_partial(response, progress)
            if problem is not None:
                log.info("download.restarted", reason=problem)
                self._restart(progress)
                return problem
        else:
            raise DownloadInterrupted(f"file host answered unexpected {status} for {shown}")

        try:
            async for chunk in response.aiter_raw():
                if progress.total is not None and progress.size + len(chunk) > progress.total:
                    raise DownloadInterrupted(
                        f"length mismatch: server sent more than {progress.total} bytes"
                    )
                self._write(progress, chunk)
                watch.check_deadline()
                await watch.beat()
        except _CUT_SHORT as exc:
            return f"connection cut: {type(exc).__name__}"
        if progress.total is None:
            # No length given (chunked encoding): h11 already raises on a chunked
            # stream that ends early, so a clean end is the whole file.
            return None
        if progress.size < progress.total:
            return "body shorter than announced"
        return None

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

    def _restart(self, progress: _Progress) -> None:
        with _classify_os_errors(f"truncating a partial download in {self._output_dir}"):
            progress.restart()

    def _write(self, progress: _Progress, chunk: bytes) -> None:
        view = memoryview(chunk)
        with _classify_os_errors(f"writing to {self._output_dir}"):
            while view:
                written = os.write(progress.fd, view)
                view = view[written:]
        progress.hasher.update(chunk)
        progress.size += len(chunk)


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
    # Makes the rename itself durable: without it a crash can lose the new name.
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


def _describe_total(total: int | None) -> str:
    return "unknown" if total is None else str(total)
