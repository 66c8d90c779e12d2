"""Logging: one JSON object per line for every source, and no secret on any line."""

from __future__ import annotations

import io
import json
import logging

import structlog

from tracker.logs import configure_logging

PRESIGNED = (
    "https://bucket.s3.amazonaws.com/out/a.csv?X-Amz-Signature=deadbeef&X-Amz-Credential=AKIA"
)
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJkZW1vIiwiZXhwIjoxfQ.c2lnbmF0dXJl"


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_from_structlog_and_stdlib() -> None:
    stream = io.StringIO()
    configure_logging("json", "INFO", stream=stream)
    structlog.get_logger("tracker.test").info(
        "batch.transition", request_id="abc", to_state="ready"
    )
    logging.getLogger("alembic.runtime.migration").info("Running upgrade %s -> %s", "x", "y")
    lines = _lines(stream)
    assert lines[0]["event"] == "batch.transition" and lines[0]["to_state"] == "ready"
    assert lines[0]["level"] == "info" and "timestamp" in lines[0]
    assert lines[1]["event"] == "Running upgrade x -> y"
    assert lines[1]["logger"] == "alembic.runtime.migration"


def test_secrets_are_scrubbed_everywhere() -> None:
    stream = io.StringIO()
    scrubber = configure_logging("json", "DEBUG", stream=stream)
    scrubber.add("client-secret-123")
    log = structlog.get_logger("tracker.test")
    log.info("download.start", url=PRESIGNED, note="token " + JWT)
    logging.getLogger("httpx").info('HTTP Request: GET %s "HTTP/1.1 200 OK"', PRESIGNED)
    try:
        raise RuntimeError("auth with client-secret-123 failed")
    except RuntimeError:
        log.exception("api.error")
    text = stream.getvalue()
    for secret in ("deadbeef", "AKIA", JWT, "client-secret-123"):
        assert secret not in text
    lines = _lines(stream)
    assert lines[0]["url"] == "https://bucket.s3.amazonaws.com/out/a.csv?<redacted>"
    assert "<redacted>" in str(lines[2]["exception"])
    assert len(lines) == 3


def test_httpx_request_lines_are_quiet_at_info() -> None:
    stream = io.StringIO()
    configure_logging("json", "INFO", stream=stream)
    logging.getLogger("httpx").info("HTTP Request: GET %s", PRESIGNED)
    assert stream.getvalue() == ""


def test_json_escaped_presigned_url_is_scrubbed() -> None:
    # A raw answer body quoted in a log value keeps JSON's escaped slashes: the scrubber must
    # still see the URL and drop its query string (issue 10, item 6).
    stream = io.StringIO()
    configure_logging("json", "INFO", stream=stream)
    escaped = json.dumps({"batch_output_file_url": PRESIGNED}).replace("/", "\\/")
    structlog.get_logger("tracker.test").warning("api.unexpected_answer", raw=escaped)
    logging.getLogger("tracker.lib").warning("body: %s", escaped)
    text = stream.getvalue()
    assert "deadbeef" not in text
    assert "AKIA" not in text
    assert len(_lines(stream)) == 2
