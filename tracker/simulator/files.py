"""The simulated S3 bucket holding the output files: presigned GETs, ETags, Range, and
the hostile ways a file can arrive (cut, unframed, endless, trickled, stalled, redirected)."""

from __future__ import annotations

import asyncio
import hmac
import time
from datetime import UTC, datetime
from typing import Any, Final

from aiohttp import web

from tracker.simulator.api import METADATA_URL
from tracker.simulator.config import SimulatorConfig
from tracker.simulator.content import expected_size, iter_content, s3_etag
from tracker.simulator.responses import UnframedResponse, parse_range, s3_error
from tracker.simulator.signing import Signer
from tracker.simulator.state import SimulatorState

TRICKLE_CHUNK: Final = 256
# 256 bytes every 0.125 s is about 2 KiB/s.
TRICKLE_PAUSE: Final = 0.125
STALL_AFTER: Final = 1024
STALL_SECONDS: Final = 3600.0
# Files up to this size are hashed for their ETag on the event loop; bigger ones in a thread.
_INLINE_MD5_BYTES: Final = 1024 * 1024


class FileHost:
    """The handler of presigned output file GETs, as S3 answers them."""

    def __init__(
        self,
        config: SimulatorConfig,
        state: SimulatorState,
        signer: Signer,
        stopping: asyncio.Event,
    ) -> None:
        self.config = config
        self._state = state
        self._signer = signer
        self._stopping = stopping

    async def download(self, request: web.Request) -> web.StreamResponse:
        record: dict[str, Any] = {
            "method": request.method,
            "path": request.path,
            "headers": {key.lower(): value for key, value in request.headers.items()},
            "status": 0,
        }
        self._state.downloads.append(record)
        response = await self._serve_file(request, record)
        return response

    def _check_presigned(self, request: web.Request, name: str) -> web.Response | None:
        query = request.query
        date = query.get("X-Amz-Date", "")
        expires = query.get("X-Amz-Expires", "")
        signature = query.get("X-Amz-Signature", "")
        expected = self._signer.url_signature(name, date, expires)
        if not hmac.compare_digest(expected.encode(), signature.encode("utf-8", "replace")):
            return s3_error(403, "SignatureDoesNotMatch", "Signature does not match")
        issued = datetime.strptime(date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()
        if time.time() >= issued + int(expires):
            return s3_error(403, "AccessDenied", "Request has expired")
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
            return s3_error(404, "NoSuchKey", "The specified key does not exist.")
        if request_id.startswith("badurl-redirect-"):
            self._state.redirects_served += 1
            record["status"] = 302
            record["location"] = METADATA_URL
            return web.Response(status=302, headers={"Location": METADATA_URL})

        size = expected_size(request_id, self.config)
        if size <= _INLINE_MD5_BYTES:
            etag = s3_etag(request_id, size)  # microseconds, and cached
        else:
            # Hashed once per file (cached), in a thread: up to 64 MiB of MD5.
            etag = await asyncio.get_running_loop().run_in_executor(None, s3_etag, request_id, size)
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
            parsed = parse_range(range_header, size)
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
            state = self._state.of(request_id)
            state.downloads += 1
            if request_id.startswith("trunc-") and state.downloads == 1:
                cut = length // 2
        unframed = request_id.startswith("unframed-") and status == 200
        if unframed and request.method == "GET" and length > 1 and self._state.rng.random() < 0.5:
            cut = self._state.rng.randrange(1, length)

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
            response = UnframedResponse(status=status, headers=headers)
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
            for chunk in iter_content(request_id, stop, first):
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
            for chunk in iter_content(request_id, 1 << 62):
                if self._stopping.is_set():
                    break
                await response.write(chunk)
        except ConnectionError:
            return

    async def _trickle(
        self, response: web.StreamResponse, request_id: str, first: int, stop: int
    ) -> None:
        pending = b"".join(iter_content(request_id, stop, first))
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
        head = b"".join(iter_content(request_id, min(stop, first + STALL_AFTER), first))
        await response.write(head)
        deadline = time.monotonic() + STALL_SECONDS
        # Poll for a gone client too: aiohttp does not cancel handlers on disconnect, and a
        # long-running fake-api must not pile up hour-long stalled handlers.
        while not self._stopping.is_set() and time.monotonic() < deadline:
            transport = request.transport
            if transport is None or transport.is_closing():
                return
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=0.5)
            except TimeoutError:
                continue
        # Never complete the body: the client sees a short read against Content-Length.
        if request.transport is not None:
            request.transport.close()
