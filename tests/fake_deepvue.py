"""One fake Deepvue (and its file host) at the httpx seam, for the in-process tests.

Served through `httpx.MockTransport`: `transport()` fits the API's http client, its status
transport (`DeepvueClient(status_transport=...)`) and the downloader's client alike, and
answers by host and path:

- POST /v1/authorize: numbered tokens (token-1, token-2, ...), each replacing the last;
- GET /v1/verification/batch-processing-status: only the current token is accepted; the
  answer is the next one scripted for the request id (`script`), else `status_override`,
  else `default_status(request_id)`;
- POST /v1/verification/upi-basic/batch: an upload, answered by `submit_override` or
  with a new request id; the `webhook_url` query parameter of each is kept in
  `submitted_webhook_urls` (None when absent);
- GET https://FILES_HOST/out/<request_id>.csv: a small file, held back while
  `held[request_id]` is unset.

Every request is recorded (`requests`, and per endpoint below). `open_clients` gives the
API client and the downloader, both over the fake, as the daemon wires them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx

from tracker.budget import Throttle
from tracker.deepvue import DeepvueClient
from tracker.download import Downloader

API_BASE = "https://deepvue.test"
FILES_HOST = "files.test"
AUTHORIZE_PATH = "/v1/authorize"
STATUS_PATH = "/v1/verification/batch-processing-status"
SUBMIT_PATH = "/v1/verification/upi-basic/batch"
CLIENT_SECRET = "client-secret-for-tests"

Handler = Callable[[httpx.Request], httpx.Response]


def file_url(request_id: str) -> str:
    return f"https://{FILES_HOST}/out/{request_id}.csv"


def status_envelope(data: dict[str, Any]) -> dict[str, Any]:
    return {
        "transaction_id": "t",
        "timestamp": 1,
        "code": 200,
        "message": "Batch Upload status fetched successfully",
        "sub_code": "SUCCESS",
        "data": data,
    }


def completed(request_id: str, url: str | None = None) -> httpx.Response:
    """The batch is done; its output file is at `url` (by default on the fake file host)."""
    return httpx.Response(
        200,
        json=status_envelope(
            {
                "request_id": request_id,
                "status": 200,
                "message": "batch processing completed",
                "batch_output_file_url": url or file_url(request_id),
            }
        ),
    )


def in_progress(request_id: str) -> httpx.Response:
    return httpx.Response(
        200,
        json=status_envelope(
            {
                "request_id": request_id,
                "status": 201,
                "message": "batch processing in progress",
                "batch_output_file_url": None,
            }
        ),
    )


def invalid(request_id: str) -> httpx.Response:
    return httpx.Response(400, json={"detail": "Invalid request_id"})


def rate_limited(retry_after: str | None = None) -> httpx.Response:
    headers = {} if retry_after is None else {"Retry-After": retry_after}
    return httpx.Response(429, json={"detail": "Rate limit exceeded."}, headers=headers)


def by_prefix(request_id: str) -> httpx.Response:
    """done-* is complete (its file on the fake host), invalid-* refused, the rest running."""
    if request_id.startswith("done-"):
        return completed(request_id)
    if request_id.startswith("invalid-"):
        return invalid(request_id)
    return in_progress(request_id)


def _fresh(response: httpx.Response) -> httpx.Response:
    """A copy: one scripted answer may be served more than once."""
    return httpx.Response(response.status_code, headers=response.headers, content=response.content)


class FakeDeepvue:
    """Deepvue's endpoints and a file host, faked; see the module docstring."""

    def __init__(
        self,
        *,
        default_status: Callable[[str], httpx.Response] = by_prefix,
        expiry: Any = "2099-01-01T00:00:00Z",
    ) -> None:
        self.default_status = default_status
        self.expiry = expiry
        self.requests: list[httpx.Request] = []
        self.authorize_forms: list[dict[str, list[str]]] = []
        self.status_requests: list[httpx.Request] = []
        self.uploads: list[httpx.Request] = []
        self.submitted_webhook_urls: list[str | None] = []
        self.file_requests: list[str] = []
        # The tokens the status and upload endpoints accept (the newest one issued).
        self.valid: set[str] = set()
        self.reject_all_tokens = False
        self.authorize_override: Handler | None = None
        self.status_override: Handler | None = None
        self.submit_override: Handler | None = None
        # Answers per request id, served in turn, the last one again and again.
        self.scripts: dict[str, list[httpx.Response]] = {}
        # Seconds each API answer takes (file downloads are held with `held` instead).
        self.latency = 0.0
        # Status calls being answered now, and the most at any one time.
        self.status_in_flight = 0
        self.most_status_in_flight = 0
        self.held: dict[str, asyncio.Event] = {}

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def script(self, request_id: str, *answers: httpx.Response) -> None:
        self.scripts[request_id] = list(answers)

    @property
    def authorizations(self) -> int:
        return len(self.authorize_forms)

    @property
    def status_calls(self) -> list[str]:
        """The request ids asked about, in order."""
        return [r.url.params["request_id"] for r in self.status_requests]

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.host == FILES_HOST:
            return await self._file(request)
        path = request.url.path
        if path == STATUS_PATH:
            self.status_in_flight += 1
            self.most_status_in_flight = max(self.most_status_in_flight, self.status_in_flight)
        try:
            # Let concurrent calls interleave, as real I/O would.
            await asyncio.sleep(self.latency)
        finally:
            if path == STATUS_PATH:
                self.status_in_flight -= 1
        if path == AUTHORIZE_PATH:
            return self._authorize(request)
        if path == STATUS_PATH:
            return self._status(request)
        assert path == SUBMIT_PATH, f"the fake Deepvue has no {request.method} {path}"
        return self._submit(request)

    def _authorize(self, request: httpx.Request) -> httpx.Response:
        assert request.method == "POST"
        self.authorize_forms.append(parse_qs(request.content.decode()))
        if self.authorize_override is not None:
            return self.authorize_override(request)
        token = f"token-{len(self.authorize_forms)}"
        self.valid = {token}
        return httpx.Response(
            200, json={"access_token": token, "token_type": "bearer", "expiry": self.expiry}
        )

    def _token_refused(self, request: httpx.Request) -> httpx.Response | None:
        bearer = request.headers.get("authorization", "").removeprefix("Bearer ")
        if self.reject_all_tokens or bearer not in self.valid:
            return httpx.Response(401, json={"detail": "Could not validate credentials"})
        return None

    def _status(self, request: httpx.Request) -> httpx.Response:
        assert request.method == "GET"
        self.status_requests.append(request)
        refused = self._token_refused(request)
        if refused is not None:
            return refused
        request_id = request.url.params["request_id"]
        scripted = self.scripts.get(request_id)
        if scripted:
            return _fresh(scripted.pop(0) if len(scripted) > 1 else scripted[0])
        if self.status_override is not None:
            return self.status_override(request)
        return self.default_status(request_id)

    def _submit(self, request: httpx.Request) -> httpx.Response:
        assert request.method == "POST"
        self.uploads.append(request)
        self.submitted_webhook_urls.append(request.url.params.get("webhook_url"))
        refused = self._token_refused(request)
        if refused is not None:
            return refused
        if self.submit_override is not None:
            return self.submit_override(request)
        return httpx.Response(
            200,
            json={
                "code": 201,
                "request_id": f"submitted-{len(self.uploads)}",
                "message": "batch processing in progress",
                "sub_code": "SUCCESS",
            },
        )

    async def _file(self, request: httpx.Request) -> httpx.Response:
        request_id = request.url.path.rsplit("/", 1)[-1].removesuffix(".csv")
        self.file_requests.append(request_id)
        held = self.held.get(request_id)
        if held is not None:
            await held.wait()
        # A stream, as a file host's body is: a `content=` response arrives already read.
        # Framed by its length, as S3 sends it: an unframed body is never proof of a file.
        body = f"id,{request_id}\n".encode()
        return httpx.Response(
            200, stream=httpx.ByteStream(body), headers={"Content-Length": str(len(body))}
        )


@asynccontextmanager
async def open_clients(
    fake: FakeDeepvue, throttle: Throttle, output_dir: Path, **client_options: Any
) -> AsyncIterator[tuple[DeepvueClient, Downloader]]:
    """A DeepvueClient (its status calls straight to the transport, as in the daemon) and a
    Downloader for the fake file host, over `fake`; their http clients closed on exit."""
    api_transport = fake.transport()
    async with (
        httpx.AsyncClient(transport=api_transport) as api_http,
        httpx.AsyncClient(transport=fake.transport()) as file_http,
    ):
        client = DeepvueClient(
            api_http,
            base_url=API_BASE,
            client_id="me",
            read_secret=lambda: CLIENT_SECRET,
            throttle=throttle,
            status_transport=api_transport,
            **client_options,
        )
        yield client, Downloader(file_http, output_dir=output_dir, allowed_hosts=[FILES_HOST])
