"""The simulated Deepvue API: authorize, batch status (by request_id prefix, see
docs/simulator.md) and batch submission."""

from __future__ import annotations

import asyncio
import hmac
import math
import random
import time
import uuid
from datetime import UTC, datetime
from typing import Final
from urllib.parse import quote

from aiohttp import BodyPartReader, web

from tracker.simulator.config import SimulatorConfig
from tracker.simulator.content import CHUNK_SIZE
from tracker.simulator.responses import (
    detail,
    gzip_bomb,
    missing_field,
    not_http,
    now_ms,
    padded_envelope_ends,
)
from tracker.simulator.signing import Signer
from tracker.simulator.state import IdState, SimulatorState
from tracker.simulator.webhooks import NotLoopback, WebhookSender

OUTPUT_DIR: Final = "/upi-basic-batch-output-files/"
# Where every hostile output URL below points: cloud metadata, the classic SSRF target.
METADATA_URL: Final = "http://169.254.169.254/latest/meta-data/"


class DeepvueApi:
    """The handlers of the Deepvue endpoints."""

    def __init__(
        self,
        config: SimulatorConfig,
        state: SimulatorState,
        signer: Signer,
        stopping: asyncio.Event,
        webhooks: WebhookSender,
    ) -> None:
        self.config = config
        # Set once the server is bound: the host the output URLs point at.
        self.base_url: str | None = None
        self._state = state
        self._signer = signer
        self._stopping = stopping
        self._webhooks = webhooks
        # Separate stream so submissions never shift the error_rate sequence for a seed.
        self._id_rng = random.Random(f"{config.seed}:request-ids")

    def _base_url(self, request: web.Request) -> str:
        if self.base_url is not None:
            return self.base_url
        return f"{request.scheme}://{request.host}"

    def auth_error(self, request: web.Request) -> web.Response | None:
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

    def _signed_url(self, request: web.Request, request_id: str, state: IdState) -> str:
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

    async def authorize(self, request: web.Request) -> web.StreamResponse:
        self._state.authorize_calls += 1
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
        generation = self._state.generation
        in_flight = self._state.in_flight
        overlapping = in_flight.get(request_id, 0) > 0
        in_flight[request_id] = in_flight.get(request_id, 0) + 1
        try:
            return await self._status(request, request_id, overlapping=overlapping)
        finally:
            if generation == self._state.generation:
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
        error = self.auth_error(request)
        if error is not None:
            return error
        if request_id is None:
            return missing_field("query", "request_id")
        self._state.status_calls_total += 1
        self._state.status_calls[request_id] = self._state.status_calls.get(request_id, 0) + 1
        if overlapping:
            self._state.overlapping_status_calls += 1
            self._state.overlapping_by_id[request_id] = (
                self._state.overlapping_by_id.get(request_id, 0) + 1
            )
        if self._state.status_calls_total <= cfg.throttle_first:
            self._state.rate_limited += 1
            return detail(
                429,
                "Rate limit exceeded. Please retry after some time.",
                headers={"Retry-After": cfg.throttle_retry_after},
            )
        if self._state.limiter.enabled and not self._state.limiter.allow(
            request.headers["x-api-key"], time.monotonic()
        ):
            self._state.rate_limited += 1
            return detail(429, "Rate limit exceeded. Please retry after some time.")
        if cfg.error_rate > 0 and self._state.rng.random() < cfg.error_rate:
            self._state.errors_served += 1
            return detail(503, "Source Unavailable")
        if request_id.startswith("nothttp-") and self._state.of(request_id).dispatched < 2:
            self._state.of(request_id).dispatched += 1
            self._state.errors_served += 1
            return not_http(request)
        if request_id.startswith(("huge-", "gzipbomb-")):
            self._state.of(request_id).dispatched += 1
            self._state.errors_served += 1
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
            while left > 0 and not self._stopping.is_set():
                await response.write(block[: min(left, CHUNK_SIZE)])
                left -= CHUNK_SIZE
            await response.write(tail)
            await response.write_eof()
        except ConnectionError:
            pass  # the client stopped reading, as it should
        return response

    def _status_by_prefix(self, request: web.Request, request_id: str) -> web.Response:
        now = time.monotonic()
        state = self._state.of(request_id)
        delay = self.config.completion_delay * (5 if request_id.startswith("slow-") else 1)
        if state.first_call is None:
            state.first_call = now
            self._webhooks.batch_started(request_id, delay, failed=request_id.startswith("fail-"))
        state.dispatched += 1
        if request_id.startswith("invalid-"):
            return detail(400, "Invalid request_id")
        if request_id.startswith("missing-"):
            return detail(404, "request_id not found")
        if request_id.startswith("ratelimit-"):
            self._state.rate_limited += 1
            return detail(
                429,
                "Rate limit exceeded. Please retry after some time.",
                headers={"Retry-After": "1"},
            )
        if request_id.startswith("flaky-") and state.dispatched % 2 == 1:
            self._state.errors_served += 1
            return detail(503, "Source Unavailable")
        if request_id.startswith("garbage-") and state.dispatched <= 2:
            self._state.errors_served += 1
            return web.Response(text="<html>upstream gateway</html>", content_type="text/html")

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
        error = self.auth_error(request)
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
        request_id = f"{self._id_rng.getrandbits(128):032x}"
        # As documented for Deepvue, the webhook URL is a query parameter.
        webhook_url = request.query.get("webhook_url")
        if webhook_url is not None:
            try:
                self._webhooks.register(webhook_url, request_id)
            except NotLoopback as exc:
                return detail(422, f"webhook_url refused by the simulator: {exc}")
        self._state.submissions += 1
        return web.json_response(
            {
                "code": 201,
                "timestamp": now_ms(),
                "transaction_id": uuid.uuid4().hex,
                "request_id": request_id,
                "message": "batch processing in progress",
                "sub_code": "SUCCESS",
                "output_batch_file": "",
            }
        )
