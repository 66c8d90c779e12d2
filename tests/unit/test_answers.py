"""The classification table of API-NOTES.md, row by row, plus fuzzing: it never raises."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tracker.domain.answers import (
    Outcome,
    StatusAnswer,
    classify_status,
    classify_transport_error,
    parse_retry_after,
    trim_raw,
)

NOW = datetime(2026, 3, 7, 12, 0, 0, tzinfo=UTC)
OUTPUT_URL = (
    "https://bulk-data-processing.s3.ap-south-1.amazonaws.com/"
    "upi-basic-batch-output-files/06d0d7c340ed460d96103aaa0b26f0de.csv"
)


def envelope(data: Any, *, code: int = 200, **extra: Any) -> bytes:
    body = {
        "transaction_id": "51cd8b6ab36d46a98afb2f01e856e89a",
        "timestamp": 1732088933797,
        "code": code,
        "message": "Batch Upload status fetched successfully",
        "sub_code": "SUCCESS",
        "data": data,
        **extra,
    }
    return json.dumps(body).encode()


def data(**fields: Any) -> dict[str, Any]:
    return {"request_id": "06d0d7c340ed460d96103aaa0b26f0de", "product_id": "", **fields}


def classify(status: int, body: bytes, retry_after: str | None = None) -> StatusAnswer:
    return classify_status(status, body, retry_after=retry_after, now=NOW)


# -- 200 with the documented envelope -------------------------------------------------------


def test_documented_completed_answer() -> None:
    body = envelope(
        data(status=200, message="batch processing completed", batch_output_file_url=OUTPUT_URL)
    )
    answer = classify(200, body)
    assert answer.outcome is Outcome.COMPLETED
    assert answer.output_url == OUTPUT_URL
    assert answer.http_status == 200
    assert answer.api_status == 200
    assert answer.api_message == "batch processing completed"


@pytest.mark.parametrize("url", [None, "", "   "])
def test_no_url_is_still_processing(url: str | None) -> None:
    body = envelope(
        data(status=201, message="batch processing in progress", batch_output_file_url=url)
    )
    answer = classify(200, body)
    assert answer.outcome is Outcome.PROCESSING
    assert answer.output_url is None
    assert answer.api_status == 201
    assert answer.api_message == "batch processing in progress"


def test_missing_url_key_is_processing() -> None:
    assert classify(200, envelope(data(status=202))).outcome is Outcome.PROCESSING


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (500, "batch processing stopped"),
        (400, None),
        ("422", "bad input file"),
        (200, "batch processing failed"),
        (None, "Processing FAILURE: invalid csv"),
        ("FAILED", None),
    ],
)
def test_failed_batch(status: Any, message: str | None) -> None:
    answer = classify(200, envelope(data(status=status, message=message)))
    assert answer.outcome is Outcome.FAILED
    assert answer.output_url is None
    assert answer.detail is not None
    assert "remote batch failed" in answer.detail


def test_url_wins_over_a_failure_message() -> None:
    # The file exists: download it (the downloader verifies it) rather than discard it.
    body = envelope(
        data(status=200, message="completed, 3 rows failed", batch_output_file_url=OUTPUT_URL)
    )
    assert classify(200, body).outcome is Outcome.COMPLETED


# -- 200 that is not the documented envelope ------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"<html><body>502 Bad Gateway</body></html>",
        b"",
        b"[1, 2, 3]",
        b'"just a string"',
        b"null",
        json.dumps({"code": 200, "message": "ok"}).encode(),
        envelope(None),
        envelope([1, 2]),
        b"\xff\xfe\x00garbage",
    ],
)
def test_200_without_the_envelope_is_transient_with_raw_text(body: bytes) -> None:
    answer = classify(200, body)
    assert answer.outcome is Outcome.TRANSIENT
    assert answer.http_status == 200
    assert answer.detail is not None
    assert answer.detail.startswith("200 without")


def test_raw_text_of_an_odd_200_is_kept_for_audit() -> None:
    answer = classify(200, b"<html>maintenance</html>")
    assert answer.detail is not None
    assert "<html>maintenance</html>" in answer.detail


# -- business errors in a success envelope ---------------------------------------------------


@pytest.mark.parametrize("code", [400, 404, 422, 409])
def test_envelope_4xx_code_without_data_is_invalid(code: int) -> None:
    body = json.dumps({"code": code, "message": "Invalid request_id", "sub_code": "INVALID"})
    answer = classify(200, body.encode())
    assert answer.outcome is Outcome.INVALID
    assert answer.api_status == code
    assert answer.api_message == "Invalid request_id"


def test_envelope_5xx_code_without_data_is_transient() -> None:
    body = json.dumps({"code": 503, "message": "Source Unavailable"}).encode()
    answer = classify(200, body)
    assert answer.outcome is Outcome.TRANSIENT
    assert answer.api_message == "Source Unavailable"


def test_envelope_5xx_code_does_not_mark_the_batch_failed() -> None:
    body = envelope(data(status=500, message="failed to fetch status"), code=500)
    assert classify(200, body).outcome is Outcome.TRANSIENT


def test_envelope_auth_and_rate_limit_codes_say_nothing_about_the_batch() -> None:
    assert classify(200, json.dumps({"code": 401}).encode()).outcome is Outcome.AUTH
    assert classify(200, json.dumps({"code": 429}).encode()).outcome is Outcome.RATE_LIMITED


# -- error statuses -------------------------------------------------------------------------


@pytest.mark.parametrize("status", [401, 403])
def test_auth_statuses(status: int) -> None:
    answer = classify(status, b'{"detail": "Could not validate credentials"}')
    assert answer.outcome is Outcome.AUTH
    assert answer.http_status == status
    assert answer.api_message == "Could not validate credentials"


def test_429_is_rate_limited_and_carries_retry_after() -> None:
    answer = classify(429, b'{"detail": "Rate limit exceeded."}', retry_after="7")
    assert answer.outcome is Outcome.RATE_LIMITED
    assert answer.retry_after == 7.0
    assert answer.api_message == "Rate limit exceeded."


def test_429_without_retry_after() -> None:
    answer = classify(429, b'{"detail": "Rate limit exceeded."}')
    assert answer.outcome is Outcome.RATE_LIMITED
    assert answer.retry_after is None


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_server_errors_are_transient(status: int) -> None:
    answer = classify(status, b'{"detail": "Source Unavailable"}', retry_after="30")
    assert answer.outcome is Outcome.TRANSIENT
    assert answer.http_status == status
    assert answer.api_message == "Source Unavailable"
    assert answer.retry_after == 30.0


@pytest.mark.parametrize("status", [400, 404, 422])
def test_invalid_request_id_statuses(status: int) -> None:
    answer = classify(status, b'{"detail": "request_id not found"}')
    assert answer.outcome is Outcome.INVALID
    assert answer.api_message == "request_id not found"


def test_422_detail_list_becomes_readable() -> None:
    body = {
        "detail": [
            {"loc": ["query", "request_id"], "msg": "field required", "type": "value_error"},
            {"loc": ["query", "x"], "msg": "bad", "type": "type_error"},
        ]
    }
    answer = classify(422, json.dumps(body).encode())
    assert answer.outcome is Outcome.INVALID
    assert answer.api_message == "query.request_id: field required; query.x: bad"


@pytest.mark.parametrize("status", [0, 100, 201, 204, 301, 302, 405, 408, 418, 600, -1])
def test_unexpected_statuses_are_transient(status: int) -> None:
    answer = classify(status, b"whatever")
    assert answer.outcome is Outcome.TRANSIENT
    assert answer.detail is not None
    assert f"unexpected HTTP status {status}" in answer.detail


def test_transport_error() -> None:
    answer = classify_transport_error("ReadTimeout: timed out")
    assert answer.outcome is Outcome.TRANSIENT
    assert answer.http_status is None
    assert answer.detail is not None
    assert "ReadTimeout" in answer.detail


# -- redaction and trimming ------------------------------------------------------------------


def test_trim_raw_redacts_presigned_query_strings() -> None:
    url = OUTPUT_URL + "?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature=deadbeefcafe"
    text = trim_raw(f'{{"url": "{url}"}} and {url} end')
    assert "deadbeefcafe" not in text
    assert "AWS4-HMAC" not in text
    assert OUTPUT_URL + "?<redacted>" in text
    assert text.endswith(" end")


def test_trim_raw_redacts_json_escaped_urls_and_jwts() -> None:
    escaped = json.dumps({"u": OUTPUT_URL + "?sig=abc\u0026X-Amz-Signature=s3cr3t"}).replace(
        "/", "\\/"
    )
    assert "s3cr3t" not in trim_raw(escaped)
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"
    assert jwt not in trim_raw(f"token {jwt}")


def test_trim_raw_trims_after_redacting() -> None:
    text = trim_raw("x" * 2000, limit=500)
    assert text.startswith("x" * 500)
    assert "1500 more chars" in text
    assert len(text) < 540
    assert trim_raw("short") == "short"


def test_classify_redacts_urls_in_detail() -> None:
    body = b"<a href='https://evil.example/x?token=topsecret'>moved</a>"
    answer = classify(302, body)
    assert answer.detail is not None
    assert "topsecret" not in answer.detail


# -- Retry-After -----------------------------------------------------------------------------


def test_retry_after_delta_seconds() -> None:
    assert parse_retry_after("120", NOW) == 120.0
    assert parse_retry_after(" 3 ", NOW) == 3.0
    assert parse_retry_after("1.5", NOW) == 1.5
    assert parse_retry_after("-4", NOW) == 0.0


def test_retry_after_http_date() -> None:
    later = NOW + timedelta(seconds=90)
    assert parse_retry_after(later.strftime("%a, %d %b %Y %H:%M:%S GMT"), NOW) == 90.0
    earlier = NOW - timedelta(seconds=90)
    assert parse_retry_after(earlier.strftime("%a, %d %b %Y %H:%M:%S GMT"), NOW) == 0.0


@pytest.mark.parametrize("value", [None, "", "soon", "1e400", "nan", "Mon, 99 Foo 2026"])
def test_retry_after_garbage_is_none(value: str | None) -> None:
    assert parse_retry_after(value, NOW) is None


# -- never raises ----------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "code",
                    "data",
                    "status",
                    "message",
                    "detail",
                    "batch_output_file_url",
                    "loc",
                    "msg",
                ]
            )
            | st.text(max_size=5),
            children,
            max_size=5,
        )
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    status=st.integers(min_value=-(2**40), max_value=2**40)
    | st.sampled_from([200, 401, 422, 429, 503]),
    body=st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()),
    retry_after=st.none() | st.text(max_size=40),
    now=st.datetimes(timezones=st.just(UTC)),
)
def test_classify_status_never_raises(
    status: int, body: bytes, retry_after: str | None, now: datetime
) -> None:
    answer = classify_status(status, body, retry_after=retry_after, now=now)
    assert isinstance(answer.outcome, Outcome)
    assert answer.http_status == status
    assert (answer.output_url is not None) == (answer.outcome is Outcome.COMPLETED)
    if answer.detail is not None:
        assert len(answer.detail) < 600


@settings(max_examples=200, deadline=None)
@given(data=json_values, status_field=json_values, message=json_values)
def test_200_envelopes_never_raise(data: Any, status_field: Any, message: Any) -> None:
    payload = {"code": 200, "data": {"status": status_field, "message": message, "x": data}}
    answer = classify(200, json.dumps(payload).encode())
    assert answer.outcome in {Outcome.PROCESSING, Outcome.FAILED}


@settings(max_examples=200, deadline=None)
@given(value=st.text(max_size=60), now=st.datetimes())
def test_parse_retry_after_never_raises(value: str, now: datetime) -> None:
    result = parse_retry_after(value, now)
    assert result is None or result >= 0.0
