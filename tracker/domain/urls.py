"""Which output-file URLs the tracker may download from, and how they may appear in logs.

The output URL comes from Deepvue's answer, so it is untrusted input that makes this
process open a connection: without a check it is a server-side request forgery hole
(cloud metadata at 169.254.169.254, internal services, local files). The check is an
allow-list of host patterns, strict about the forms that URL parsers and the C resolver
disagree on, because a URL that one parser reads as "allowed" and the connecting code
reads as another host is how such checks are usually bypassed.

Presigned URLs carry their signature in the query string, which makes the whole URL a
bearer secret: only `redact_url` output may be logged or put in an error message.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sequence
from urllib.parse import SplitResult, unquote, urlsplit

from tracker.domain.redact import redact

__all__ = [
    "OUTPUT_EXTENSIONS",
    "UrlRefused",
    "check_download_url",
    "is_loopback_host",
    "output_extension",
    "redact_url",
]

OUTPUT_EXTENSIONS: tuple[str, ...] = ("csv", "xlsx", "json", "zip")
_DEFAULT_EXTENSION = "csv"

# Presigned S3 URLs run to a couple of kilobytes; anything far longer is not a real
# output URL and is refused before any parsing work.
_MAX_URL_LENGTH = 16_384
# Printable ASCII without space and backslash. Whitespace, control characters and
# backslashes are where parsers differ (WHATWG treats "\" as "/", RFC 3986 does not;
# some strip tabs and newlines, some do not), so a URL containing one is refused
# outright instead of being interpreted.
_URL_CHARS = re.compile(r"[\x21-\x5b\x5d-\x7e]+")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
# A last label that is a number (decimal, or 0x-hex) makes the C resolver and WHATWG
# read the whole host as an IPv4 address: "2852039166", "0xa9.0xfe.0xa9.0xfe",
# "0251.254.169.254" and "127.1" all reach a numeric address without DNS.
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")
_PORT = re.compile(r"[0-9]{1,5}")


class UrlRefused(ValueError):
    """The URL must not be fetched. The message gives the reason and only the redacted URL."""


def redact_url(url: str) -> str:
    """`scheme://host[:port]/path` of `url`: userinfo, query and fragment dropped.

    What is kept also goes through `redact`, for a token or signature hidden in the path
    (`/a.csv%3FX-Amz-Signature%3D...`, a JWT as a path segment).
    Never raises: it is used on URLs that failed to parse, inside error handling.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    scheme = _printable(parts.scheme.lower())
    if not parts.netloc:
        # Without "//" there is no authority to show, and what follows the scheme
        # ("data:...", "user:secret@host") may be anything, including a secret.
        return f"{scheme}:<redacted>" if scheme else "<redacted>"
    host_port = parts.netloc.rpartition("@")[2]
    return redact(f"{scheme}://{_printable(host_port)}{_printable(parts.path)}")


def _printable(text: str) -> str:
    # Escape what could forge or break a log line (newlines, control characters).
    return "".join(
        ch if "\x21" <= ch <= "\x7e" else "".join(f"%{b:02X}" for b in ch.encode()) for ch in text
    )


def is_loopback_host(host: str) -> bool:
    """True for "localhost", 127.0.0.0/8 and ::1 (brackets and a trailing dot allowed).

    Only canonical address spellings count: "127.1" or "0x7f.0.0.1" are not accepted
    here, because the caller refuses such odd forms anyway.
    """
    name = _normalise_host(host)
    if name == "localhost":
        return True
    address = _ip_literal(name)
    return address is not None and address.is_loopback


def check_download_url(url: str, allowed_hosts: Sequence[str]) -> None:
    """Raise UrlRefused unless `url` may be fetched.

    Allowed: https to a host matching one of `allowed_hosts` ("*.example.com" matches any
    subdomain of example.com but not example.com itself; any other pattern matches only
    that exact host; case and a trailing dot do not matter). Plain http only to a
    loopback host. IP literals only when loopback and listed verbatim in `allowed_hosts`.
    No userinfo, no other schemes, no odd characters.
    """
    shown = redact_url(url)

    def refuse(reason: str) -> UrlRefused:
        return UrlRefused(f"refusing download URL {shown}: {reason}")

    if not isinstance(url, str) or not url:
        raise refuse("empty")
    if len(url) > _MAX_URL_LENGTH:
        raise refuse(f"longer than {_MAX_URL_LENGTH} characters")
    if _URL_CHARS.fullmatch(url) is None:
        raise refuse("contains whitespace, control, backslash or non-ASCII characters")
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise refuse(f"not a valid URL ({exc})") from None

    scheme = parts.scheme.lower()
    if scheme not in ("https", "http"):
        raise refuse(f"scheme {scheme or '(none)'!r} is not allowed, only https")
    host = _authority_host(parts, refuse)
    address = _ip_literal(host)
    if scheme == "http" and not is_loopback_host(host):
        raise refuse("plain http is only allowed to a loopback host")
    if address is not None:
        if not (address.is_loopback and _address_listed(address, allowed_hosts)):
            raise refuse("IP address hosts are refused unless loopback and listed explicitly")
        return
    if not any(_host_matches(host, pattern) for pattern in allowed_hosts):
        raise refuse(f"host {host!r} is not in the allowed download hosts")


def _authority_host(parts: SplitResult, refuse: Callable[[str], UrlRefused]) -> str:
    """The validated, lower-cased host of `parts`, without brackets or a trailing dot."""
    netloc = parts.netloc
    if not netloc:
        raise refuse("no host")
    if "@" in netloc:
        raise refuse("credentials (user:password@) in the URL are not allowed")
    if "%" in netloc:
        raise refuse("percent-encoding in the host is not allowed")
    if netloc.startswith("["):
        bracket_end = netloc.find("]")
        if bracket_end < 0:
            raise refuse("unterminated IPv6 literal")
        host, rest = netloc[1:bracket_end], netloc[bracket_end + 1 :]
        if _ip_literal(host) is None or ":" not in host:
            raise refuse("invalid IPv6 literal")
    else:
        host, colon, port_text = netloc.partition(":")
        rest = colon + port_text
    if rest:
        if not rest.startswith(":") or _PORT.fullmatch(rest[1:]) is None:
            raise refuse("invalid port")
        if not 1 <= int(rest[1:]) <= 65535:
            raise refuse("port out of range")

    host = _normalise_host(host)
    if not host:
        raise refuse("no host")
    if _ip_literal(host) is not None:
        return host
    labels = host.split(".")
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        # Some numeric spelling of an IPv4 address that `ipaddress` does not accept
        # (decimal, octal, hex, shortened): resolvers would still connect to it.
        raise refuse("IP address hosts are refused unless loopback and listed explicitly")
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise refuse("invalid host name")
    return host


def _normalise_host(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    # "example.com." is the same host as "example.com" (fully qualified form).
    if host.endswith(".") and not host.endswith(".."):
        host = host[:-1]
    return host


def _ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    # `ipaddress` accepts only canonical dotted quads (no leading zeros, four parts),
    # which is what makes every other numeric form fall through to the refusal above.
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _address_listed(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, allowed_hosts: Sequence[str]
) -> bool:
    return any(_ip_literal(_normalise_host(pattern)) == address for pattern in allowed_hosts)


def _host_matches(host: str, pattern: str) -> bool:
    pattern = _normalise_host(pattern)
    if not pattern or _ip_literal(pattern) is not None:
        # Address patterns are handled by _address_listed, and never as wildcards.
        return False
    if pattern.startswith("*."):
        suffix = pattern[1:]  # ".amazonaws.com": the dot stops "evilamazonaws.com"
        return host.endswith(suffix) and len(host) > len(suffix)
    return host == pattern


def output_extension(url: str) -> str:
    """The output file's type from the URL path's suffix; "csv" when unknown."""
    try:
        path = urlsplit(url).path
    except ValueError:
        return _DEFAULT_EXTENSION
    name = unquote(path.rsplit("/", 1)[-1])
    _, dot, suffix = name.rpartition(".")
    suffix = suffix.lower()
    if dot and suffix in OUTPUT_EXTENSIONS:
        return suffix
    return _DEFAULT_EXTENSION
