"""Downloader against a fake file server at the httpx transport seam (httpx.MockTransport)."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import itertools
import os
import shutil
import stat
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from tracker.download import (
    DownloadedFile,
    Downloader,
    DownloadInterrupted,
    DownloadRefused,
    OutputUnwritable,
    OwnershipLost,
    UrlExpired,
)
from tracker.file_transport import make_download_http_client

HOST = "bulk-data-processing.s3.ap-south-1.amazonaws.com"
PATH = "/upi-basic-batch-output-files/req1.csv"
SIGNATURE = "SECRETSIGNATURE0123"
URL = f"https://{HOST}{PATH}?X-Amz-Expires=600&X-Amz-Signature={SIGNATURE}"
ALLOWED = ("*.amazonaws.com", "files.example.org")
BODY = bytes(range(256)) * 40 + b"tail"  # 10,244 bytes: several chunks, not aligned
ETAG = '"v1-etag"'
LAST_MODIFIED = "Wed, 01 Jan 2025 00:00:00 GMT"
FORBIDDEN_HEADERS = ("authorization", "x-api-key", "client-id", "cookie")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _Body(httpx.AsyncByteStream):
    """A response body sent in small pieces that can break off like a dropped connection."""

    def __init__(
        self,
        data: bytes,
        piece: int,
        cut_after: int | None,
        on_piece: Callable[[int], None],
        end_after: int | None = None,
    ) -> None:
        self._data = data
        self._piece = piece
        self._cut_after = cut_after
        self._on_piece = on_piece
        self._end_after = end_after  # end cleanly there, as a closed unframed body does

    async def __aiter__(self) -> AsyncIterator[bytes]:
        end = len(self._data) if self._cut_after is None else self._cut_after
        if self._end_after is not None:
            end = min(end, self._end_after)
        for offset in range(0, end, self._piece):
            piece = self._data[offset : min(offset + self._piece, end)]
            self._on_piece(len(piece))
            yield piece
        if self._cut_after is not None:
            raise httpx.RemoteProtocolError("peer closed connection without sending complete body")


@dataclass
class FakeFileServer:
    """Serves one file at any host; records every request and the headers it carried."""

    body: bytes = BODY
    etag: str | None = ETAG
    last_modified: str | None = LAST_MODIFIED
    piece: int = 1000
    cut_first_after: int | None = None  # break the first body after this many bytes
    cut_every_after: int | None = None  # break every body after this many bytes of it
    ignore_range: bool = False  # answer 200 with the whole file to a Range request
    wrong_range_start: bool = False  # answer the first Range request from the wrong offset
    refuse_range: bool = False  # answer the first Range request with 416
    expired_status: int | None = None
    status: int | None = None  # answer every request with this bare status
    redirects: dict[str, str] = field(default_factory=dict)  # "host/path" -> Location
    extra_bytes: bytes = b""  # sent after the body, beyond Content-Length
    chunked: bool = False  # Transfer-Encoding: chunked instead of Content-Length
    unframed: bool = False  # a 200 with neither: the body ends where the connection closes
    end_first_after: int | None = None  # the first body ends cleanly after this many bytes
    clock: FakeClock | None = None
    seconds_per_piece: float = 0.0
    after_first: Callable[[FakeFileServer], None] | None = None
    requests: list[httpx.Request] = field(default_factory=list)
    bytes_sent: int = 0

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        first = len(self.requests) == 1
        try:
            return self._answer(request, first)
        finally:
            if first and self.after_first is not None:
                self.after_first(self)

    def _answer(self, request: httpx.Request, first: bool) -> httpx.Response:
        location = self.redirects.get(f"{request.url.host}{request.url.path}")
        if location is not None:
            return httpx.Response(302, headers={"Location": location})
        if self.expired_status is not None:
            return httpx.Response(
                self.expired_status,
                content=b"<Error><Code>AccessDenied</Code>"
                b"<Message>Request has expired</Message></Error>",
            )
        if self.status is not None:
            return httpx.Response(self.status, content=b"nope")

        validators: dict[str, str] = {}
        if self.etag:
            validators["ETag"] = self.etag
        if self.last_modified:
            validators["Last-Modified"] = self.last_modified
        start = self._range_start(request)
        if start is None:
            return self._send(200, 0, validators, first)
        if self.refuse_range:
            self.refuse_range = False
            return httpx.Response(416, headers={"Content-Range": f"bytes */{len(self.body)}"})
        if self.wrong_range_start:
            self.wrong_range_start = False
            start += 7
        end = len(self.body) - 1
        headers = {**validators, "Content-Range": f"bytes {start}-{end}/{len(self.body)}"}
        return self._send(206, start, headers, first)

    def _range_start(self, request: httpx.Request) -> int | None:
        header = request.headers.get("Range")
        if header is None or self.ignore_range:
            return None
        if_range = request.headers.get("If-Range")
        if if_range is not None and if_range not in (self.etag, self.last_modified):
            return None  # the file changed: RFC 9110 says send it all
        assert header.startswith("bytes=")
        assert header.endswith("-")
        return int(header[len("bytes=") : -1])

    def _send(
        self, status: int, start: int, headers: dict[str, str], first: bool
    ) -> httpx.Response:
        data = self.body[start:]
        cut = self.cut_every_after
        if first and self.cut_first_after is not None:
            cut = self.cut_first_after
        if self.chunked:
            headers = {**headers, "Transfer-Encoding": "chunked"}
        elif not (self.unframed and status == 200):
            headers = {**headers, "Content-Length": str(len(data))}
        end_after = self.end_first_after if first else None
        return httpx.Response(
            status,
            headers=headers,
            stream=_Body(data + self.extra_bytes, self.piece, cut, self._sent, end_after),
        )

    def _sent(self, size: int) -> None:
        self.bytes_sent += size
        if self.clock is not None:
            self.clock.now += self.seconds_per_piece

    def hosts_contacted(self) -> set[str]:
        return {request.url.host for request in self.requests}


def fetch(
    server: FakeFileServer,
    output_dir: Path,
    url: str = URL,
    request_id: str = "req1",
    *,
    keep_alive: Callable[[], Awaitable[bool]] | None = None,
    keep_alive_every: float = 30.0,
    clean_leftovers: bool = True,
    **downloader_options: Any,
) -> DownloadedFile:
    async def run() -> DownloadedFile:
        transport = httpx.MockTransport(server.handler)
        async with make_download_http_client(5.0, transport=transport) as http:
            options: dict[str, Any] = {"allowed_hosts": ALLOWED}
            options.update(downloader_options)
            downloader = Downloader(http, output_dir=output_dir, **options)
            return await downloader.fetch(
                url,
                request_id,
                keep_alive=keep_alive,
                keep_alive_every=keep_alive_every,
                clean_leftovers=clean_leftovers,
            )

    return asyncio.run(run())


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_published_only(output_dir: Path, name: str, content: bytes) -> None:
    assert sorted(p.name for p in output_dir.iterdir()) == [name]  # no .part left
    assert (output_dir / name).read_bytes() == content


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "out"


# -- the happy path --------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_full_download_is_verified_published_and_private(out: Path, umask: int) -> None:
    server = FakeFileServer()
    previous = os.umask(umask)
    try:
        result = fetch(server, out)
    finally:
        os.umask(previous)

    assert result.path == out.resolve() / "req1.csv"
    assert result.size == len(BODY)
    assert result.sha256 == sha256(BODY)
    assert stat.S_IMODE(result.path.stat().st_mode) == 0o640
    assert_published_only(out, "req1.csv", BODY)
    assert len(server.requests) == 1


def test_file_mode_is_configurable(out: Path) -> None:
    result = fetch(FakeFileServer(), out, file_mode=0o600)
    assert stat.S_IMODE(result.path.stat().st_mode) == 0o600


def test_extension_follows_the_url_and_existing_file_is_replaced(out: Path) -> None:
    out.mkdir()
    (out / "req1.xlsx").write_bytes(b"old version")
    url = f"https://{HOST}/p/req1.XLSX?X-Amz-Signature={SIGNATURE}"
    result = fetch(FakeFileServer(), out, url)
    assert result.path.name == "req1.xlsx"
    assert_published_only(out, "req1.xlsx", BODY)


def test_stale_temp_files_of_the_same_request_are_cleaned(out: Path) -> None:
    out.mkdir()
    (out / ".req1.csv.0123456789ab0.part").write_bytes(b"half of an old attempt")
    (out / ".req1.zip.0123456789ab1.part").write_bytes(b"another leftover")
    (out / ".req1.xlsx.0123456789ab.part").write_bytes(b"a leftover of another extension")
    (out / ".other.csv.0123456789ab.part").write_bytes(b"someone else's")
    # The temp file of request "req1.csv", not of request "req1".
    (out / ".req1.csv.csv.0123456789ab.part").write_bytes(b"another request's")
    # No tag: not a name the downloader writes.
    (out / ".req1.csv.part").write_bytes(b"not a temp file of ours")
    fetch(FakeFileServer(), out)
    assert sorted(p.name for p in out.iterdir()) == [
        ".other.csv.0123456789ab.part",
        ".req1.csv.csv.0123456789ab.part",
        ".req1.csv.part",
        "req1.csv",
    ]


def test_leftovers_are_left_alone_when_the_caller_knows_there_are_none(out: Path) -> None:
    out.mkdir()
    (out / ".req1.csv.0123456789ab.part").write_bytes(b"not ours to judge")
    fetch(FakeFileServer(), out, clean_leftovers=False)
    assert sorted(p.name for p in out.iterdir()) == [".req1.csv.0123456789ab.part", "req1.csv"]


def test_output_directory_removed_between_fetches_is_made_again(out: Path) -> None:
    async def run() -> list[DownloadedFile]:
        transport = httpx.MockTransport(FakeFileServer().handler)
        async with make_download_http_client(5.0, transport=transport) as http:
            downloader = Downloader(http, output_dir=out, allowed_hosts=ALLOWED)
            first = await downloader.fetch(URL, "req1")
            shutil.rmtree(out)  # an operator cleaning up, or a remount
            second = await downloader.fetch(URL, "req2")
            return [first, second]

    first, second = asyncio.run(run())
    assert not first.path.exists()
    assert second.path.read_bytes() == BODY
    assert stat.S_IMODE(out.stat().st_mode) & 0o007 == 0


def test_requests_carry_no_credentials_and_identity_encoding(out: Path) -> None:
    other = "https://files.example.org/copy.csv"
    server = FakeFileServer(redirects={f"{HOST}{PATH}": other})
    fetch(server, out)
    assert server.hosts_contacted() == {HOST, "files.example.org"}
    for request in server.requests:
        for name in FORBIDDEN_HEADERS:
            assert name not in request.headers
        assert request.headers["Accept-Encoding"] == "identity"


def test_download_client_has_no_default_api_headers_and_no_redirects() -> None:
    client = make_download_http_client(7.0)
    try:
        assert client.follow_redirects is False
        assert client.timeout.read == 7.0
        assert {name.lower() for name in client.headers} <= {
            "accept",
            "accept-encoding",
            "connection",
            "user-agent",
        }
    finally:
        asyncio.run(client.aclose())


def test_small_file_logs_one_line(out: Path) -> None:
    # The whole body in one piece: no download.start, download.done says it all.
    with capture_logs() as logs:
        fetch(FakeFileServer(piece=len(BODY)), out)
    assert [entry["event"] for entry in logs] == ["download.done"]


def test_logs_events_without_secrets(out: Path) -> None:
    server = FakeFileServer(cut_first_after=3000)
    with capture_logs() as logs:
        fetch(server, out)
    events = [entry["event"] for entry in logs]
    assert events == ["download.start", "download.resumed", "download.done"]
    done = logs[-1]
    assert done["size"] == len(BODY)
    assert done["sha256"] == sha256(BODY)
    assert {"seconds", "bytes_per_second", "request_id", "url"} <= done.keys()
    assert done["url"] == f"https://{HOST}{PATH}"
    assert SIGNATURE not in repr(logs)


# -- resuming --------------------------------------------------------------------


def test_truncated_body_is_resumed_with_range_and_etag(out: Path) -> None:
    server = FakeFileServer(cut_first_after=3000)
    result = fetch(server, out)

    assert result.sha256 == sha256(BODY)
    assert_published_only(out, "req1.csv", BODY)
    first, second = server.requests
    assert "Range" not in first.headers
    assert second.headers["Range"] == "bytes=3000-"
    assert second.headers["If-Range"] == ETAG


def test_resume_uses_last_modified_when_there_is_no_strong_etag(out: Path) -> None:
    server = FakeFileServer(cut_first_after=1500, etag='W/"weak"')
    result = fetch(server, out)
    assert result.sha256 == sha256(BODY)
    assert server.requests[1].headers["If-Range"] == LAST_MODIFIED


def test_file_changed_between_attempts_restarts_from_the_new_file(out: Path) -> None:
    new_body = b"a completely different, newer file\n" * 50

    def replace_file(server: FakeFileServer) -> None:
        server.body, server.etag, server.last_modified = new_body, '"v2"', None

    server = FakeFileServer(cut_first_after=2000, after_first=replace_file)
    result = fetch(server, out)
    assert server.requests[1].headers["If-Range"] == ETAG  # the old validator: no match
    assert result.sha256 == sha256(new_body)
    assert_published_only(out, "req1.csv", new_body)


def restarts_and_resumes(logs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [
        (entry["event"], entry["reason"])
        for entry in logs
        if entry["event"] in ("download.restarted", "download.resumed")
    ]


def test_full_answer_to_a_range_request_starts_over(out: Path) -> None:
    server = FakeFileServer(cut_first_after=4000, ignore_range=True)
    with capture_logs() as logs:
        result = fetch(server, out)
    assert server.requests[1].headers["Range"] == "bytes=4000-"
    assert result.size == len(BODY)
    assert result.sha256 == sha256(BODY)
    assert_published_only(out, "req1.csv", BODY)
    assert restarts_and_resumes(logs) == [
        ("download.resumed", "connection cut: RemoteProtocolError"),
        ("download.restarted", "200 to a range request"),
    ]


def test_content_range_from_the_wrong_offset_starts_over(out: Path) -> None:
    server = FakeFileServer(cut_first_after=2000, wrong_range_start=True)
    with capture_logs() as logs:
        result = fetch(server, out)
    ranges = [request.headers.get("Range") for request in server.requests]
    assert ranges == [None, "bytes=2000-", None]
    assert result.sha256 == sha256(BODY)
    assert_published_only(out, "req1.csv", BODY)
    assert restarts_and_resumes(logs) == [
        ("download.resumed", "connection cut: RemoteProtocolError"),
        ("download.restarted", "206 starts at 2007, expected 2000"),
        ("download.resumed", "206 starts at 2007, expected 2000"),
    ]


def test_a_refused_range_starts_over(out: Path) -> None:
    server = FakeFileServer(cut_first_after=2000, refuse_range=True)
    with capture_logs() as logs:
        result = fetch(server, out)
    ranges = [request.headers.get("Range") for request in server.requests]
    assert ranges == [None, "bytes=2000-", None]
    assert result.sha256 == sha256(BODY)
    assert_published_only(out, "req1.csv", BODY)
    assert restarts_and_resumes(logs) == [
        ("download.resumed", "connection cut: RemoteProtocolError"),
        ("download.resumed", "server refused the range (416), starting over"),
    ]


def test_gives_up_after_max_resumes_and_leaves_nothing(out: Path) -> None:
    server = FakeFileServer(cut_every_after=1000)
    with pytest.raises(DownloadInterrupted, match="after 2 resumes") as caught:
        fetch(server, out, max_resumes=2)
    assert caught.value.retryable is True
    assert len(server.requests) == 3
    assert list(out.iterdir()) == []


def test_more_bytes_than_announced_is_a_length_mismatch(out: Path) -> None:
    server = FakeFileServer(extra_bytes=b"surprise")
    with pytest.raises(DownloadInterrupted, match="length mismatch"):
        fetch(server, out)
    assert list(out.iterdir()) == []


# -- answers that end the attempt --------------------------------------------------


@pytest.mark.parametrize("status", [401, 403, 410])
def test_expired_url_raises_url_expired_and_writes_nothing(out: Path, status: int) -> None:
    server = FakeFileServer(expired_status=status)
    with pytest.raises(UrlExpired, match="fresh URL") as caught:
        fetch(server, out)
    assert caught.value.retryable is True
    assert SIGNATURE not in str(caught.value)
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("status", [404, 500, 503, 429])
def test_missing_file_and_server_errors_are_retryable_interruptions(out: Path, status: int) -> None:
    with pytest.raises(DownloadInterrupted, match=str(status)) as caught:
        fetch(FakeFileServer(status=status), out)
    assert caught.value.retryable is True
    assert list(out.iterdir()) == []


def test_connection_failure_is_a_retryable_interruption(out: Path) -> None:
    async def run() -> None:
        def refuse(request: httpx.Request) -> httpx.Response:
            raise httpx.ConnectError("connection refused", request=request)

        transport = httpx.MockTransport(refuse)
        async with make_download_http_client(5.0, transport=transport) as http:
            downloader = Downloader(http, output_dir=out, allowed_hosts=ALLOWED)
            await downloader.fetch(URL, "req1")

    with pytest.raises(DownloadInterrupted, match="ConnectError") as caught:
        asyncio.run(run())
    assert caught.value.retryable is True
    assert SIGNATURE not in str(caught.value)
    assert list(out.iterdir()) == []


# -- refusals --------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/iam/",
        "https://2852039166/x.csv",
        "file:///etc/passwd",
        f"https://evil.example/x.csv?X-Amz-Signature={SIGNATURE}",
        f"http://{HOST}{PATH}",
        f"https://user:pw@{HOST}{PATH}",
    ],
)
def test_disallowed_url_is_refused_before_any_request(out: Path, url: str) -> None:
    server = FakeFileServer()
    with pytest.raises(DownloadRefused) as caught:
        fetch(server, out, url)
    assert caught.value.retryable is False
    assert server.requests == []
    assert not out.exists()
    assert SIGNATURE not in str(caught.value)


def test_redirect_to_a_disallowed_host_is_refused_without_contacting_it(out: Path) -> None:
    server = FakeFileServer(redirects={f"{HOST}{PATH}": "http://169.254.169.254/latest/meta-data/"})
    with pytest.raises(DownloadRefused, match=r"169\.254\.169\.254"):
        fetch(server, out)
    assert server.hosts_contacted() == {HOST}
    assert list(out.iterdir()) == []


def test_relative_redirect_is_followed_and_checked(out: Path) -> None:
    server = FakeFileServer(redirects={f"{HOST}{PATH}": "/moved/req1.csv?sig=2"})
    result = fetch(server, out)
    assert [str(r.url.path) for r in server.requests] == [PATH, "/moved/req1.csv"]
    assert result.sha256 == sha256(BODY)


def test_redirect_loop_is_cut_off(out: Path) -> None:
    server = FakeFileServer(redirects={f"{HOST}{PATH}": PATH})
    with pytest.raises(DownloadInterrupted, match="redirects"):
        fetch(server, out)
    assert len(server.requests) == 6  # the first request and five hops
    assert list(out.iterdir()) == []


def test_request_id_that_would_escape_the_directory_is_refused(out: Path) -> None:
    server = FakeFileServer()
    with pytest.raises(DownloadRefused, match="escapes"):
        fetch(server, out, request_id="../../etc/cron.d/x")
    assert server.requests == []


# -- time and ownership ------------------------------------------------------------


def test_trickling_server_hits_the_overall_deadline(out: Path) -> None:
    clock = FakeClock()
    # Each 100-byte piece takes 5 s: every read is quick enough for a per-read
    # timeout, but the whole file would take over eight minutes.
    server = FakeFileServer(piece=100, clock=clock, seconds_per_piece=5.0)
    with pytest.raises(DownloadInterrupted, match="deadline") as caught:
        fetch(server, out, deadline=60.0, monotonic=clock)
    assert caught.value.retryable is True
    assert server.bytes_sent < len(BODY)
    assert list(out.iterdir()) == []


def test_keep_alive_is_called_while_streaming_and_before_publishing(out: Path) -> None:
    clock = FakeClock()
    server = FakeFileServer(piece=1000, clock=clock, seconds_per_piece=10.0)
    calls: list[float] = []

    async def keep_alive() -> bool:
        calls.append(clock.now)
        return True

    fetch(server, out, keep_alive=keep_alive, keep_alive_every=30.0, monotonic=clock)
    # 11 pieces of 10 s each: beats after 30, 60 and 90 s, then one before publishing.
    assert len(calls) == 4
    assert all(later - earlier >= 10.0 for earlier, later in itertools.pairwise(calls))
    assert_published_only(out, "req1.csv", BODY)


def test_lost_ownership_mid_stream_stops_and_publishes_nothing(out: Path) -> None:
    clock = FakeClock()
    server = FakeFileServer(piece=500, clock=clock, seconds_per_piece=10.0)

    async def keep_alive() -> bool:
        return False

    with pytest.raises(OwnershipLost) as caught:
        fetch(server, out, keep_alive=keep_alive, keep_alive_every=30.0, monotonic=clock)
    assert caught.value.retryable is False
    assert server.bytes_sent < len(BODY)
    assert list(out.iterdir()) == []


def test_lost_ownership_just_before_publishing_publishes_nothing(out: Path) -> None:
    answers: list[bool] = []

    async def keep_alive() -> bool:
        answers.append(False)
        return False

    # The clock never moves, so the only check is the one right before os.replace.
    with pytest.raises(OwnershipLost):
        fetch(FakeFileServer(), out, keep_alive=keep_alive, monotonic=lambda: 0.0)
    assert answers == [False]
    assert list(out.iterdir()) == []


# -- the output directory ------------------------------------------------------------


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES])
def test_unwritable_output_while_writing_is_reported_and_leaves_nothing(
    out: Path, monkeypatch: pytest.MonkeyPatch, error: int
) -> None:
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to tell the temp file's descriptor apart")
    real_write = os.write
    writes_to_part: list[int] = []

    def write(fd: int, data: Any) -> int:
        # The kernel's answer for a full disk (or quota, ...), only for the download's temp file, and
        # only after some bytes went through, so a partial file exists when it fails.
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".part"):
            writes_to_part.append(len(data))
            if len(writes_to_part) > 3:
                raise OSError(error, os.strerror(error))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(OutputUnwritable, match=os.strerror(error)) as caught:
        fetch(FakeFileServer(), out)
    assert caught.value.retryable is True
    assert str(out) in str(caught.value)
    assert len(writes_to_part) == 4
    assert list(out.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_output_directory_is_output_unwritable(out: Path) -> None:
    out.mkdir()
    out.chmod(0o500)
    try:
        with pytest.raises(OutputUnwritable, match="Permission denied"):
            fetch(FakeFileServer(), out)
    finally:
        out.chmod(0o700)
    assert list(out.iterdir()) == []


def test_output_directory_is_created_private(out: Path) -> None:
    target = out / "nested"
    fetch(FakeFileServer(), target)
    assert stat.S_IMODE(target.stat().st_mode) & 0o007 == 0


# -- big files: hashed and written by a thread -------------------------------------------

BIG_BODY = os.urandom((3 << 20) + 4321)  # past the first MiB, which is written inline


def test_big_file_cut_short_resumes_exactly_where_the_writer_thread_stopped(out: Path) -> None:
    cut = (2 << 20) + 65536 * 3
    server = FakeFileServer(body=BIG_BODY, piece=65536, cut_first_after=cut)
    result = fetch(server, out)
    assert result.size == len(BIG_BODY)
    assert result.sha256 == sha256(BIG_BODY)
    assert_published_only(out, "req1.csv", BIG_BODY)
    assert server.requests[1].headers["Range"] == f"bytes={cut}-"


def test_full_answer_to_a_range_request_of_a_big_file_starts_over(out: Path) -> None:
    server = FakeFileServer(body=BIG_BODY, piece=65536, cut_first_after=2 << 20, ignore_range=True)
    result = fetch(server, out)
    assert result.sha256 == sha256(BIG_BODY)
    assert_published_only(out, "req1.csv", BIG_BODY)


def test_disk_full_in_the_writer_thread_is_output_unwritable(
    out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = os.write
    failed_in: list[str] = []

    def write(fd: int, data: Any) -> int:
        # Past 2 MiB, so the bytes are in the writer thread's hands when the disk fills.
        if os.fstat(fd).st_size >= (2 << 20):
            failed_in.append(threading.current_thread().name)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(OutputUnwritable, match=os.strerror(errno.ENOSPC)) as caught:
        fetch(FakeFileServer(body=BIG_BODY, piece=65536), out)
    assert caught.value.retryable is True
    assert failed_in == ["download-writer"]  # once: the writer stops at its first error
    assert list(out.iterdir()) == []


# -- publishing: the directory fsync -------------------------------------------------------


def test_concurrent_publishes_share_directory_fsyncs_each_after_its_rename(
    out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Group commit: fewer directory fsyncs than files, and every fetch returns only
    after a directory fsync that started after its own rename had finished."""
    events: list[tuple[str, str]] = []  # appended from the event loop and from threads
    lock = threading.Lock()
    real_fsync, real_replace = os.fsync, os.replace

    def note(kind: str, what: str) -> None:
        with lock:
            events.append((kind, what))

    def fsync(fd: int) -> None:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            real_fsync(fd)
            return
        note("dir-fsync-start", "")
        # Slow enough that renames pile up behind the running one.
        threading.Event().wait(0.02)
        real_fsync(fd)
        note("dir-fsync-end", "")

    def replace(source: Any, target: Any) -> None:
        real_replace(source, target)
        note("rename", Path(target).stem)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    ids = [f"req{i}" for i in range(20)]

    async def run() -> None:
        transport = httpx.MockTransport(FakeFileServer().handler)
        async with make_download_http_client(5.0, transport=transport) as http:
            downloader = Downloader(http, output_dir=out, allowed_hosts=ALLOWED)

            async def one(request_id: str) -> None:
                await downloader.fetch(URL, request_id)
                note("returned", request_id)

            await asyncio.gather(*(one(request_id) for request_id in ids))

    asyncio.run(run())
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{i}.csv" for i in ids)
    fsyncs = [kind for kind, _ in events if kind.startswith("dir-fsync")]
    assert fsyncs == ["dir-fsync-start", "dir-fsync-end"] * (len(fsyncs) // 2)  # one at a time
    assert 1 <= len(fsyncs) // 2 < len(ids) // 2
    for request_id in ids:
        renamed = events.index(("rename", request_id))
        returned = events.index(("returned", request_id))
        # An fsync that started after the rename and ended before the fetch returned.
        started = [i for i, (kind, _) in enumerate(events) if kind == "dir-fsync-start"]
        ended = [i for i, (kind, _) in enumerate(events) if kind == "dir-fsync-end"]
        assert any(
            renamed < start < end < returned for start, end in zip(started, ended, strict=True)
        ), request_id


# -- size limits and free space (issue 10, defect 3) ----------------------------------------


def test_content_length_above_the_size_limit_is_refused_before_any_byte(out: Path) -> None:
    server = FakeFileServer()
    with pytest.raises(OutputUnwritable, match="TRACKER_MAX_FILE_SIZE") as caught:
        fetch(server, out, max_file_size=len(BODY) - 1)
    assert caught.value.retryable is True  # the batch stays ready, no attempt counted
    assert f"{len(BODY)} bytes" in str(caught.value)
    assert server.bytes_sent == 0
    assert list(out.iterdir()) == []


def test_a_file_of_exactly_the_size_limit_is_accepted(out: Path) -> None:
    result = fetch(FakeFileServer(), out, max_file_size=len(BODY))
    assert result.size == len(BODY)


def test_a_body_without_length_growing_past_the_limit_is_stopped(out: Path) -> None:
    server = FakeFileServer(chunked=True, body=BODY * 100)  # about 1 MB, 1000-byte pieces
    with pytest.raises(OutputUnwritable, match="grew past the size limit of 4096") as caught:
        fetch(server, out, max_file_size=4096)
    assert caught.value.retryable is True
    assert server.bytes_sent <= 4096 + server.piece
    assert list(out.iterdir()) == []


def test_a_file_larger_than_the_free_space_is_refused_before_any_byte(
    out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_statvfs = os.statvfs

    def statvfs(path: Any) -> Any:
        real = real_statvfs(path)
        # 4 KiB blocks, room for 2 of them.
        return os.statvfs_result((4096, 4096, real.f_blocks, 2, 2, *tuple(real)[5:]))

    monkeypatch.setattr(os, "statvfs", statvfs)
    server = FakeFileServer()
    with pytest.raises(OutputUnwritable, match="no room for the file") as caught:
        fetch(server, out)
    assert "8192 bytes free" in str(caught.value)
    assert caught.value.retryable is True
    assert server.bytes_sent == 0
    assert list(out.iterdir()) == []


def test_free_space_counts_what_other_downloads_are_about_to_write(
    out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_statvfs = os.statvfs

    def statvfs(path: Any) -> Any:
        real = real_statvfs(path)
        # Room for one BODY, not two.
        return os.statvfs_result((1, 1, real.f_blocks, 15000, 15000, *tuple(real)[5:]))

    monkeypatch.setattr(os, "statvfs", statvfs)
    second_started = asyncio.Event()

    class SlowBody(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield BODY[:1000]
            await second_started.wait()
            yield BODY[1000:]

    def handler(request: httpx.Request) -> httpx.Response:
        headers = {"Content-Length": str(len(BODY))}
        if "first" in request.url.path:
            return httpx.Response(200, headers=headers, stream=SlowBody())
        second_started.set()
        return httpx.Response(200, headers=headers, content=BODY)

    async def run() -> tuple[Any, ...]:
        transport = httpx.MockTransport(handler)
        async with make_download_http_client(5.0, transport=transport) as http:
            downloader = Downloader(http, output_dir=out, allowed_hosts=ALLOWED)
            first = asyncio.create_task(downloader.fetch(f"https://{HOST}/first.csv", "first"))
            await asyncio.sleep(0.05)
            second = downloader.fetch(f"https://{HOST}/second.csv", "second")
            return tuple(await asyncio.gather(first, second, return_exceptions=True))

    first, second = asyncio.run(run())
    assert isinstance(first, DownloadedFile)
    assert isinstance(second, OutputUnwritable)
    assert "promised to other downloads" in str(second)
    assert sorted(p.name for p in out.iterdir()) == ["first.csv"]


# -- the file host's checksum (issue 10, defect 4) -------------------------------------------


def md5_etag(data: bytes) -> str:
    return f'"{hashlib.md5(data).hexdigest()}"'


def test_a_body_matching_its_md5_etag_is_published(out: Path) -> None:
    result = fetch(FakeFileServer(etag=md5_etag(BODY)), out)
    assert_published_only(out, "req1.csv", BODY)
    assert result.sha256 == sha256(BODY)


def test_a_body_disagreeing_with_its_md5_etag_is_not_published(out: Path) -> None:
    server = FakeFileServer(etag=md5_etag(b"the bytes S3 holds"))
    with pytest.raises(DownloadInterrupted, match="checksum mismatch") as caught:
        fetch(server, out)
    assert caught.value.retryable is True  # counted as an attempt: retried, then failed
    assert hashlib.md5(BODY).hexdigest() in str(caught.value)
    assert list(out.iterdir()) == []


def test_the_md5_covers_the_whole_file_across_range_resumes(out: Path) -> None:
    server = FakeFileServer(etag=md5_etag(BODY), cut_first_after=3000)
    fetch(server, out)
    assert len(server.requests) == 2
    assert server.requests[1].headers["Range"] == "bytes=3000-"
    assert_published_only(out, "req1.csv", BODY)


def test_a_resumed_file_whose_parts_disagree_with_the_md5_is_not_published(out: Path) -> None:
    server = FakeFileServer(etag=md5_etag(BODY), cut_first_after=3000)

    def change_the_tail(server: FakeFileServer) -> None:
        server.body = BODY[:3000] + b"X" * (len(BODY) - 3000)

    server.after_first = change_the_tail
    with pytest.raises(DownloadInterrupted, match="checksum mismatch"):
        fetch(server, out)
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("etag", ['"0123456789abcdef0123456789abcdef-2"', 'W/"v1"', '"v1-etag"'])
def test_etags_that_are_not_an_md5_are_not_checked(out: Path, etag: str) -> None:
    fetch(FakeFileServer(etag=etag), out)
    assert_published_only(out, "req1.csv", BODY)


def test_an_unframed_body_without_a_checksum_is_not_published(out: Path) -> None:
    server = FakeFileServer(unframed=True)
    with pytest.raises(DownloadInterrupted, match="nothing confirms") as caught:
        fetch(server, out)
    assert caught.value.retryable is True
    assert list(out.iterdir()) == []


def test_an_unframed_body_confirmed_by_its_md5_is_published(out: Path) -> None:
    server = FakeFileServer(unframed=True, etag=md5_etag(BODY))
    fetch(server, out)
    assert len(server.requests) == 1
    assert_published_only(out, "req1.csv", BODY)


def test_an_unframed_body_that_stops_early_is_resumed_until_its_md5_matches(out: Path) -> None:
    server = FakeFileServer(unframed=True, etag=md5_etag(BODY), end_first_after=4000)
    fetch(server, out)
    assert len(server.requests) == 2
    assert server.requests[1].headers["Range"] == "bytes=4000-"
    assert_published_only(out, "req1.csv", BODY)
