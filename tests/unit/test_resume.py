"""The resume protocol on plain values: which answers continue a file, which restart it."""

from __future__ import annotations

import pytest

from tracker.domain.resume import (
    Answer,
    Continuation,
    Held,
    Mismatch,
    RangeRefused,
    Verdict,
    WholeFile,
    content_length,
    etag_md5,
    judge,
    request_headers,
    validator,
)

ETAG = '"v1-etag"'
MD5 = "0123456789abcdef0123456789abcdef"
LAST_MODIFIED = "Wed, 01 Jan 2025 00:00:00 GMT"
HELD = Held(size=1000, total=10_000, validator=ETAG)


def partial(content_range: str, **headers: str) -> Answer:
    return Answer(206, content_range=content_range, **headers)


@pytest.mark.parametrize(
    ("answer", "held", "verdict"),
    [
        pytest.param(
            partial("bytes 1000-9999/10000", etag=ETAG),
            HELD,
            Continuation(total=10_000, validator=ETAG),
            id="continues where the held bytes end",
        ),
        pytest.param(
            partial("BYTES  1000-9999/10000", etag=ETAG),
            HELD,
            Continuation(total=10_000, validator=ETAG),
            id="unit in any case, any spacing",
        ),
        pytest.param(
            partial(" bytes 1000-9999/10000 "),
            HELD,
            Continuation(total=10_000, validator=ETAG),
            id="no validator in the answer keeps the held one",
        ),
        pytest.param(
            partial("bytes 1000-9999/10000", etag=ETAG),
            Held(size=1000),
            Continuation(total=10_000, validator=ETAG),
            id="learns total and validator when none was known",
        ),
        pytest.param(
            partial("bytes 1000-9999/*", content_length="9000"),
            Held(size=1000, validator=ETAG),
            Continuation(total=10_000, validator=ETAG),
            id="unknown total: start plus Content-Length",
        ),
        pytest.param(
            partial("bytes 1000-9999/*"),
            Held(size=1000, validator=ETAG),
            Continuation(total=None, validator=ETAG),
            id="unknown total and no Content-Length",
        ),
        pytest.param(
            partial("bytes 1000-5999/*", content_length="5000"),
            HELD,
            Continuation(total=10_000, validator=ETAG),
            id="unknown total: the held total stays",
        ),
        pytest.param(
            partial("bytes 0-99/100"),
            Held(),
            Continuation(total=100, validator=None),
            id="206 to a first request that starts at zero",
        ),
        pytest.param(
            partial("bytes 0-9999/10000", etag=ETAG),
            HELD,
            Mismatch("206 starts at 0, expected 1000"),
            id="wrong start",
        ),
        pytest.param(
            partial("bytes 2000-9999/10000", etag=ETAG),
            HELD,
            Mismatch("206 starts at 2000, expected 1000"),
            id="starts past the held bytes",
        ),
        pytest.param(
            partial("bytes 1000-999/10000"),
            HELD,
            Mismatch("206 with an inconsistent Content-Range"),
            id="end before start",
        ),
        pytest.param(
            partial("bytes 1000-10000/10000"),
            HELD,
            Mismatch("206 with an inconsistent Content-Range"),
            id="end past the total",
        ),
        pytest.param(
            partial("bytes 1000-10999/11000", etag=ETAG),
            HELD,
            Mismatch("file length changed between requests"),
            id="longer total",
        ),
        pytest.param(
            partial("bytes 1000-8999/9000", etag=ETAG),
            HELD,
            Mismatch("file length changed between requests"),
            id="shorter total",
        ),
        pytest.param(
            partial("bytes 1000-9999/10000", etag='"v2-etag"'),
            HELD,
            Mismatch("file changed between requests"),
            id="changed validator",
        ),
        pytest.param(
            partial("bytes 1000-9999/10000", last_modified="Thu, 02 Jan 2025 00:00:00 GMT"),
            Held(size=1000, total=10_000, validator=LAST_MODIFIED),
            Mismatch("file changed between requests"),
            id="changed Last-Modified",
        ),
        pytest.param(
            partial(""),
            HELD,
            Mismatch("206 without a usable Content-Range"),
            id="no Content-Range",
        ),
        pytest.param(
            partial("bytes 1000-/10000"),
            HELD,
            Mismatch("206 without a usable Content-Range"),
            id="malformed Content-Range",
        ),
        pytest.param(
            partial("bytes */10000"),
            HELD,
            Mismatch("206 without a usable Content-Range"),
            id="unsatisfied-range form",
        ),
        pytest.param(
            partial("items 1000-9999/10000"),
            HELD,
            Mismatch("206 without a usable Content-Range"),
            id="other range unit",
        ),
        pytest.param(
            Answer(200, content_length="10000", etag=ETAG),
            HELD,
            WholeFile(total=10_000, validator=ETAG, md5=None, replaces="200 to a range request"),
            id="200 instead of 206",
        ),
        pytest.param(
            Answer(200, content_length="10000", etag=f'"{MD5.upper()}"'),
            Held(),
            WholeFile(total=10_000, validator=f'"{MD5.upper()}"', md5=MD5),
            id="200 to a first request, MD5 ETag",
        ),
        pytest.param(
            Answer(200, last_modified=LAST_MODIFIED),
            Held(),
            WholeFile(total=None, validator=LAST_MODIFIED, md5=None),
            id="200 without Content-Length",
        ),
        pytest.param(
            Answer(416),
            HELD,
            RangeRefused("server refused the range (416), starting over"),
            id="416 to a range request",
        ),
        pytest.param(Answer(416), Held(), None, id="416 to a first request"),
        pytest.param(Answer(204), HELD, None, id="204"),
        pytest.param(Answer(304, etag=ETAG), HELD, None, id="304"),
    ],
)
def test_what_an_answer_means_for_the_held_bytes(
    answer: Answer, held: Held, verdict: Verdict | None
) -> None:
    assert judge(answer, held) == verdict


@pytest.mark.parametrize(
    ("held", "headers"),
    [
        (Held(), {"Accept-Encoding": "identity"}),
        (
            Held(size=1000, total=10_000),
            {"Accept-Encoding": "identity", "Range": "bytes=1000-"},
        ),
        (
            HELD,
            {"Accept-Encoding": "identity", "Range": "bytes=1000-", "If-Range": ETAG},
        ),
        # A validator but nothing held: a fresh request, nothing to guard.
        (Held(size=0, validator=ETAG), {"Accept-Encoding": "identity"}),
    ],
)
def test_the_request_asks_for_the_rest_of_the_same_file(
    held: Held, headers: dict[str, str]
) -> None:
    assert request_headers(held) == headers


@pytest.mark.parametrize(
    ("etag", "last_modified", "expected"),
    [
        (ETAG, LAST_MODIFIED, ETAG),
        (ETAG, "", ETAG),
        ('W/"weak"', LAST_MODIFIED, LAST_MODIFIED),  # a weak ETag never satisfies If-Range
        ('W/"weak"', "", 'W/"weak"'),
        ("", LAST_MODIFIED, LAST_MODIFIED),
        ("", "", None),
    ],
)
def test_the_validator_prefers_a_strong_etag(
    etag: str, last_modified: str, expected: str | None
) -> None:
    assert validator(etag, last_modified) == expected


@pytest.mark.parametrize(
    ("etag", "md5"),
    [
        (f'"{MD5}"', MD5),
        (f' "{MD5.upper()}" ', MD5),
        (f'"{MD5}-3"', None),  # multipart upload: no checksum of the content
        (MD5, None),  # unquoted
        (f'W/"{MD5}"', None),
        (f'"{MD5[:-1]}"', None),
        (f'"{MD5[:-1]}g"', None),
        ("", None),
    ],
)
def test_only_a_single_part_etag_is_an_md5(etag: str, md5: str | None) -> None:
    assert etag_md5(etag) == md5


@pytest.mark.parametrize(
    ("value", "length"),
    [("10000", 10_000), (" 0 ", 0), ("", None), ("-1", None), ("1e3", None), ("12 34", None)],
)
def test_content_length_is_a_plain_count(value: str, length: int | None) -> None:
    assert content_length(value) == length
