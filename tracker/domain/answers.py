"""Classifying what Deepvue's batch-status endpoint answered.

Pure: values in, a `StatusAnswer` out, no I/O and no clock of its own. The rules are the
tracker's (see API-NOTES.md, "Classification the tracker applies"), because Deepvue does not
publish what an in-progress, failed or unknown batch looks like. Whatever the server sends, these
functions never raise: an answer nobody foresaw becomes TRANSIENT with the raw text kept (trimmed
and redacted) for audit, so a batch is never lost or crashed over it.
"""

from __future__ import annotations

import email.utils
import json
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from tracker.domain.redact import redact

__all__ = [
    "Outcome",
    "StatusAnswer",
    "classify_status",
    "classify_transport_error",
    "parse_retry_after",
    "trim_raw",
]


class Outcome(StrEnum):
    """What one status call means for the batch."""

    COMPLETED = "completed"  # 200 with a non-empty data.batch_output_file_url
    FAILED = "failed"  # 200, no URL, data.status >= 400 or data.message mentions failure
    PROCESSING = "processing"  # 200, no URL otherwise
    TRANSIENT = "transient"  # 5xx, timeouts, connection errors, odd 200s, unexpected statuses
    AUTH = "auth"  # 401/403 (the client re-authorizes once before calling it service-wide)
    RATE_LIMITED = "rate_limited"  # 429
    INVALID = "invalid"  # 400/404/422: the request_id is not valid for Deepvue


@dataclass(frozen=True)
class StatusAnswer:
    outcome: Outcome
    http_status: int | None  # None when no HTTP answer came (timeout, connection error)
    api_status: int | None = None  # data.status
    api_message: str | None = None  # data.message, or the error body's detail text
    output_url: str | None = None  # only for COMPLETED
    retry_after: float | None = None  # seconds, only when the server said so
    detail: str | None = None  # why + the raw text, trimmed and with URL query strings redacted


# HTTP statuses (and envelope codes) that say "this request_id is not valid for Deepvue".
_INVALID_STATUSES = frozenset({400, 404, 422})
_AUTH_STATUSES = frozenset({401, 403})
_RATE_LIMITED = 429

# A message or string status "mentions failure": matches fail, failed, failure, FAILED...
_FAILURE_WORD = re.compile(r"fail", re.IGNORECASE)


def trim_raw(text: str, limit: int = 500) -> str:
    """Make untrusted text safe to store or log: redact (`tracker.domain.redact`), then trim.

    Redaction runs on the whole text before cutting, so a cut can never expose half of a
    signature that the redaction would have caught.
    """
    redacted = redact(text)
    limit = max(limit, 0)
    if len(redacted) <= limit:
        return redacted
    return f"{redacted[:limit]}...[{len(redacted) - limit} more chars]"


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait per a Retry-After header (delta-seconds or an HTTP-date).

    A date in the past or a negative number means "now" (0). Anything unreadable is None,
    so the caller falls back to its own backoff rather than trusting garbage.
    """
    if value is None:
        return None
    text = value.strip()
    if re.fullmatch(r"-?\d+(?:\.\d+)?", text):
        seconds = float(text)
        return max(seconds, 0.0) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    # RFC 9110 dates are GMT; a naive result (a "-0000" zone) is read as UTC as well.
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    try:
        seconds = (when - now).total_seconds()
    except OverflowError:
        return None
    return max(seconds, 0.0) if math.isfinite(seconds) else None


def classify_transport_error(error_text: str) -> StatusAnswer:
    """No HTTP answer at all (timeout, refused connection, TLS error): always worth retrying."""
    return StatusAnswer(
        outcome=Outcome.TRANSIENT,
        http_status=None,
        detail=trim_raw(f"no HTTP answer: {error_text}"),
    )


def classify_status(
    http_status: int, body: bytes, *, retry_after: str | None, now: datetime
) -> StatusAnswer:
    """Classify one answer of `GET /v1/verification/batch-processing-status`.

    Never raises: even a bug in here must not crash the sweep, so anything unforeseen ends
    up TRANSIENT with the reason in `detail`.
    """
    try:
        return _classify(http_status, body, retry_after=retry_after, now=now)
    except Exception as exc:  # a safety net for a bug here: the batch is retried, not lost
        return StatusAnswer(
            outcome=Outcome.TRANSIENT,
            http_status=http_status if isinstance(http_status, int) else None,
            detail=trim_raw(f"could not classify the answer ({type(exc).__name__}): {body!r}"),
        )


def _classify(
    http_status: int, body: bytes, *, retry_after: str | None, now: datetime
) -> StatusAnswer:
    raw = body.decode("utf-8", errors="replace")
    parsed = _parse_json(raw)
    wait = parse_retry_after(retry_after, now)

    if http_status == 200:
        return _classify_envelope(parsed, raw, wait)
    if http_status in _AUTH_STATUSES:
        return _error_answer(Outcome.AUTH, http_status, parsed, raw, wait, "authentication")
    if http_status == _RATE_LIMITED:
        return _error_answer(Outcome.RATE_LIMITED, http_status, parsed, raw, wait, "rate limited")
    if http_status in _INVALID_STATUSES:
        return _error_answer(
            Outcome.INVALID, http_status, parsed, raw, wait, "request_id not accepted"
        )
    if 500 <= http_status <= 599:
        return _error_answer(Outcome.TRANSIENT, http_status, parsed, raw, wait, "server error")
    # 1xx/3xx (redirects are not followed), other 2xx and 4xx: nothing documented, so retry
    # rather than draw a terminal conclusion from an answer we do not understand.
    return _error_answer(
        Outcome.TRANSIENT, http_status, parsed, raw, wait, f"unexpected HTTP status {http_status}"
    )


def _classify_envelope(parsed: Any, raw: str, wait: float | None) -> StatusAnswer:
    if not isinstance(parsed, dict):
        return _unexpected(200, raw, wait, "200 without a JSON object body")

    code = _as_int(parsed.get("code"))
    data = parsed.get("data")
    data = data if isinstance(data, dict) else None

    if data is not None:
        url = data.get("batch_output_file_url")
        api_status = _as_int(data.get("status"))
        api_message = _readable(data.get("message"))
        if isinstance(url, str) and url.strip():
            # The URL is the one unambiguous signal: whatever else the envelope says, the
            # file exists and the downloader verifies what it gets.
            return StatusAnswer(
                outcome=Outcome.COMPLETED,
                http_status=200,
                api_status=api_status,
                api_message=api_message,
                output_url=url.strip(),
                retry_after=wait,
            )
        if code is not None and 500 <= code <= 599:
            # A server error dressed in a success envelope: do not let a "failed" message in
            # it mark the batch terminally failed; ask again later.
            return _unexpected(200, raw, wait, f"200 with envelope code {code}", api_message)
        raw_status = data.get("status")
        says_failed = (api_status is not None and api_status >= 400) or (
            _mentions_failure(api_message)
            # A textual status such as "FAILED" is as plain a statement as the message.
            or (isinstance(raw_status, str) and _mentions_failure(raw_status))
        )
        if says_failed:
            return StatusAnswer(
                outcome=Outcome.FAILED,
                http_status=200,
                api_status=api_status,
                api_message=api_message,
                retry_after=wait,
                detail=trim_raw(f"remote batch failed: {raw}"),
            )
        return StatusAnswer(
            outcome=Outcome.PROCESSING,
            http_status=200,
            api_status=api_status,
            api_message=api_message,
            retry_after=wait,
        )

    # No `data`: some Deepvue endpoints report business errors in a success-style envelope
    # with `code` != 200. Read that code with the same table as an HTTP status, so a 400/404/422
    # code means the id was refused (INVALID), as does any other 4xx (a client-side error about
    # this request), except 401/403 -> AUTH and 429 -> RATE_LIMITED, which say nothing about the
    # batch. 5xx and anything else (code 200 without data, too) is not the documented envelope:
    # TRANSIENT.
    message = _detail_text(parsed)
    if code in _AUTH_STATUSES:
        return _error_answer(Outcome.AUTH, 200, parsed, raw, wait, f"envelope code {code}")
    if code == _RATE_LIMITED:
        return _error_answer(Outcome.RATE_LIMITED, 200, parsed, raw, wait, "envelope code 429")
    if code is not None and 400 <= code <= 499:
        return StatusAnswer(
            outcome=Outcome.INVALID,
            http_status=200,
            api_status=code,
            api_message=message,
            retry_after=wait,
            detail=trim_raw(f"200 with envelope code {code}: {raw}"),
        )
    why = "200 without a `data` object" if code is None or code < 300 else f"envelope code {code}"
    return _unexpected(200, raw, wait, why, message)


def _error_answer(
    outcome: Outcome,
    http_status: int,
    parsed: Any,
    raw: str,
    wait: float | None,
    why: str,
) -> StatusAnswer:
    """An error answer: the documented body is FastAPI's `{"detail": ...}`, kept readable."""
    return StatusAnswer(
        outcome=outcome,
        http_status=http_status,
        api_message=_detail_text(parsed),
        retry_after=wait,
        detail=trim_raw(f"{why}: {raw}"),
    )


def _unexpected(
    http_status: int, raw: str, wait: float | None, why: str, message: str | None = None
) -> StatusAnswer:
    return StatusAnswer(
        outcome=Outcome.TRANSIENT,
        http_status=http_status,
        api_message=message,
        retry_after=wait,
        detail=trim_raw(f"{why}: {raw}"),
    )


def _parse_json(raw: str) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # not JSON, absurdly nested, or an over-long integer
        return None


def _as_int(value: Any) -> int | None:
    """An integer status or code, tolerating `"200"` and `200.0`; bools are not numbers here."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d{1,6}\s*", value):
        return int(value)
    return None


def _mentions_failure(text: str | None) -> bool:
    return text is not None and _FAILURE_WORD.search(text) is not None


def _detail_text(parsed: Any) -> str | None:
    """The human-readable part of an error body: `detail`, else `message`, else None."""
    if not isinstance(parsed, dict):
        return None
    for key in ("detail", "message", "error"):
        if key in parsed and parsed[key] is not None:
            return _readable(parsed[key])
    return None


def _readable(value: Any) -> str | None:
    """A message as one readable line; FastAPI 422 lists become `loc: msg; loc: msg`."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value
    elif isinstance(value, list):
        text = "; ".join(_validation_item(item) for item in value)
    else:
        text = _compact_json(value)
    return trim_raw(text)


def _validation_item(item: Any) -> str:
    if isinstance(item, dict) and "msg" in item:
        loc = item.get("loc")
        where = ".".join(str(part) for part in loc) if isinstance(loc, list) else None
        msg = str(item["msg"])
        return f"{where}: {msg}" if where else msg
    return item if isinstance(item, str) else _compact_json(item)


def _compact_json(value: Any) -> str:
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        return repr(value)
