from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tracker.domain.urls import (
    UrlRefused,
    check_download_url,
    is_loopback_host,
    output_extension,
    redact_url,
)

ALLOWED = ("*.amazonaws.com", "files.example.org", "127.0.0.1", "::1", "localhost")
S3 = "https://bulk-data-processing.s3.ap-south-1.amazonaws.com"


@pytest.mark.parametrize(
    "url",
    [
        f"{S3}/upi-basic-batch-output-files/abc123.csv",
        f"{S3}/x.csv?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature=deadbeef",
        f"{S3}:443/x.csv",
        f"{S3}:8443/x.csv",
        "https://BULK-DATA-PROCESSING.S3.AP-SOUTH-1.AMAZONAWS.COM/x.csv",
        "https://bulk-data-processing.s3.ap-south-1.amazonaws.com./x.csv",
        "https://files.example.org/out.csv",
        "https://Files.Example.Org./out.csv",
        "HTTPS://files.example.org/out.csv",
        "http://127.0.0.1:8080/out.csv",
        "https://127.0.0.1/out.csv",
        "http://[::1]:8080/out.csv",
        "http://localhost:9000/out.csv",
        "https://files.example.org",
    ],
)
def test_allowed_urls(url: str) -> None:
    check_download_url(url, ALLOWED)  # does not raise


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://169.254.169.254/latest/meta-data/", "plain http"),
        ("https://169.254.169.254/latest/meta-data/", "IP address"),
        ("https://10.0.0.1/x.csv", "IP address"),
        ("https://[fd00::1]/x.csv", "IP address"),
        ("https://[::ffff:127.0.0.1]/x.csv", "IP address"),
        ("https://2852039166/x.csv", "IP address"),  # 169.254.169.254 in decimal
        ("https://0xa9fea9fe/x.csv", "IP address"),
        ("https://0xA9.0xFE.0xA9.0xFE/x.csv", "IP address"),
        ("https://0251.0376.0251.0376/x.csv", "IP address"),  # octal
        ("https://127.1/x.csv", "IP address"),  # shortened loopback, not listed verbatim
        ("https://0x7f.0.0.1/x.csv", "IP address"),
        ("https://127.0.0.2/x.csv", "IP address"),  # loopback, but not listed
        ("http://files.example.org/out.csv", "plain http"),
        ("http://bulk.s3.amazonaws.com/x.csv", "plain http"),
        ("file:///etc/passwd", "scheme"),
        ("ftp://files.example.org/out.csv", "scheme"),
        ("gopher://files.example.org/", "scheme"),
        ("data:text/csv,a,b", "scheme"),
        ("//files.example.org/out.csv", "scheme"),
        ("https://user:pass@files.example.org/out.csv", "credentials"),
        ("https://files.example.org@evil.com/out.csv", "credentials"),
        ("https://amazonaws.com.evil.com/x.csv", "not in the allowed"),
        ("https://evilamazonaws.com/x.csv", "not in the allowed"),
        ("https://amazonaws.com/x.csv", "not in the allowed"),  # wildcard needs a subdomain
        ("https://sub.files.example.org/out.csv", "not in the allowed"),  # exact pattern
        ("https://files.example.org.evil.com/out.csv", "not in the allowed"),
        ("https://evil.com/x.csv#@files.example.org", "not in the allowed"),
        ("https://evil.com\\@files.example.org/x.csv", "backslash"),
        ("https://files.example.org\t/out.csv", "whitespace"),
        ("https://files.exam%70le.org/out.csv", "percent"),
        ("https:///out.csv", "no host"),
        ("https://:443/out.csv", "no host"),
        ("https://files.example.org:0/out.csv", "port"),
        ("https://files.example.org:99999/out.csv", "port"),
        ("https://files.example.org:x/out.csv", "port"),
        ("https://[::1/out.csv", "IPv6"),
        ("https://bad_host.amazonaws.com/x.csv", "invalid host name"),
        ("https://a..amazonaws.com/x.csv", "invalid host name"),
        ("", "empty"),
        ("not a url", "whitespace"),
        ("https://xn--80ak6aa92e.com/x.csv", "not in the allowed"),
        ("https://bücher.amazonaws.com/x.csv", "non-ASCII"),
    ],
)
def test_refused_urls(url: str, reason: str) -> None:
    with pytest.raises(UrlRefused, match=reason):
        check_download_url(url, ALLOWED)


def test_ip_literal_needs_explicit_listing_even_when_loopback() -> None:
    with pytest.raises(UrlRefused, match="IP address"):
        check_download_url("http://127.0.0.1:8080/x.csv", ["*.amazonaws.com", "localhost"])


def test_localhost_must_be_listed_too() -> None:
    with pytest.raises(UrlRefused, match="not in the allowed"):
        check_download_url("http://localhost:8080/x.csv", ["127.0.0.1"])


def test_wildcard_pattern_never_matches_an_ip_literal() -> None:
    with pytest.raises(UrlRefused):
        check_download_url("https://127.0.0.1/x.csv", ["*.0.0.1", "*.amazonaws.com"])


def test_pattern_case_and_trailing_dot_are_ignored() -> None:
    check_download_url(f"{S3}/x.csv", ["*.AmazonAWS.com."])
    check_download_url("https://files.example.org/x", ["FILES.example.org."])


def test_no_allowed_hosts_refuses_everything() -> None:
    with pytest.raises(UrlRefused):
        check_download_url(f"{S3}/x.csv", [])


def test_refusal_message_never_contains_the_query_or_userinfo() -> None:
    url = "http://user:hunter2@evil.com/x.csv?X-Amz-Signature=SECRETSIG#frag"
    with pytest.raises(UrlRefused) as caught:
        check_download_url(url, ALLOWED)
    message = str(caught.value)
    assert "SECRETSIG" not in message
    assert "hunter2" not in message
    assert "evil.com/x.csv" in message


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        (f"{S3}/p/x.csv?X-Amz-Signature=abc&X-Amz-Credential=AKIA", f"{S3}/p/x.csv"),
        ("https://user:pw@host.example:8443/a/b?q=1#frag", "https://host.example:8443/a/b"),
        ("HTTPS://Host.Example/a", "https://Host.Example/a"),
        ("https://host.example", "https://host.example"),
        ("https://host.example/a\x1bb c", "https://host.example/a%1Bb%20c"),
        ("user:secret@host/x", "user:<redacted>"),
        ("data:text/plain,secret", "data:<redacted>"),
        ("no-scheme-at-all", "<redacted>"),
        ("https://[::1/x", "<unparseable URL>"),
    ],
)
def test_redact_url(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


@pytest.mark.parametrize(
    ("url", "extension"),
    [
        (f"{S3}/p/abc.csv", "csv"),
        (f"{S3}/p/abc.CSV?X-Amz-Signature=x.zip", "csv"),
        (f"{S3}/p/abc.xlsx", "xlsx"),
        (f"{S3}/p/abc.XLSX", "xlsx"),
        (f"{S3}/p/abc.json", "json"),
        (f"{S3}/p/abc.zip", "zip"),
        (f"{S3}/p/abc.tar.zip", "zip"),
        (f"{S3}/p/abc.exe", "csv"),
        (f"{S3}/p/abc", "csv"),
        (f"{S3}/p.zip/abc", "csv"),
        (f"{S3}/", "csv"),
        (f"{S3}/p/abc.json#x.zip", "json"),
        (f"{S3}/p/abc%2Ejson", "json"),
        ("https://[::1/x.zip", "csv"),
    ],
)
def test_output_extension(url: str, extension: str) -> None:
    assert output_extension(url) == extension


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("LOCALHOST.", True),
        ("127.0.0.1", True),
        ("127.9.8.7", True),
        ("::1", True),
        ("[::1]", True),
        ("128.0.0.1", False),
        ("169.254.169.254", False),
        ("127.1", False),
        ("localhost.evil.com", False),
        ("", False),
    ],
)
def test_is_loopback_host(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


_url_text = st.one_of(
    st.text(max_size=80),
    st.builds(
        lambda scheme, auth, host, tail: f"{scheme}{auth}{host}{tail}",
        st.sampled_from(["https://", "http://", "HTTPS://", "file://", "", "https:/", "//"]),
        st.sampled_from(["", "u:p@", "@", "x@"]),
        st.one_of(
            st.sampled_from(
                ["a.amazonaws.com", "[::1]", "[", "127.0.0.1", "0x7f.1", "localhost", ""]
            ),
            st.text(alphabet="abc.:[]@%0123456789x-_\\/", max_size=20),
        ),
        st.text(max_size=30),
    ),
)


@given(url=_url_text, hosts=st.lists(st.text(max_size=20), max_size=3))
def test_check_download_url_raises_only_url_refused(url: str, hosts: list[str]) -> None:
    message = None
    try:
        check_download_url(url, hosts)
    except UrlRefused as exc:  # anything else fails the test
        message = str(exc)
    assert message is None or message.startswith("refusing download URL ")
    redact_url(url)  # never raises either
    assert output_extension(url) in {"csv", "xlsx", "json", "zip"}
