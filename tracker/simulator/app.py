"""The simulated API's routes and the state behind them: authorize, batch status (by
request_id prefix, see the package docstring), submission, output files, test hooks."""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import random
import time
import uuid
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import quote

from aiohttp import BodyPartReader, web

from tracker.simulator.config import SimulatorConfig
from tracker.simulator.content import CHUNK_SIZE, expected_size, iter_content, s3_etag
from tracker.simulator.ratelimit import RateLimiter
from tracker.simulator.responses import (
    UnframedResponse,
    detail,
    gzip_bomb,
    missing_field,
    now_ms,
    padded_envelope_ends,
    parse_range,
    s3_error,
)
from tracker.simulator.signing import Signer

OUTPUT_DIR: Final = "/upi-basic-batch-output-files/"
# Where every hostile output URL below points: cloud metadata, the classic SSRF target.
METADATA_URL: Final = "http://169.254.169.254/latest/meta-data/"
TRICKLE_CHUNK: Final = 256
# 256 bytes every 0.125 s is about 2 KiB/s.
TRICKLE_PAUSE: Final = 0.125
STALL_AFTER: Final = 1024
STALL_SECONDS: Final = 3600.0
# Files up to this size are hashed for their ETag on the event loop; bigger ones in a thread.
_INLINE_MD5_BYTES: Final = 1024 * 1024


@dataclass
class _IdState:
    first_call: float | None = None
    dispatched: int = 0
    urls_issued: int = 0
    downloads: int = 0


# Downloads are recorded for tests; a benchmark may make millions, so keep only the newest.
_MAX_RECORDED_DOWNLOADS: Final = 10_000


class Simulator:
    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.base_url: str | None = None
        self._signer = Signer(config.client_id)
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
        self._limiter = RateLimiter(limits)
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

    def _auth_error(self, request: web.Request) -> web.Response | None:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        token = token.strip()
        api_key = request.headers.get("x-api-key")
        if scheme.lower() != "bearer" or not token or not api_key:
            return detail(401, "Not authenticated")
        if not self._signer.token_valid(token):
            return detail(403, "Not a valid token")
        if not hmac.compare_digest(
            api_key.encode("utf-8", "replace"), self.config.client_secret.encode()
        ):
            return detail(401, "Could not validate credentials")
        return None

    # ----------------------------------------------------------------------- presigned URLs

    def _signed_url(self, request: web.Request, request_id: str, state: _IdState) -> str:
        ext = "xlsx" if request_id.startswith("xlsx-") else "csv"
        name = f"{request_id}.{ext}"
        expires = max(0, math.ceil(self.config.url_ttl))
        issued = int(time.time())
        state.urls_issued += 1
        if request_id.startswith("expire-") and state.urls_issued == 1:
            issued -= expires + 60
        date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(issued))
        signature = self._signer.url_signature(name, date, str(expires))
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
            return missing_field("body", "client_id")
        values: dict[str, str] = {}
        for name in ("client_id", "client_secret"):
            value = form.get(name)
            if isinstance(value, web.FileField):
                value = value.file.read().decode("utf-8", "replace")
            if not isinstance(value, str):
                return missing_field("body", name)
            values[name] = value
        good_id = hmac.compare_digest(values["client_id"].encode(), self.config.client_id.encode())
        good_secret = hmac.compare_digest(
            values["client_secret"].encode(), self.config.client_secret.encode()
        )
        if not (good_id and good_secret):
            return detail(401, "Invalid client_id or client_secret, access Denied")
        expires_at = int(time.time() + self.config.token_ttl)
        return web.json_response(
            {
                "access_token": self._signer.make_token(values["client_id"], expires_at),
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
            return missing_field("query", "request_id")
        self.status_calls_total += 1
        self.status_calls[request_id] = self.status_calls.get(request_id, 0) + 1
        if overlapping:
            self.overlapping_status_calls += 1
            self.overlapping_by_id[request_id] = self.overlapping_by_id.get(request_id, 0) + 1
        if self.status_calls_total <= cfg.throttle_first:
            self.rate_limited += 1
            return detail(
                429,
                "Rate limit exceeded. Please retry after some time.",
                headers={"Retry-After": cfg.throttle_retry_after},
            )
        if self._limiter.enabled and not self._limiter.allow(
            request.headers["x-api-key"], time.monotonic()
        ):
            self.rate_limited += 1
            return detail(429, "Rate limit exceeded. Please retry after some time.")
        if cfg.error_rate > 0 and self._rng.random() < cfg.error_rate:
            self.errors_served += 1
            return detail(503, "Source Unavailable")
        if request_id.startswith(("huge-", "gzipbomb-")):
            self._state(request_id).dispatched += 1
            self.errors_served += 1
            return await self._oversized_answer(request, request_id)
        return self._status_by_prefix(request, request_id)

    async def _oversized_answer(self, request: web.Request, request_id: str) -> web.StreamResponse:
        """``huge-``: a padded envelope streamed in full; ``gzipbomb-``: its gzip bomb."""
        if request_id.startswith("gzipbomb-"):
            loop = asyncio.get_running_loop()
            bomb = await loop.run_in_executor(None, gzip_bomb, self.config.gzip_bomb_size)
            return web.Response(
                body=bomb,
                headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
            )
        head, tail = padded_envelope_ends()
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
            return detail(400, "Invalid request_id")
        if request_id.startswith("missing-"):
            return detail(404, "request_id not found")
        if request_id.startswith("ratelimit-"):
            self.rate_limited += 1
            return detail(
                429,
                "Rate limit exceeded. Please retry after some time.",
                headers={"Retry-After": "1"},
            )
        if request_id.startswith("flaky-") and state.dispatched % 2 == 1:
            self.errors_served += 1
            return detail(503, "Source Unavailable")
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
                "timestamp": now_ms(),
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
            return missing_field("body", "batch_file")
        self.submissions += 1
        return web.json_response(
            {
                "code": 201,
                "timestamp": now_ms(),
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
            self.redirects_served += 1
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
                if self.stopping.is_set():
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


SIMULATOR_KEY: Final = web.AppKey("deepvue_simulator", Simulator)


def build_app(config: SimulatorConfig) -> web.Application:
    simulator = Simulator(config)
    app = web.Application()
    app[SIMULATOR_KEY] = simulator

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
