"""The download client's own transport (aiohttp underneath) against a real loopback server.

These go through `make_download_http_client` exactly as the daemon builds it: the bytes on
the wire, the errors the Downloader classifies, the connection pool, the writer thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp import web

from tracker.aiohttp_errors import as_httpx_error
from tracker.download import (
    ChecksumMismatch,
    DownloadedFile,
    Downloader,
    DownloadInterrupted,
    FileTooLarge,
    OutputUnwritable,
)
from tracker.file_transport import make_download_http_client
from tracker.simulator import (
    SimulatorConfig,
    SimulatorHandle,
    expected_sha256,
    running_simulator,
)

ALLOWED = ("127.0.0.1",)
MIB = 1 << 20
# What a presigned S3 URL looks like where it is fragile: %2F in the credential scope,
# %3D and %2B in values, spaces as %20, and escapes in the key itself. yarl, left to
# itself, decodes %2F and %3D here, which changes what S3 signs.
PRESIGNED_TARGET = (
    "/upi-basic-batch-output-files/req%201%2Fpart%3D2%2B.csv"
    "?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Credential=AKIAEXAMPLE%2F20250101%2Fap-south-1%2Fs3%2Faws4_request"
    "&X-Amz-Date=20250101T000000Z&X-Amz-Expires=600&X-Amz-SignedHeaders=host"
    "&response-content-disposition=attachment%3B%20filename%3D%22a%2Bb.csv%22"
    "&X-Amz-Signature=0a1b%3D%3D%2B"
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Seen:
    """What the server saw of each request."""

    targets: list[str] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    client_ports: list[int] = field(default_factory=list)

    def record(self, request: web.Request) -> None:
        self.targets.append(request.raw_path)
        self.headers.append({key.lower(): value for key, value in request.headers.items()})
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.client_ports.append(peer[1] if peer else -1)


@contextlib.asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[str]:
    """A real aiohttp server on loopback, answering every GET with `handler`."""
    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    address = runner.addresses[0]
    try:
        yield f"http://127.0.0.1:{address[1]}"
    finally:
        await runner.cleanup()


def body_server(seen: Seen, body: bytes, *, cut_first_at: int | None = None) -> Handler:
    """Serves `body` with ETag and single-range support; the first answer may break off."""

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.record(request)
        start = 0
        status = 200
        headers = {"ETag": '"v1"', "Set-Cookie": "tracking=1; Path=/"}
        if (ranged := request.headers.get("Range")) is not None:
            start = int(ranged.removeprefix("bytes=").removesuffix("-"))
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = len(body) - start
        await response.prepare(request)
        stop = len(body)
        if cut_first_at is not None and len(seen.targets) == 1:
            stop = cut_first_at
        for offset in range(start, stop, 64 * 1024):
            await response.write(body[offset : min(offset + 64 * 1024, stop)])
        if stop < len(body):
            assert request.transport is not None
            request.transport.close()  # a dropped connection, mid-body
            return response
        await response.write_eof()
        return response

    return handler


def fetch_from(base: str, target: str, out: Path, **options: Any) -> DownloadedFile:
    async def run() -> DownloadedFile:
        async with make_download_http_client(5.0) as http:
            downloader = Downloader(http, output_dir=out, allowed_hosts=ALLOWED)
            return await downloader.fetch(f"{base}{target}", "req1", **options)

    return asyncio.run(run())


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "out"


# -- the bytes on the wire -----------------------------------------------------------


def test_presigned_url_reaches_the_server_byte_for_byte(out: Path) -> None:
    seen = Seen()

    async def run() -> tuple[DownloadedFile, str]:
        async with (
            serving(body_server(seen, b"id,name\n")) as base,
            make_download_http_client(5.0) as http,
        ):
            downloader = Downloader(http, output_dir=out, allowed_hosts=ALLOWED)
            result = await downloader.fetch(base + PRESIGNED_TARGET, "req1")
            # The same URL handed to aiohttp as plain text: what the transport must avoid.
            async with (
                aiohttp.ClientSession() as session,
                session.get(base + PRESIGNED_TARGET) as response,
            ):
                await response.read()
            return result, seen.targets.pop()

    result, naive = asyncio.run(run())
    assert seen.targets == [PRESIGNED_TARGET]
    assert naive != PRESIGNED_TARGET  # so the server reports what it got, unnormalised
    assert result.path.read_bytes() == b"id,name\n"


def test_requests_carry_no_credentials_no_cookies_and_reuse_one_connection(out: Path) -> None:
    seen = Seen()

    async def run() -> None:
        async with (
            serving(body_server(seen, b"a,b\n1,2\n")) as base,
            make_download_http_client(5.0) as http,
        ):
            downloader = Downloader(http, output_dir=out, allowed_hosts=ALLOWED)
            await downloader.fetch(f"{base}/f/one.csv?sig=1", "one")
            await downloader.fetch(f"{base}/f/two.csv?sig=2", "two")

    asyncio.run(run())
    assert len(seen.targets) == 2
    for headers in seen.headers:
        assert headers.keys().isdisjoint({"authorization", "x-api-key", "client-id", "cookie"})
        assert headers["accept-encoding"] == "identity"
    first, second = seen.client_ports
    assert first == second  # the pooled connection was used again


# -- big files: the writer thread ----------------------------------------------------------


def test_big_file_is_streamed_hashed_and_published(out: Path) -> None:
    body = os.urandom(5 * MIB + 12345)
    seen = Seen()

    async def run() -> DownloadedFile:
        async with serving(body_server(seen, body)) as base, make_download_http_client(5.0) as http:
            downloader = Downloader(http, output_dir=out, allowed_hosts=ALLOWED)
            return await downloader.fetch(f"{base}/f/req1.csv", "req1")

    result = asyncio.run(run())
    assert result.size == len(body)
    assert result.sha256 == hashlib.sha256(body).hexdigest()
    assert result.path.read_bytes() == body
    assert stat.S_IMODE(result.path.stat().st_mode) == 0o640
    assert sorted(p.name for p in out.iterdir()) == ["req1.csv"]


def test_body_cut_short_is_resumed_from_where_it_broke(out: Path) -> None:
    body = os.urandom(6 * MIB + 7)
    cut = 3 * MIB + 5  # past the first MiB, so the writer thread holds bytes at the cut
    seen = Seen()

    async def run() -> DownloadedFile:
        async with (
            serving(body_server(seen, body, cut_first_at=cut)) as base,
            make_download_http_client(5.0) as http,
        ):
            downloader = Downloader(http, output_dir=out, allowed_hosts=ALLOWED)
            return await downloader.fetch(f"{base}/f/req1.csv", "req1")

    result = asyncio.run(run())
    assert result.sha256 == hashlib.sha256(body).hexdigest()
    assert result.path.read_bytes() == body
    first, second = seen.headers
    assert "range" not in first
    # From the bytes the file holds: the cut, less what aiohttp had buffered but not
    # handed over when the connection dropped (it raises instead of returning them).
    resumed_at = int(second["range"].removeprefix("bytes=").removesuffix("-"))
    assert MIB < resumed_at <= cut
    assert second["if-range"] == '"v1"'


def test_cancelled_big_download_leaves_no_file_and_no_open_descriptor(out: Path) -> None:
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to count open descriptors")
    sent = asyncio.Event()

    async def stalls_after_three_mib(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"ETag": '"v1"'})
        response.content_length = 10 * MIB
        await response.prepare(request)
        await response.write(os.urandom(3 * MIB))
        sent.set()
        await asyncio.sleep(3600)  # cancelled when the server shuts down
        return response

    def open_part_files() -> list[str]:
        names = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                names.append(os.readlink(f"/proc/self/fd/{fd}"))
        return [name for name in names if name.endswith(".part")]

    async def run() -> None:
        async with serving(stalls_after_three_mib) as base, make_download_http_client(5.0) as http:
            downloader = Downloader(http, output_dir=out, allowed_hosts=ALLOWED)
            task = asyncio.create_task(downloader.fetch(f"{base}/f/req1.csv", "req1"))
            await sent.wait()
            while not any(p.stat().st_size > MIB for p in out.glob(".*.part")):
                await asyncio.sleep(0.01)  # until the writer thread has taken over
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        # The writer thread closes the file when it ends, just after its current batch.
        for _ in range(500):
            if not open_part_files():
                break
            await asyncio.sleep(0.01)

    asyncio.run(run())
    assert list(out.iterdir()) == []
    assert open_part_files() == []


# -- failures the Downloader classifies ------------------------------------------------


def test_refused_connection_is_a_connect_error(out: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # free, and nobody listens on it once closed

    async def direct() -> None:
        async with make_download_http_client(5.0) as http:
            await http.get(f"http://127.0.0.1:{port}/f.csv")

    with pytest.raises(httpx.ConnectError):
        asyncio.run(direct())
    with pytest.raises(DownloadInterrupted, match="ConnectError"):
        fetch_from(f"http://127.0.0.1:{port}", "/f/req1.csv?X-Amz-Signature=s3cr3t", out)
    assert list(out.iterdir()) == []


def test_stalled_body_is_a_read_timeout() -> None:
    async def stalls(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = 4096
        await response.prepare(request)
        await response.write(b"x" * 1024)
        await asyncio.sleep(3600)  # cancelled when the server shuts down
        return response

    received: list[bytes] = []

    async def read_all(response: httpx.Response) -> None:
        async for chunk in response.aiter_raw():
            received.append(chunk)

    async def run() -> None:
        async with (
            serving(stalls) as base,
            make_download_http_client(0.2) as http,
            http.stream("GET", f"{base}/f.csv") as response,
        ):
            with pytest.raises(httpx.ReadTimeout):
                await read_all(response)

    asyncio.run(run())
    assert b"".join(received) == b"x" * 1024


def test_server_closing_before_answering_is_a_protocol_error() -> None:
    async def hangs_up(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.close()
        return web.Response()

    async def run() -> None:
        async with serving(hangs_up) as base, make_download_http_client(5.0) as http:
            await http.get(f"{base}/f.csv")

    # Resumable for the Downloader, like httpx's own "Server disconnected".
    with pytest.raises(httpx.RemoteProtocolError):
        asyncio.run(run())


def test_only_get_is_sent() -> None:
    async def run() -> None:
        async with make_download_http_client(5.0) as http:
            await http.post("http://127.0.0.1:9/f.csv", content=b"x")

    with pytest.raises(httpx.UnsupportedProtocol):
        asyncio.run(run())


_REFUSED = OSError(111, "Connection refused")


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (aiohttp.ConnectionTimeoutError(), httpx.ConnectTimeout),
        (aiohttp.SocketTimeoutError(), httpx.ReadTimeout),
        (aiohttp.ServerTimeoutError(), httpx.ReadTimeout),
        (aiohttp.ClientProxyConnectionError(None, _REFUSED), httpx.ProxyError),
        (aiohttp.ClientHttpProxyError(None, (), status=407), httpx.ProxyError),
        (aiohttp.ClientConnectorError(None, _REFUSED), httpx.ConnectError),
        (aiohttp.ClientPayloadError("cut"), httpx.RemoteProtocolError),
        (aiohttp.ServerDisconnectedError(), httpx.RemoteProtocolError),
        (aiohttp.ClientResponseError(None, (), status=400), httpx.RemoteProtocolError),
        (aiohttp.ClientOSError(104, "Connection reset by peer"), httpx.ReadError),
        (aiohttp.ClientConnectionError(), httpx.ReadError),
        (aiohttp.InvalidURL("https://bad host/"), httpx.UnsupportedProtocol),
        (aiohttp.NonHttpUrlClientError("ftp://host/f.csv"), httpx.UnsupportedProtocol),
        (aiohttp.ClientError(), httpx.TransportError),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else value.__name__,
)
def test_each_aiohttp_error_becomes_the_httpx_error_for_the_same_failure(
    error: aiohttp.ClientError, expected: type[httpx.TransportError]
) -> None:
    request = httpx.Request("GET", "https://files.example.org/f.csv?X-Amz-Signature=s3cr3t")
    mapped = as_httpx_error(error, request)
    assert type(mapped) is expected
    assert str(mapped) == type(error).__name__  # aiohttp's text may quote the URL
    assert mapped.request is request


# -- hostile file hosts over the wire (issue 10, defects 3 and 4), the simulator serving ----------

HOSTILE = SimulatorConfig(completion_delay=0, file_size=300_000, big_file_size=3 * MIB)


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorHandle]:
    with running_simulator(HOSTILE) as handle:
        yield handle


def output_url(sim: SimulatorHandle, request_id: str) -> str:
    with httpx.Client(base_url=sim.base_url, timeout=10) as client:
        token = client.post(
            "/v1/authorize", data={"client_id": "demo-client", "client_secret": "demo-secret"}
        ).json()["access_token"]
        answer = client.get(
            "/v1/verification/batch-processing-status",
            params={"request_id": request_id},
            headers={"Authorization": f"Bearer {token}", "x-api-key": "demo-secret"},
        ).json()
    return str(answer["data"]["batch_output_file_url"])


def fetch_hostile(
    sim: SimulatorHandle, request_id: str, out: Path, **options: Any
) -> DownloadedFile:
    url = output_url(sim, request_id)

    async def run() -> DownloadedFile:
        async with make_download_http_client(5.0) as http:
            downloader = Downloader(http, output_dir=out, allowed_hosts=ALLOWED, **options)
            return await downloader.fetch(url, request_id)

    return asyncio.run(run())


def test_a_big_file_with_its_md5_etag_is_verified_through_the_writer_thread(
    sim: SimulatorHandle, out: Path
) -> None:
    result = fetch_hostile(sim, "big-md5", out)
    assert result.size == 3 * MIB
    assert result.sha256 == expected_sha256("big-md5", 3 * MIB)


def test_a_file_disagreeing_with_its_md5_etag_is_not_published(
    sim: SimulatorHandle, out: Path
) -> None:
    with pytest.raises(ChecksumMismatch, match="checksum mismatch") as caught:
        fetch_hostile(sim, "badetag-1", out)
    assert isinstance(caught.value, DownloadInterrupted)  # counted: retried, then failed
    assert list(out.iterdir()) == []


def test_unframed_bodies_are_published_only_when_their_md5_matches(
    sim: SimulatorHandle, out: Path
) -> None:
    # The simulator cuts about half of its unframed answers early, at random: every one
    # ends as the complete file, resumed with Range where it stopped short.
    for n in range(8):
        result = fetch_hostile(sim, f"unframed-{n}", out)
        assert result.sha256 == expected_sha256(f"unframed-{n}", 300_000)
    cut_short = [
        request
        for request in sim.stats()["downloads"]
        if isinstance(request, dict) and "range" in request["headers"]
    ]
    assert cut_short  # some were resumed
    assert sorted(p.name for p in out.iterdir()) == [f"unframed-{n}.csv" for n in range(8)]


def test_an_unframed_body_with_no_checksum_is_never_published(
    sim: SimulatorHandle, out: Path
) -> None:
    with pytest.raises(DownloadInterrupted, match="nothing confirms"):
        fetch_hostile(sim, "unframed-noetag-1", out)
    assert list(out.iterdir()) == []


def test_a_content_length_above_the_limit_is_refused_before_writing(
    sim: SimulatorHandle, out: Path
) -> None:
    with pytest.raises(FileTooLarge, match="TRACKER_MAX_FILE_SIZE") as caught:
        fetch_hostile(sim, "big-limit", out, max_file_size=64 * 1024)
    assert isinstance(caught.value, OutputUnwritable)  # the batch stays ready
    assert list(out.iterdir()) == []


def test_a_file_that_never_ends_is_stopped_at_the_limit(sim: SimulatorHandle, out: Path) -> None:
    with pytest.raises(FileTooLarge, match="grew past the size limit"):
        fetch_hostile(sim, "endless-1", out, max_file_size=2 * MIB)
    assert list(out.iterdir()) == []
