"""The download client: httpx's API over an aiohttp connection pool, for output files.

The API client's bridge (httpx-aiohttp, see `tracker.deepvue.make_api_transport`) cannot
serve downloads, for two reasons read in its source (0.2) and seen on the wire:
- it hands aiohttp the URL as text, which yarl parses and quotes again (`%2F` in the
  query becomes `/`, `%7E` becomes `~`), so the request is not the presigned URL the API
  handed out, byte for byte; here the URL goes to aiohttp as already encoded;
- it turns a connection the server drops or resets before answering into
  `httpx.ConnectTimeout`, which is neither true nor a reason to resume, and lets an answer
  that is not HTTP escape as an aiohttp exception (the API client wraps the bridge for
  that). Here every aiohttp error becomes the httpx error that httpx's own transport
  raises for the same failure, by the one table in tracker/aiohttp_errors.py.
The body bytes themselves would come through it unchanged. httpx's own pool (httpcore)
is not used either: it reads 64 KiB at a time and costs more CPU per request than
aiohttp, which matters for a 1 GiB file and for thousands of tiny ones.
"""

from __future__ import annotations

import http.cookiejar
import urllib.request
from collections.abc import AsyncIterator

import aiohttp
import httpx
import yarl

from tracker.aiohttp_errors import as_httpx_error

__all__ = ["make_download_http_client"]

# What aiohttp buffers per connection before it stops reading the socket (it pauses at
# twice this): enough to keep bytes coming while the writer catches up, little memory.
_SOCKET_BUFFER = 1 << 18


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


class _FileHostTransport(httpx.AsyncBaseTransport):
    """GET requests for output files, sent by aiohttp with the URL exactly as given."""

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
                # Already encoded: yarl must not quote it again (see the module docstring).
                yarl.URL(str(request.url), encoded=True),
                headers=request.headers.multi_items(),
                allow_redirects=False,
                timeout=self._timeout_of(request),
            )
        except aiohttp.ClientError as exc:
            raise as_httpx_error(exc, request) from exc
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
            raise as_httpx_error(exc, self._request) from exc

    async def aclose(self) -> None:
        # Back to the pool when the body was read to its end; closed otherwise.
        self._response.release()
