"""The webhook listener: a delivery brings the checks of the batches it names forward.

A delivery is only a hint (see tracker.domain.hints); the status call still decides. The
secret is the last path segment, compared in constant time; a wrong one costs a 404 and
nothing else. The path is never logged as received (it holds the secret), and the body
only as a trimmed, redacted preview. Run it without aiohttp's access log, which would log
the path.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from tracker.domain.hints import body_preview, request_ids_in

__all__ = ["OUTCOMES", "WEBHOOK_PATH", "webhook_app"]

WEBHOOK_PATH = "/webhook/{secret}"
# The outcomes `on_outcome` hears, one per delivery.
OUTCOMES = ("matched", "unmatched", "refused", "too_large", "failed")
_SHOWN_PATH = "/webhook/<redacted>"

_log = structlog.get_logger(__name__)

BringForward = Callable[[set[str]], Awaitable[set[str]]]


class _Sampled:
    """At most one log line per `interval` seconds for a kind of delivery, carrying how
    many there were since the last line: a flood must not become a flood of log lines
    (the metric still counts every one)."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._last_line: float | None = None
        self._unlogged = 0

    def due(self) -> int | None:
        """None to stay silent, else how many deliveries this line speaks for."""
        self._unlogged += 1
        now = time.monotonic()
        if self._last_line is not None and now - self._last_line < self._interval:
            return None
        self._last_line = now
        count, self._unlogged = self._unlogged, 0
        return count


def webhook_app(
    secret: str,
    *,
    bring_forward: BringForward,
    max_body: int,
    on_outcome: Callable[[str], None] | None = None,
    refusal_log_interval: float = 60.0,
    unmatched_log_interval: float = 1.0,
) -> web.Application:
    """An application answering `POST` (and `GET`, query string only) on /webhook/<secret>.

    `bring_forward` gets the candidate request_ids and returns those whose check it moved;
    the answer is 200 `{"matched": n}` whatever the body held, 413 above `max_body` bytes,
    503 when `bring_forward` failed (the sender may retry), 404 for a wrong secret.

    Every delivery that moved a check is logged. Refused ones are logged at most once per
    `refusal_log_interval` seconds and unmatched ones (their preview shows what Deepvue
    sends) at most once per `unmatched_log_interval`, each line with the count since the
    last.
    """
    if not secret:
        raise ValueError("the webhook secret must not be empty")
    if max_body < 0:
        raise ValueError("max_body must be >= 0")
    expected = secret.encode("utf-8")
    refusals = _Sampled(refusal_log_interval)
    unmatched = _Sampled(unmatched_log_interval)

    def outcome(name: str) -> None:
        if on_outcome is not None:
            on_outcome(name)

    async def deliver(request: web.Request) -> web.Response:
        given = request.match_info.get("secret", "").encode("utf-8", errors="surrogateescape")
        if not hmac.compare_digest(given, expected):
            outcome("refused")
            count = refusals.due()
            if count is not None:
                _log.info(
                    "webhook.refused",
                    path=_SHOWN_PATH,
                    method=request.method,
                    refused=count,
                    detail="wrong or missing secret; at most one such line per "
                    f"{refusal_log_interval:g} s",
                )
            raise web.HTTPNotFound()
        if request.method not in ("POST", "GET"):
            raise web.HTTPMethodNotAllowed(request.method, ["POST", "GET"])
        body = b""
        if request.method == "POST":
            read = await _read_capped(request, max_body)
            if read is None:
                outcome("too_large")
                _log.warning(
                    "webhook.too_large",
                    path=_SHOWN_PATH,
                    content_length=request.content_length,
                    max_body=max_body,
                )
                raise web.HTTPRequestEntityTooLarge(
                    max_size=max_body, actual_size=request.content_length or max_body + 1
                )
            body = read
        # The header as sent: aiohttp's own content_type defaults to application/octet-stream.
        content_type = request.headers.get("Content-Type")
        candidates = request_ids_in(content_type, body, request.query_string)
        try:
            moved = await bring_forward(candidates) if candidates else set()
        except Exception as error:  # the database is away: say so, the sender may retry
            outcome("failed")
            _log.error("webhook.failed", path=_SHOWN_PATH, error=type(error).__name__)
            raise web.HTTPServiceUnavailable() from None
        name = "matched" if moved else "unmatched"
        outcome(name)
        count = 1 if moved else unmatched.due()
        if count is None:
            return web.json_response({"matched": 0})
        _log.info(
            "webhook.delivery",
            outcome=name,
            deliveries=count,
            path=_SHOWN_PATH,
            method=request.method,
            content_type=content_type,
            size=len(body),
            candidates=len(candidates),
            matched=sorted(moved),
            preview=body_preview(body, secrets=(secret,)),
        )
        return web.json_response({"matched": len(moved)})

    # No lingering: a body left unread (a wrong secret, a body over the cap) is not drained
    # for seconds after the answer; the connection closes instead.
    app = web.Application(handler_args={"lingering_time": 0})
    app.router.add_route("*", WEBHOOK_PATH, deliver)
    return app


async def _read_capped(request: web.Request, max_body: int) -> bytes | None:
    """The body, or None as soon as it is known to exceed `max_body` bytes."""
    if request.content_length is not None and request.content_length > max_body:
        return None
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.readany():
        size += len(chunk)
        if size > max_body:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
