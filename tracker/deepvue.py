"""The Deepvue API edge: authorize, cache the token, ask for a batch's status.

Everything that decides what an answer means lives in `tracker.domain.answers`, and the
rate limiting in `tracker.budget.Throttle` (every call takes a permit from it); this module
only does the HTTP and the token life cycle, and turns each answer into a `StatusAnswer`
(or raises `AuthFailed` when the credentials themselves are refused, and `CallsPaused`
when no call may start for longer than a worker should hold on to a claimed batch).

Secrets: the client secret (also sent as `x-api-key`) and the access token never appear in an
exception message, a log event or a `StatusAnswer`; anything the server echoes is scrubbed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import json
import random
import re
import zlib
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx
import structlog

from tracker import __version__
from tracker.budget import CallsPaused
from tracker.domain.answers import (
    Outcome,
    StatusAnswer,
    classify_status,
    classify_transport_error,
    trim_raw,
)
from tracker.domain.redact import redact, redact_secrets_in_bytes

if TYPE_CHECKING:
    from tracker.budget import Throttle

__all__ = [
    "MAX_ANSWER_BYTES",
    "AuthFailed",
    "DeepvueClient",
    "SubmitFailed",
    "make_api_http_client",
    "make_api_transport",
]

_log = structlog.get_logger(__name__)

AUTHORIZE_PATH = "/v1/authorize"
STATUS_PATH = "/v1/verification/batch-processing-status"
USER_AGENT = f"deepvue-batch-tracker/{__version__}"
UPI_BATCH_PATH = "/v1/verification/upi-basic/batch"

# Deepvue tokens live 24 hours; when the answer gives no usable expiry, assume a bit less.
_DEFAULT_TOKEN_LIFETIME = timedelta(hours=23)
# However soon the server says a token expires, keep it at least this long: a skewed or
# nonsensical expiry must not turn every call into an authorize. If the token really is dead,
# the 401 path re-authorizes once for everybody.
_MIN_TOKEN_USE = timedelta(seconds=60)
# 429 without Retry-After: pause 2, 4, 8 ... seconds for consecutive 429s, capped.
_BACKOFF_BASE = 2.0
_BACKOFF_CAP = 60.0
# Honour Retry-After up to this by default (TRACKER_MAX_RETRY_AFTER): a garbled huge value
# must not silence the service for good.
DEFAULT_MAX_RETRY_AFTER = 3600.0
# Statuses with which /v1/authorize refuses the credentials themselves (documented: 401
# invalid, 400 inactive client; 403 no access; 422 a malformed form, which retrying won't fix).
_AUTHORIZE_REFUSED = frozenset({400, 401, 403, 422})
# What an access token may hold to be sent in a header: visible ASCII.
_HEADER_SAFE = re.compile(r"[\x21-\x7e]+")
# The most of an answer (status, authorize, upload) read, on the wire and once decoded. A
# status answer is a few hundred bytes: a body past this, or a gzip bomb, is refused as a
# transient fault before it can take the daemon's memory or hold up its event loop.
MAX_ANSWER_BYTES = 1 << 20
# Asked for explicitly, so that no client library offers an encoding we do not decode.
_ACCEPT_ENCODING = "gzip, deflate"


class AuthFailed(Exception):
    """Deepvue refused the credentials even after re-authorizing.

    Service-wide, not the fault of any batch: the caller should stop polling and alert rather
    than count it against a batch. The message never contains the secret or a token.
    """


class SubmitFailed(Exception):
    """Deepvue did not accept an uploaded batch file; the message says why."""


@dataclasses.dataclass(frozen=True)
class _Token:
    value: str
    use_until: datetime  # refresh from this moment on (expiry minus the margin)
    generation: int  # which authorize produced it: lets 401s share one re-authorize


class _AuthUnavailable(Exception):
    """Authorize could not be completed for a reason worth retrying later (5xx, timeout)."""

    def __init__(self, answer: StatusAnswer) -> None:
        super().__init__(answer.detail)
        self.answer = answer


class DeepvueClient:
    """Deepvue's batch-status API for one client_id."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        base_url: str,
        client_id: str,
        read_secret: Callable[[], str],
        throttle: Throttle,
        utcnow: Callable[[], datetime] = lambda: datetime.now(UTC),
        refresh_margin: float = 300.0,
        status_transport: httpx.AsyncBaseTransport | None = None,
        max_retry_after: float = DEFAULT_MAX_RETRY_AFTER,
        max_answer_bytes: int = MAX_ANSWER_BYTES,
    ) -> None:
        """`status_transport`, when given, carries the status calls straight to the wire,
        without `http`'s per-request machinery (auth flow, redirect handling, cookies, event
        hooks), a large share of a status call's CPU (bench/engine.py measures it), and the
        status call is the one made thousands of times. Pass the transport `http` itself uses.

        `max_retry_after` (TRACKER_MAX_RETRY_AFTER) is the longest pause a 429's
        Retry-After may impose; a longer one is clamped to it and logged.

        `max_answer_bytes` bounds every answer read, on the wire and decoded (see
        `read_answer`).
        """
        self._http = http
        self._status_transport = status_transport
        self._timeout = http.timeout.as_dict()
        self._base_url = base_url.rstrip("/")
        self._status_url = f"{self._base_url}{STATUS_PATH}?request_id="
        self._client_id = client_id
        self._read_secret = read_secret
        self._throttle = throttle
        self._utcnow = utcnow
        self._refresh_margin = timedelta(seconds=refresh_margin)
        self._auth_lock = asyncio.Lock()
        self._token: _Token | None = None
        # Bumped when an authorize attempt ends, successful or not, so that callers who waited
        # on the lock can tell "somebody already tried" and share that result.
        self._generation = 0
        self._auth_failure: AuthFailed | _AuthUnavailable | None = None
        # The secret last sent, kept only to scrub it from anything the server echoes back.
        self._secret = ""
        self._consecutive_429 = 0
        self._max_retry_after = max_retry_after
        self._max_answer_bytes = max_answer_bytes

    async def aclose(self) -> None:
        """Forget the token. The http client belongs to the caller, who closes it."""
        self._token = None

    async def batch_status(self, request_id: str) -> StatusAnswer:
        """Ask Deepvue how batch `request_id` is doing.

        Returns a classified answer for everything except credentials that stay refused after
        one re-authorize, which raise `AuthFailed`, and a call that may not start for longer
        than the throttle's `longest_wait`, which raises `CallsPaused` (no request was sent,
        nothing counts against the batch).
        """
        # During a known pause, not even an authorize goes out.
        self._throttle.check_paused()
        try:
            token = await self._get_token(rejected=None)
        except _AuthUnavailable as exc:
            return exc.answer

        answer = await self._status_call(request_id, token)
        if answer.outcome is not Outcome.AUTH:
            return await self._after_answer(answer, request_id)

        # Most likely a stale token: re-authorize once (shared with every other caller that
        # got the same refusal), then try once more with the new one.
        try:
            token = await self._get_token(rejected=token)
        except _AuthUnavailable as exc:
            return exc.answer
        answer = await self._status_call(request_id, token)
        if answer.outcome is not Outcome.AUTH:
            return await self._after_answer(answer, request_id)

        # No log here: the caller reports a service-wide failure once per backoff period.
        raise AuthFailed(
            self._scrub(
                f"Deepvue refused the credentials for client_id={self._client_id}: the status "
                f"call answered HTTP {answer.http_status} even after re-authorizing"
                f" ({answer.api_message or 'no detail'})"
            )
        )

    async def submit_upi_batch(self, batch_file: Path, *, webhook_url: str | None = None) -> str:
        """Upload a UPI batch file (`POST /v1/verification/upi-basic/batch`); its request_id.
        With `webhook_url`, Deepvue is asked to call it when the batch is done (sent as the
        `webhook_url` query parameter, as documented; what Deepvue then sends is not).

        Raises SubmitFailed with Deepvue's reason, or AuthFailed if the credentials are
        refused even after re-authorizing. The upload counts against the call budget.
        """
        try:
            token = await self._get_token(rejected=None)
        except _AuthUnavailable as exc:
            raise SubmitFailed(f"could not authorize: {exc.answer.detail}") from None
        response, content = await self._submit_call(batch_file, token, webhook_url)
        if response.status_code in (401, 403):
            try:
                token = await self._get_token(rejected=token)
            except _AuthUnavailable as exc:
                raise SubmitFailed(f"could not authorize: {exc.answer.detail}") from None
            response, content = await self._submit_call(batch_file, token, webhook_url)
            if response.status_code in (401, 403):
                raise AuthFailed(
                    f"Deepvue refused the credentials for client_id={self._client_id}: "
                    f"the upload answered HTTP {response.status_code}"
                )
        text = content.decode("utf-8", errors="replace")
        body = _json_object(self._scrub(text))
        request_id = body.get("request_id") if body else None
        if response.status_code == 200 and body and body.get("code") in (200, 201) and request_id:
            return str(request_id)
        detail = (body or {}).get("detail") or (body or {}).get("message") or text
        raise SubmitFailed(
            f"Deepvue did not accept the batch file (HTTP {response.status_code}): "
            f"{trim_raw(self._scrub(str(detail)), 300)}"
        )

    async def _submit_call(
        self, batch_file: Path, token: _Token, webhook_url: str | None
    ) -> tuple[httpx.Response, bytes]:
        try:
            await self._throttle.acquire()
        except CallsPaused as paused:
            raise SubmitFailed(
                f"Deepvue calls are paused for {paused.seconds:.0f} s more (rate limited); "
                "try again later"
            ) from None
        try:
            with batch_file.open("rb") as upload:
                request = self._http.build_request(
                    "POST",
                    f"{self._base_url}{UPI_BATCH_PATH}",
                    params={} if webhook_url is None else {"webhook_url": webhook_url},
                    files={"batch_file": (batch_file.name, upload, "text/csv")},
                    headers={
                        "Authorization": f"Bearer {token.value}",
                        "x-api-key": self._secret,
                        "Accept-Encoding": _ACCEPT_ENCODING,
                    },
                )
                response = await self._http.send(request, stream=True)
                try:
                    content = await read_answer(response, self._max_answer_bytes)
                finally:
                    await response.aclose()
                return response, content
        except httpx.RequestError as exc:
            raise SubmitFailed(f"upload failed: {self._describe(exc)}") from None
        except AnswerTooLarge as exc:
            raise SubmitFailed(f"Deepvue's answer to the upload was too large: {exc}") from None

    # -- status call ---------------------------------------------------------------------

    async def _status_call(self, request_id: str, token: _Token) -> StatusAnswer:
        await self._throttle.acquire()
        request = httpx.Request(
            "GET",
            self._status_url + quote(request_id, safe=""),
            headers={
                "User-Agent": USER_AGENT,
                "Authorization": f"Bearer {token.value}",
                "x-api-key": self._secret,
                "Accept-Encoding": _ACCEPT_ENCODING,
            },
            extensions={"timeout": self._timeout},
        )
        try:
            response, content = await self._send_status(request)
        except httpx.RequestError as exc:  # timeouts, connection and protocol errors
            return classify_transport_error(self._describe(exc))
        except AnswerTooLarge as exc:
            return StatusAnswer(
                outcome=Outcome.TRANSIENT,
                http_status=exc.http_status,
                detail=f"status answer too large: {exc}",
            )
        answer = classify_status(
            response.status_code,
            self._scrub_bytes(content),
            retry_after=response.headers.get("retry-after"),
            now=self._utcnow(),
        )
        return self._scrub_answer(answer)

    async def _send_status(self, request: httpx.Request) -> tuple[httpx.Response, bytes]:
        """The answer and its body, read with `read_answer`'s limits."""
        if self._status_transport is None:
            response = await self._http.send(request, stream=True)
        else:
            response = await self._status_transport.handle_async_request(request)
        try:
            content = await read_answer(response, self._max_answer_bytes)
        finally:
            await response.aclose()
        return response, content

    async def _after_answer(self, answer: StatusAnswer, request_id: str) -> StatusAnswer:
        """Service-wide bookkeeping of an answer: 429s slow down every call of the process."""
        if answer.outcome is not Outcome.RATE_LIMITED:
            if answer.http_status is not None:
                self._consecutive_429 = 0
            return answer
        pause = await self._rate_limited(answer.retry_after, request_id=request_id)
        if answer.retry_after is not None and pause < answer.retry_after:
            # The batch is rescheduled by the pause actually taken, not the server's figure.
            return dataclasses.replace(answer, retry_after=pause)
        return answer

    async def _rate_limited(self, retry_after: float | None, **context: Any) -> float:
        """Pause every call after a 429; the pause taken, in seconds."""
        self._consecutive_429 += 1
        if retry_after is not None:
            pause = min(retry_after, self._max_retry_after)
            if pause < retry_after:
                _log.warning(
                    "api.retry_after_clamped",
                    retry_after=retry_after,
                    max_retry_after=self._max_retry_after,
                    **context,
                )
        else:
            # Exponential, capped, with jitter so several processes sharing the key do not
            # come back in lock step; at least half the step, so the pause still grows.
            step = min(_BACKOFF_BASE * 2 ** min(self._consecutive_429 - 1, 16), _BACKOFF_CAP)
            pause = step / 2 + random.uniform(0, step / 2)
        await self._throttle.pause(pause)
        _log.warning(
            "api.rate_limited",
            pause_seconds=round(pause, 3),
            retry_after=retry_after,
            consecutive=self._consecutive_429,
            **context,
        )
        return pause

    # -- token ---------------------------------------------------------------------------

    def _fresh_token(self) -> _Token | None:
        token = self._token
        if token is not None and self._utcnow() < token.use_until:
            return token
        return None

    async def _get_token(self, *, rejected: _Token | None) -> _Token:
        """A usable token; `rejected` is one the server just refused.

        Only one authorize runs at a time. A caller that waited for the lock while someone
        else authorized takes that result (new token, or the same failure) instead of
        authorizing again: 20 concurrent 401s cause one authorize, not 20.
        """
        if rejected is None:
            token = self._fresh_token()
            if token is not None:
                return token
            seen = self._generation
        else:
            seen = rejected.generation
        async with self._auth_lock:
            if self._generation != seen:
                token = self._fresh_token()
                if token is not None:
                    return token
                failure = self._auth_failure
                if isinstance(failure, AuthFailed):
                    raise AuthFailed(*failure.args)
                if isinstance(failure, _AuthUnavailable):
                    raise _AuthUnavailable(failure.answer)
            return await self._authorize()

    async def _authorize(self) -> _Token:
        """POST /v1/authorize; the caller holds the auth lock.

        The generation moves only once the attempt is over: a caller arriving meanwhile
        remembers the old generation, waits for the lock, and then sees that an attempt
        finished and shares its result instead of starting another.
        """
        try:
            token = await self._request_token(generation=self._generation + 1)
        except (AuthFailed, _AuthUnavailable) as exc:
            self._generation += 1
            self._token = None
            self._auth_failure = exc
            raise
        self._generation = token.generation
        self._token = token
        self._auth_failure = None
        return token

    async def _request_token(self, *, generation: int) -> _Token:
        secret = self._load_secret()
        request = self._http.build_request(
            "POST",
            f"{self._base_url}{AUTHORIZE_PATH}",
            data={"client_id": self._client_id, "client_secret": secret},
            headers={"Accept-Encoding": _ACCEPT_ENCODING},
        )
        try:
            response = await self._http.send(request, stream=True)
            try:
                content = await read_answer(response, self._max_answer_bytes)
            finally:
                await response.aclose()
        except httpx.RequestError as exc:
            raise _AuthUnavailable(
                classify_transport_error(f"authorize: {self._describe(exc)}")
            ) from None
        except AnswerTooLarge as exc:
            raise _AuthUnavailable(
                StatusAnswer(
                    outcome=Outcome.TRANSIENT,
                    http_status=exc.http_status,
                    detail=f"authorize answer too large: {exc}",
                )
            ) from None

        status = response.status_code
        raw = content.decode("utf-8", errors="replace")
        if status in _AUTHORIZE_REFUSED:
            raise AuthFailed(
                f"Deepvue refused the credentials for client_id={self._client_id}: "
                f"HTTP {status} {trim_raw(self._scrub(raw), 200)}"
            )
        if status == 429:
            answer = classify_status(
                status,
                self._scrub_bytes(content),
                retry_after=response.headers.get("retry-after"),
                now=self._utcnow(),
            )
            await self._rate_limited(answer.retry_after, stage="authorize")
            raise _AuthUnavailable(self._scrub_answer(answer))

        body = _json_object(raw) if status == 200 else None
        access_token = body.get("access_token") if body is not None else None
        if isinstance(access_token, str) and not _HEADER_SAFE.fullmatch(access_token.strip()):
            # It goes into an Authorization header: one that cannot (non-ASCII, a line
            # break) would fail every status call for as long as the token is cached.
            access_token = None
        if not isinstance(access_token, str) or not access_token.strip():
            # 5xx, an unexpected status, or a 200 without a token: worth retrying later. The
            # raw text is kept only when it holds no token (it holds none if we found none).
            why = "without an access_token" if status == 200 else "unexpectedly"
            raise _AuthUnavailable(
                StatusAnswer(
                    outcome=Outcome.TRANSIENT,
                    http_status=status,
                    detail=trim_raw(f"authorize answered HTTP {status} {why}: {self._scrub(raw)}"),
                )
            )

        access_token = access_token.strip()
        now = self._utcnow()
        expiry = parse_token_expiry(body.get("expiry") if body else None, access_token, now)
        # An expiry at the start of time cannot have a margin taken off; it is past anyway.
        use_until = max(expiry, now) - self._refresh_margin
        use_until = max(use_until, now + _MIN_TOKEN_USE)
        _log.info("api.authorized", client_id=self._client_id, expiry=expiry.isoformat())
        return _Token(value=access_token, use_until=use_until, generation=generation)

    def _load_secret(self) -> str:
        # Read at every authorize: the secret file may have been rotated since the last one.
        try:
            secret = self._read_secret().strip()
        except OSError as exc:
            raise AuthFailed(
                f"could not read the client secret for client_id={self._client_id}: "
                f"{type(exc).__name__}: {exc.strerror or 'unreadable'}"
            ) from None
        if not secret:
            raise AuthFailed(f"the client secret for client_id={self._client_id} is empty")
        self._secret = secret
        return secret

    # -- scrubbing -----------------------------------------------------------------------

    # Scrubbing happens before any trimming, so a cut can never leave half a secret behind.

    def _secrets(self) -> list[str]:
        return [s for s in (self._secret, self._token.value if self._token else "") if s]

    def _scrub(self, text: str) -> str:
        """`redact` with the secret and the token, should the server or httpx echo them back
        (plain, percent-encoded or JSON-escaped), and any JWT, query string or credential."""
        return redact(text, self._secrets())

    def _scrub_bytes(self, content: bytes) -> bytes:
        # Only the known secrets: the body is still to be classified, and a completed
        # answer's output URL is needed with its query string.
        return redact_secrets_in_bytes(content, self._secrets())

    def _scrub_answer(self, answer: StatusAnswer) -> StatusAnswer:
        # A second pass over what classify_status kept (say, a secret that was JSON-escaped
        # in the body and decoded into api_message). The output URL is left alone: it is
        # what the downloader fetches, and only `redact_url` of it is ever shown.
        return dataclasses.replace(
            answer,
            api_message=None if answer.api_message is None else self._scrub(answer.api_message),
            detail=None if answer.detail is None else self._scrub(answer.detail),
        )

    def _describe(self, exc: httpx.RequestError) -> str:
        # httpx messages may quote the URL; trim_raw drops its query string.
        text = self._scrub(str(exc) or "no message")
        return trim_raw(f"{type(exc).__name__}: {text}", 300)


def parse_token_expiry(value: object, access_token: str, now: datetime) -> datetime:
    """When the token expires, read loosely.

    ISO-8601 (with Z, an offset, or naive = UTC) if `value` is one; else the JWT's `exp` claim
    (payload decoded without checking the signature: we only want a hint, and the server is
    the judge); else 23 hours from `now`.
    """
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip())
        except ValueError:
            pass
        else:
            return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)
    exp = _jwt_exp(access_token)
    if exp is not None:
        return exp
    return now + _DEFAULT_TOKEN_LIFETIME


def _jwt_exp(token: str) -> datetime | None:
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1]
    try:
        decoded = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        claims = json.loads(decoded)
    except (ValueError, binascii.Error, RecursionError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    try:
        return datetime.fromtimestamp(exp, UTC)
    except (OverflowError, OSError, ValueError):
        return None


class AnswerTooLarge(Exception):
    """An answer's body is longer than the limit, on the wire or once decoded."""

    def __init__(self, message: str, http_status: int) -> None:
        super().__init__(message)
        self.http_status = http_status


class _Identity:
    def decompress(self, data: bytes, max_length: int) -> bytes:
        return data

    def flush(self) -> bytes:
        return b""


async def read_answer(response: httpx.Response, limit: int) -> bytes:
    """The body of a streamed `response`, decoded as its Content-Encoding says.

    Raises AnswerTooLarge as soon as more than `limit` bytes arrive or decode: the raw
    bytes are read and inflated piece by piece, each piece only up to what is left of
    the limit, so neither a long body nor a gzip bomb is ever held in memory, and the
    work done on the event loop stays bounded by the limit. A body that does not decode
    raises httpx.DecodingError, as httpx would.
    """
    status = response.status_code
    try:
        content = response.content  # read already (httpx.MockTransport reads every answer)
    except httpx.ResponseNotRead:
        pass
    else:
        if len(content) > limit:
            raise AnswerTooLarge(f"HTTP {status} with a body of more than {limit} bytes", status)
        return content
    codings = [c.strip().lower() for c in response.headers.get("Content-Encoding", "").split(",")]
    codings = [c for c in codings if c not in ("", "identity")]
    if len(codings) > 1 or (codings and codings[0] not in ("gzip", "x-gzip", "deflate")):
        raise httpx.DecodingError(
            f"answer in an unsupported Content-Encoding: {', '.join(codings)[:80]}",
            request=_request_of(response),
        )
    coding = codings[0] if codings else None
    decoder: Any = _Identity()
    if coding in ("gzip", "x-gzip"):
        decoder = zlib.decompressobj(zlib.MAX_WBITS | 16)
    elif coding == "deflate":
        decoder = zlib.decompressobj(zlib.MAX_WBITS)
    received = 0
    parts: list[bytes] = []
    size = 0
    first = True
    raw: AsyncIterator[bytes] = response.aiter_raw()
    try:
        async for chunk in raw:
            received += len(chunk)
            if received > limit:
                raise AnswerTooLarge(
                    f"HTTP {status} with a body of more than {limit} bytes", status
                )
            try:
                try:
                    # One more byte than is left: more than that means over the limit.
                    data = decoder.decompress(chunk, limit - size + 1)
                except zlib.error:
                    if not (first and coding == "deflate"):
                        raise
                    # "deflate" without the zlib header, as some servers send it.
                    decoder = zlib.decompressobj(-zlib.MAX_WBITS)
                    data = decoder.decompress(chunk, limit - size + 1)
            except zlib.error as exc:
                raise httpx.DecodingError(
                    f"answer does not decode as {coding}: {exc}", request=_request_of(response)
                ) from None
            first = False
            size += len(data)
            if size > limit:
                raise AnswerTooLarge(
                    f"HTTP {status} with a body that decodes ({coding}) to more than {limit} bytes",
                    status,
                )
            parts.append(data)
        tail = decoder.flush()
    finally:
        await response.aclose()
    if size + len(tail) > limit:
        raise AnswerTooLarge(
            f"HTTP {status} with a body that decodes to more than {limit} bytes", status
        )
    parts.append(tail)
    return b"".join(parts)


def _request_of(response: httpx.Response) -> httpx.Request | None:
    try:
        return response.request
    except RuntimeError:  # a bare transport's answer may not carry it
        return None


def _json_object(raw: str) -> dict[str, Any] | None:
    try:
        parsed = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return parsed if isinstance(parsed, dict) else None


def make_api_transport() -> httpx.AsyncBaseTransport:
    """The transport for Deepvue API calls: httpx's API over aiohttp's connection pool.

    Much cheaper per call than httpx's own pool (httpcore), whose per-request cost grows with
    the number of open connections (bench/engine.py's `http client` rows compare them).
    """
    import urllib.request

    import aiohttp
    from httpx_aiohttp import AiohttpTransport

    from tracker.aiohttp_errors import MappedErrors

    # At most 100 connections, more than any sane TRACKER_CONCURRENCY needs; idle ones
    # are kept, so each worker reuses its own.
    def open_session() -> aiohttp.ClientSession:
        # Called on the first request, inside the event loop that uses the session.
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=100, keepalive_timeout=30.0, ssl=transport.ssl_context
            ),
            # httpx keeps no cookies for us either: the API has no use for them.
            cookie_jar=aiohttp.DummyCookieJar(),
            # Honour HTTPS_PROXY / NO_PROXY like httpx does, but only when one is set:
            # aiohttp then looks them (and ~/.netrc) up again for every request.
            trust_env=bool(urllib.request.getproxies_environment()),
        )

    transport = AiohttpTransport(client=open_session)
    # httpx-aiohttp maps connection errors but lets others through as aiohttp's (an answer
    # that is not HTTP), which the client's `except httpx.RequestError` would miss.
    return MappedErrors(transport)


def make_api_http_client(
    timeout: float, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    """The http client for Deepvue API calls (never for downloads: it carries no API
    headers itself, but its requests do, and redirects would forward `x-api-key`).

    It owns `transport` (a new `make_api_transport()` when None) and closes it.
    """
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout),
        # httpx forwards custom headers such as x-api-key across origins on redirect; the
        # status API has no reason to redirect, so a 3xx is classified, never followed.
        follow_redirects=False,
        headers={"User-Agent": USER_AGENT},
        transport=transport or make_api_transport(),
    )
