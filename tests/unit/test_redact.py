"""The one redactor (tracker.domain.redact), and the log pipeline that uses it.

The property tests build the secret material the tracker handles (the client secret, JWT
access tokens, opaque bearer tokens, presigned URLs), embed it in arbitrary text in every
encoding the code produces (plain, JSON-escaped with and without `\\/`, percent- and
form-encoded, inside a JSON body as Deepvue echoes it, and that body quoted once more), and
assert that no spelling of any of it survives `redact`, nor a line rendered by the log
pipeline configured as `tracker.logs` configures it.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable
from urllib.parse import quote, quote_plus, urlencode

import pytest
import structlog
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tracker.domain.answers import trim_raw
from tracker.domain.redact import (
    MIN_SECRET_LENGTH,
    REDACTED,
    redact,
    redact_secrets,
    redact_secrets_in_bytes,
    secret_spellings,
)
from tracker.domain.urls import redact_url
from tracker.logs import configure_logging

S3 = "https://bulk-data-processing.s3.ap-south-1.amazonaws.com/out/req1.csv"
PRESIGNED = f"{S3}?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature=deadbeefcafe"
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJkZW1vIiwiZXhwIjoxfQ.c2lnbmF0dXJl"
SECRET = 's3cr/et+value=&"é'

PROPERTY = settings(max_examples=150, deadline=None)
PIPELINE = settings(max_examples=40, deadline=None)


def spellings(material: str) -> set[str]:
    """Every spelling of `material` the test looks for, built independently of the code."""
    forms = {material, quote(material, safe=""), quote(material), quote_plus(material)}
    escaped: set[str] = set()
    for form in forms:
        for ensure_ascii in (True, False):
            once = json.dumps(form, ensure_ascii=ensure_ascii)[1:-1]
            escaped |= {once, once.replace("/", "\\/")}
            twice = json.dumps(once, ensure_ascii=ensure_ascii)[1:-1]
            escaped |= {twice, twice.replace("/", "\\/")}
        # As str() of a dict shows it, with `'` escaped when the whole string holds both quotes.
        escaped |= {repr(form)[1:-1], repr("'\"" + form)[4:-1]}
    return forms | escaped


def assert_gone(text: str, *materials: str) -> None:
    for material in materials:
        for spelling in spellings(material):
            assert spelling not in text, (material, spelling, text)


# -- examples --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        PRESIGNED,
        json.dumps({"url": PRESIGNED}),
        json.dumps({"url": PRESIGNED}).replace("/", "\\/"),
        json.dumps(json.dumps({"data": {"batch_output_file_url": PRESIGNED}})),
        quote(PRESIGNED, safe=""),
        quote(PRESIGNED),
        quote_plus(PRESIGNED),
        quote(quote(PRESIGNED, safe=""), safe=""),
        f"GET {S3.removeprefix('https://bulk-data-processing.s3.ap-south-1.amazonaws.com')}"
        "?X-Amz-Signature=deadbeefcafe&X-Amz-Credential=AKIAEXAMPLE",
        "X-Amz-Signature%3Ddeadbeefcafe%26X-Amz-Credential%3DAKIAEXAMPLE",
        '{"X-Amz-Signature": "deadbeefcafe", "X-Amz-Credential": "AKIAEXAMPLE"}',
    ],
)
def test_presigned_query_strings_go_in_every_encoding(text: str) -> None:
    out = redact(f"answer: {text} (end)")
    assert_gone(out, "deadbeefcafe", "AKIAEXAMPLE")
    assert out.endswith("(end)") or "?<redacted>" in out


def test_a_url_keeps_scheme_host_and_path() -> None:
    assert redact(f"got {PRESIGNED} ok") == f"got {S3}?{REDACTED} ok"
    escaped = json.dumps({"u": PRESIGNED}).replace("/", "\\/")
    assert redact(escaped) == json.dumps({"u": f"{S3}?{REDACTED}"}).replace("/", "\\/")
    assert redact(f"{S3}#access_token=abc") == f"{S3}?{REDACTED}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Authorization: Bearer opaque-token_1", "Authorization: Bearer <redacted>"),
        ('{"Authorization": "Bearer abc/def+="}', '{"Authorization": "Bearer <redacted>"}'),
        ("{'x-api-key': 'k3y/value'}", "{'x-api-key': '<redacted>'}"),
        ("x-api-key: k3y", "x-api-key: <redacted>"),
        ("client_id=c1&client_secret=a%2Fb&x=1", "client_id=c1&client_secret=<redacted>&x=1"),
        (
            '{"access_token": "tok", "expiry": "2026"}',
            '{"access_token": "<redacted>", "expiry": "2026"}',
        ),
        # Quoted twice: the value runs over the escaped quote (never stopping short of it).
        ('{\\"token\\": \\"tok\\"}', '{\\"token\\": \\"<redacted>'),
        (f"token {JWT} end", "token <redacted> end"),
        (f"a {JWT}.more.parts b", "a <redacted> b"),
        ("sent bearer%20abc", "sent bearer%20<redacted>"),
    ],
)
def test_credentials_and_tokens(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "batch req-1 moved from processing to ready",
        "https://bulk-data-processing.s3.ap-south-1.amazonaws.com/out/req1.csv",
        "client_id=client-123 request_id=abc_9",
        "refusing download URL https://evil.example/x.csv: host not allowed",
        "3 of 8 slots free; next check in 30.0 s",
        "lease_token=9223372036854775807 cannot advance",
    ],
)
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert redact(text) == text
    assert redact(text, [SECRET]) == text


def test_known_secrets_in_every_spelling() -> None:
    text = " | ".join(sorted(spellings(SECRET)))
    out = redact(text, [SECRET])
    assert_gone(out, SECRET)
    assert set(out.split(" | ")) == {REDACTED}


def test_known_secret_case_and_short_strings() -> None:
    assert redact("key ABCDEF-123 here", ["abcdef-123"]) == "key <redacted> here"
    short = "x" * (MIN_SECRET_LENGTH - 1)
    assert redact(f"a {short} b", [short]) == f"a {short} b"


def test_redact_secrets_touches_nothing_else() -> None:
    body = json.dumps({"detail": f"bad key {SECRET}", "url": PRESIGNED})
    out = redact_secrets(body, [SECRET])
    assert_gone(out, SECRET)
    assert PRESIGNED in out  # still usable: the output URL is needed with its signature
    assert json.loads(out)["url"] == PRESIGNED


def test_redact_secrets_in_bytes() -> None:
    body = b"\xff\xfe not utf-8 " + json.dumps({"k": SECRET}).encode()
    out = redact_secrets_in_bytes(body, [SECRET])
    assert out.startswith(b"\xff\xfe not utf-8 ")
    assert_gone(out.decode("utf-8", "replace"), SECRET)
    assert redact_secrets_in_bytes(b"\x80abc", []) == b"\x80abc"


def test_secret_spellings_include_the_echoes() -> None:
    found = set(secret_spellings('a/b c&d"é'))
    assert {'a/b c&d"é', "a%2Fb%20c%26d%22%C3%A9", "a%2Fb+c%26d%22%C3%A9"} <= found
    assert {'a/b c&d\\"\\u00e9', 'a\\/b c&d\\"\\u00e9', 'a/b c&d\\"é'} <= found
    assert secret_spellings("\ud800-lone-surrogate")  # never raises


@pytest.mark.parametrize(
    "text",
    [
        "eyJ" * 100_000 + "..",
        "eyJ." + "eyJ" * 100_000,
        "a://" * 60_000,
        "https://h/" + "a" * 300_000,
        "x-amz-" * 60_000,
        "token:" * 60_000,
        "%25" * 100_000,
        "bearer " * 40_000,
    ],
)
def test_linear_on_hostile_text(text: str) -> None:
    started = time.perf_counter()
    redact(text, [SECRET])
    assert time.perf_counter() - started < 2.0


def test_every_caller_redacts_alike() -> None:
    escaped = json.dumps({"u": PRESIGNED}).replace("/", "\\/")
    assert_gone(trim_raw(escaped), "deadbeefcafe", "AKIAEXAMPLE")
    assert_gone(redact_url(f"{S3}%3FX-Amz-Signature%3Ddeadbeefcafe"), "deadbeefcafe")
    assert_gone(redact_url(f"https://h.example/{JWT}/x.csv"), JWT)
    stream = io.StringIO()
    scrubber = configure_logging("json", "INFO", stream=stream)
    scrubber.add(SECRET)
    structlog.get_logger("t").info("e", raw=escaped, key=quote_plus(SECRET))
    assert_gone(stream.getvalue(), "deadbeefcafe", "AKIAEXAMPLE", SECRET)


# -- properties ------------------------------------------------------------------------------

_B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
# Secrets: printable ASCII and some non-ASCII, everything that encodes differently, but
# not `<>` (the marker's own brackets, which no Deepvue secret holds).
_SECRET_CHARS = st.sampled_from(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    "-_.~+/=&%?#:;@!$*'\"(),[]{}|\\^` é₹😀\u2028\x00\t"
)
secrets_ = st.text(_SECRET_CHARS, min_size=MIN_SECRET_LENGTH + 4, max_size=40)
# A JWT: header starting with eyJ, payload and signature in base64url.
jwts = st.builds(
    lambda h, p, s: f"eyJ{h}.{p}.{s}",
    st.text(_B64URL, min_size=4, max_size=40),
    st.text(_B64URL, min_size=8, max_size=60),
    st.text(_B64URL, min_size=8, max_size=60),
)
# Opaque bearer tokens and signature values: long enough never to occur by chance.
opaque = st.text(_B64URL + "+/=.~", min_size=16, max_size=60)
signatures = st.text("0123456789abcdef", min_size=16, max_size=64)
credentials = st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/", min_size=16, max_size=40)
hosts = st.sampled_from(
    [
        "bulk-data-processing.s3.ap-south-1.amazonaws.com",
        "s3.amazonaws.com",
        "localhost:8443",
        "127.0.0.1:9000",
        "files.example",
    ]
)
paths = st.lists(st.text(_B64URL + ".", min_size=1, max_size=12), max_size=4).map(
    lambda parts: "/" + "/".join(parts)
)
# Surrounding text: anything, including the characters the encodings use, but no ASCII
# letter or digit, so that it can never spell the material itself (text glued to letters is
# in the examples above).
around = st.text(
    st.characters(codec="utf-8", exclude_characters=_B64URL.removesuffix("-_")), max_size=30
)


@st.composite
def presigned_urls(draw: st.DrawFn) -> tuple[str, list[str]]:
    """A presigned URL and the values in it that must not survive."""
    signature, credential, token = draw(signatures), draw(credentials), draw(opaque)
    params = [
        ("X-Amz-Algorithm", "AWS4-HMAC-SHA256"),
        ("X-Amz-Credential", credential),
        ("X-Amz-Date", "20260307T120000Z"),
        ("X-Amz-Expires", "3600"),
        ("X-Amz-Security-Token", token),
        ("X-Amz-SignedHeaders", "host"),
        ("X-Amz-Signature", signature),
    ]
    params = draw(st.permutations(params))
    scheme = draw(st.sampled_from(["https", "http", "HTTPS"]))
    url = f"{scheme}://{draw(hosts)}{draw(paths)}?{urlencode(params)}"
    return url, [signature, credential, token]


Encoding = Callable[[str], str]
ENCODINGS: dict[str, Encoding] = {
    "plain": lambda s: s,
    "json": lambda s: json.dumps(s)[1:-1],
    "json-unicode": lambda s: json.dumps(s, ensure_ascii=False)[1:-1],
    "json-slashes": lambda s: json.dumps(s)[1:-1].replace("/", "\\/"),
    "percent": lambda s: quote(s, safe=""),
    "percent-path": lambda s: quote(s),
    "form": quote_plus,
    "percent-twice": lambda s: quote(quote(s, safe=""), safe=""),
    "deepvue-body": lambda s: json.dumps(
        {"code": 500, "detail": f"bad request {s}", "data": {"batch_output_file_url": s}}
    ),
    "deepvue-body-slashes": lambda s: json.dumps({"detail": s}).replace("/", "\\/"),
    "body-quoted-again": lambda s: json.dumps(json.dumps({"data": {"message": s}})),
}
encodings = st.sampled_from(sorted(ENCODINGS))


def embed(draw: st.DrawFn, material: str) -> str:
    encoding = ENCODINGS[draw(encodings)]
    return f"{draw(around)}{encoding(material)}{draw(around)}"


@st.composite
def secret_texts(draw: st.DrawFn) -> tuple[str, list[str], list[str]]:
    """(text, known secrets, material that must not survive) with everything embedded."""
    secret, jwt = draw(secrets_), draw(jwts)
    url, url_material = draw(presigned_urls())
    bearer = draw(opaque)
    header = draw(
        st.sampled_from(
            [
                f"Authorization: Bearer {bearer}",
                json.dumps({"Authorization": f"Bearer {bearer}"}),
                repr({"authorization": f"Bearer {bearer}"}),
                f"x-api-key: {bearer}",
                json.dumps({"x-api-key": bearer}),
                urlencode({"client_id": "client-1", "client_secret": bearer}),
                json.dumps({"access_token": bearer, "token_type": "bearer"}),
            ]
        )
    )
    pieces = [embed(draw, secret), embed(draw, jwt), embed(draw, url), embed(draw, header)]
    pieces = draw(st.permutations(pieces))
    return " ".join(pieces), [secret, jwt], [secret, jwt, *url_material, bearer]


@PROPERTY
@given(secret_texts())
@example((f"x {PRESIGNED} y", [], ["deadbeefcafe", "AKIAEXAMPLE"]))
@example((json.dumps({"u": PRESIGNED}).replace("/", "\\/"), [], ["deadbeefcafe"]))
def test_nothing_secret_survives_redact(case: tuple[str, list[str], list[str]]) -> None:
    text, known, material = case
    out = redact(text, known)
    assert_gone(out, *material)
    assert_gone(trim_raw(redact(text, known), limit=10_000), *material)


@PROPERTY
@given(secrets_, around, encodings)
def test_a_known_secret_never_survives(secret: str, text: str, encoding: str) -> None:
    embedded = f"{text}{ENCODINGS[encoding](secret)}{text}"
    assert_gone(redact(embedded, [secret]), secret)
    assert_gone(redact_secrets(embedded, [secret]), secret)
    assert_gone(
        redact_secrets_in_bytes(embedded.encode("utf-8", "surrogatepass"), [secret]).decode(
            "utf-8", "surrogatepass"
        ),
        secret,
    )


@PROPERTY
@given(presigned_urls())
def test_redact_url_keeps_only_scheme_host_and_path(case: tuple[str, list[str]]) -> None:
    url, material = case
    shown = redact_url(url)
    assert_gone(shown, *material)
    assert "?" not in shown
    assert url.lower().startswith(shown.split("://", 1)[0].lower() + "://")


@PROPERTY
@given(st.text(max_size=200), st.lists(secrets_, max_size=2))
def test_redact_never_raises(text: str, known: list[str]) -> None:
    out = redact(text, known)
    assert isinstance(out, str)
    assert_gone(out, *known)


@pytest.mark.parametrize("log_format", ["json", "console"])
@PIPELINE
@given(case=secret_texts())
def test_nothing_secret_reaches_a_log_line(
    log_format: str, case: tuple[str, list[str], list[str]]
) -> None:
    text, known, material = case
    stream = io.StringIO()
    scrubber = configure_logging(log_format, "DEBUG", stream=stream)
    for secret in known:
        scrubber.add(secret)
    log = structlog.get_logger("tracker.test")
    log.warning("api.unexpected_answer", raw=text, detail={"body": text})
    logging.getLogger("httpx").debug("HTTP Request: GET %s", text)
    try:
        raise RuntimeError(text)
    except RuntimeError:
        log.exception("api.error")
    rendered = stream.getvalue()
    assert_gone(rendered, *material)
    if log_format == "json":
        lines = [json.loads(line) for line in rendered.splitlines()]
        assert len(lines) == 3
        assert_gone(json.dumps(lines, ensure_ascii=False), *material)
