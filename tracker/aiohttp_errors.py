"""aiohttp's errors as the httpx errors httpx's own transport raises for the same failure.

Both clients run httpx's API over aiohttp (the API client through httpx-aiohttp, downloads
through tracker/file_transport.py), and their callers catch httpx's errors only: an
aiohttp error that got through would crash a worker instead of counting as a fault.
"""

from __future__ import annotations

import aiohttp
import httpx

__all__ = ["ERROR_TABLE", "as_httpx_error"]

# aiohttp's error -> the httpx error for the same failure; the first row that matches
# wins, so a subclass comes before its base.
ERROR_TABLE: tuple[
    tuple[tuple[type[aiohttp.ClientError], ...], type[httpx.TransportError]], ...
] = (
    ((aiohttp.ConnectionTimeoutError,), httpx.ConnectTimeout),
    ((aiohttp.ServerTimeoutError,), httpx.ReadTimeout),
    ((aiohttp.ClientProxyConnectionError, aiohttp.ClientHttpProxyError), httpx.ProxyError),
    ((aiohttp.ClientConnectorError,), httpx.ConnectError),
    # A body cut short, a connection closed before the answer, an answer that is not
    # HTTP: what h11 calls a protocol error, and a reason to resume.
    (
        (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientResponseError),
        httpx.RemoteProtocolError,
    ),
    ((aiohttp.ClientConnectionError,), httpx.ReadError),
    ((aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError), httpx.UnsupportedProtocol),
)


def as_httpx_error(exc: aiohttp.ClientError, request: httpx.Request) -> httpx.TransportError:
    """The httpx exception that httpx's own transport raises for the same failure."""
    kind = next(
        (kind for sources, kind in ERROR_TABLE if isinstance(exc, sources)), httpx.TransportError
    )
    # aiohttp's message can quote the URL (a presigned query, a request id); only its class
    # name travels on.
    return kind(type(exc).__name__, request=request)


class MappedErrors(httpx.AsyncBaseTransport):
    """A transport whose aiohttp errors come out as httpx's (httpx-aiohttp maps only some)."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self._inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return await self._inner.handle_async_request(request)
        except aiohttp.ClientError as exc:
            raise as_httpx_error(exc, request) from exc

    async def aclose(self) -> None:
        await self._inner.aclose()
