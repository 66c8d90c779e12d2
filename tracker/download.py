"""Fetch a batch's output file onto local disk: streamed, verified, published atomically.

The file holds customer KYC data and its URL may be a presigned bearer secret, so:
- the URL and every redirect target are checked against an allow-list before any
  connection (see `tracker.domain.urls`), and only redacted URLs reach logs and errors;
- the HTTP client carries no API credentials (`tracker.file_transport`);
- the bytes go to a hidden temp file in the destination directory with a fixed mode,
  and only a complete, length-checked, fsynced file is renamed to its final name
  (`tracker.durable`); a broken transfer resumes where it stopped when the file host
  allows it (`tracker.domain.resume`).

Everything a fetch does per file (name checks, log lines, the directory fsync shared by
fetches that publish together) is kept to what the file needs: most files are small.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import structlog

from tracker.domain import resume
from tracker.domain.temp_names import temp_file_request_id, temp_name
from tracker.domain.urls import (
    UrlRefused,
    check_download_url,
    output_extension,
    redact_url,
)
from tracker.durable import DirectorySync, TempFile, is_unwritable

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
]

MAX_REDIRECTS = 5
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# S3 answers 403 "Request has expired" for a stale presigned URL; 401 and 410 mean the
# same for our purpose: this URL will not work again, a fresh one must be polled for.
_EXPIRED_STATUSES = frozenset({401, 403, 410})
# Errors that mean the connection broke while the body was arriving: worth a Range resume.
_CUT_SHORT = (httpx.RemoteProtocolError, httpx.ReadError, httpx.ReadTimeout)
# TRACKER_MAX_FILE_SIZE's default: the largest output file accepted.
DEFAULT_MAX_FILE_SIZE = 10 << 30


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


# -- one fetch -----------------------------------------------------------------------


@dataclass
class _Progress:
    """What the temp file holds so far, and what the server said about the whole."""

    file: TempFile
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

    def held(self) -> resume.Held:
        return resume.Held(size=self.file.size, total=self.total, validator=self.validator)

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
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._http = http
        self._timeout = http.timeout.as_dict()
        self._output_dir = output_dir
        # Resolved once: every name is joined to it, and a relative path must keep meaning
        # what it meant when the daemon started.
        self._directory = output_dir.resolve()
        self._directory_made = False
        self._directory_sync = DirectorySync(self._directory)
        self._allowed_hosts = tuple(allowed_hosts)
        self._file_mode = file_mode
        self._deadline = deadline
        self._max_resumes = max_resumes
        self._max_file_size = max_file_size
        # The fetches under way, for the space they are about to take on the disk.
        self._in_flight: dict[int, _Progress] = {}
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
        prefix = f".{request_id}."
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
                if name.startswith(prefix) and temp_file_request_id(name) == request_id:
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
            tag = f"{self._temp_tag}{next(self._temp_serial):x}"
            temp = self._inside_output_dir(temp_name(request_id, extension, tag))
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
            file = TempFile(self._open_temp(temp))
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
            return file.size, file.written_sha256(), resumes
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
            headers = resume.request_headers(progress.held())
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
                # header merging) is a noticeable part of a small file's fetch.
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
        if status in _EXPIRED_STATUSES:
            raise UrlExpired(
                f"file host answered {status} for {redact_url(str(response.url))}: the URL "
                "has expired or is not authorised; poll the batch status for a fresh URL"
            )
        if status == 404 or status >= 500:
            raise DownloadInterrupted(
                f"file host answered {status} for {redact_url(str(response.url))}"
            )
        headers = response.headers
        answer = resume.Answer(
            status,
            content_range=headers.get("Content-Range", ""),
            content_length=headers.get("Content-Length", ""),
            etag=headers.get("ETag", ""),
            last_modified=headers.get("Last-Modified", ""),
        )
        match resume.judge(answer, progress.held()):
            case resume.WholeFile(total, validator, md5, replaces):
                if replaces is not None:
                    log.info("download.restarted", reason=replaces)
                    await self._restart(progress)
                progress.total, progress.validator, progress.md5 = total, validator, md5
                if md5 is not None:
                    progress.file.track_md5()
            case resume.Continuation(total, validator):
                progress.total, progress.validator = total, validator
            case resume.Mismatch(reason):
                log.info("download.restarted", reason=reason)
                await self._restart(progress)
                return reason
            case resume.RangeRefused(reason):
                await self._restart(progress)
                return reason
            case None:
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
        expected, received = progress.md5, progress.file.written_md5()
        if expected is None or received is None:
            return
        if received != expected:
            raise ChecksumMismatch(
                f"checksum mismatch: the {progress.size} bytes received have MD5 {received}, "
                f"the file host's ETag says {expected}; not published"
            )

    async def _restart(self, progress: _Progress) -> None:
        with _classify_os_errors(f"truncating a partial download in {self._output_dir}"):
            await progress.restart()


@contextmanager
def _classify_os_errors(what: str) -> Iterator[None]:
    """Turn an OSError into the DownloadError that tells the operator what to fix."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        if is_unwritable(exc):
            raise OutputUnwritable(
                f"output directory is unwritable while {what}: {reason} "
                f"({errno.errorcode.get(exc.errno or 0, '?')})"
            ) from exc
        raise DownloadError(f"file system error while {what}: {reason}") from exc


def _describe_total(total: int | None) -> str:
    return "unknown" if total is None else str(total)
