"""The one redactor: what must never reach a log line, a database column or the terminal.

Pure: text in, text out, no I/O. Every place that lets outside text through (the log
scrubber, the raw answers kept for audit, the URLs shown in messages, the API client's
echoes) calls `redact`, so they cannot drift apart.

What goes, in every encoding the tracker or its libraries produce (plain, JSON-escaped with
or without `\\/`, percent-encoded, form-encoded, Python's repr):

- known secrets (the client secret, the access token), with their encoded spellings;
- JWTs (a bearer token whatever it is called);
- every URL query string: a presigned URL's signature makes the whole query a secret;
- the values of credential-looking parameters and headers (`X-Amz-*`, `Signature`,
  `token`, `Authorization`, `x-api-key`, `client_secret`...), also outside any URL.

It errs on the side of removing too much: a redacted word costs a reader a moment, a leaked
signature costs the data.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from collections.abc import Callable, Iterable
from urllib.parse import quote, quote_plus

__all__ = [
    "MIN_SECRET_LENGTH",
    "REDACTED",
    "redact",
    "redact_secrets",
    "redact_secrets_in_bytes",
    "secret_spellings",
]

REDACTED = "<redacted>"

# A known secret shorter than this is not looked for: it would blank out ordinary words,
# and a real client secret or token is never that short.
MIN_SECRET_LENGTH = 6

# Characters that end a redacted value: whitespace, quotes, and the marker's own `<>`.
_END = r"\s\"'<>`"
# `?`, `/`, `:` and `=` as they appear plain, percent-encoded (once or more: `%3F`,
# `%253F`) and, for `/`, JSON-escaped (`\/`).
_QMARK = r"(?:\?|%(?:25)*3F)"
_SLASH = r"(?:\\?/|%(?:25)*2F)"
_COLON = r"(?::|%(?:25)*3A)"
_EQUALS = r"(?:=|%(?:25)*3D)"
# A quote around a name or value (`"`, `'`, JSON-escaped once or more `\"`, `\\\"`,
# percent-encoded `%22`), and
# a space (plain, percent- or form-encoded).
_QUOTE = r"(?:\\{0,8}[\"']|%(?:25)*2[27])"
_SPACE = r"(?:[ \t]|%(?:25)*20|\+)"

# Where a URL's authority starts: `://`, whatever the scheme before it (`https:\/\/` and
# `https%3A%2F%2F` too).
_URL_START = re.compile(rf"(?i){_COLON}{_SLASH}{_SLASH}")
# After a URL's start, what comes first: its query (or fragment), or the end of the URL.
_QUERY_OR_END = re.compile(rf"(?i)({_QMARK}|#)|[{_END}]")
_VALUE_END = re.compile(rf"[{_END}]")
# A JWT: three base64url segments, the header starting with `{"` (base64 `eyJ`). Further
# dotted segments go too (a JWE has five; and a token glued after "eyJ..." text must not
# leave its signature behind).
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_.-]*")
_BASE64URL_RUN = re.compile(r"[A-Za-z0-9_-]*")
# Credential-looking names; their value goes wherever they appear (query parameter, form
# field, header line, JSON member, Python repr), so a signature outside a recognisable URL
# (say, percent-encoded inside another one) does not survive either. Bounded repetitions
# keep every attempt short: untrusted text must not make this quadratic.
_CREDENTIAL_NAME = (
    r"x-amz-[a-z0-9-]{1,40}|signature|sig|expires|policy|key-pair-id"
    r"|(?:access_|refresh_|id_|security-|session-)?token|client_secret|secret|password"
    r"|authorization|x-api-key|api[-_]?key|cookie"
)
# name=value (`=` possibly percent-encoded), or name: value with optional quotes around
# the name and the value (`"name": "value"`, `'name': 'value'`, `\"name\": \"value\"`).
_SEPARATOR = rf"(?:{_EQUALS}|{_QUOTE}?{_SPACE}{{0,16}}{_COLON}{_SPACE}{{0,16}}{_QUOTE}?)"
# Not after a letter or `_` ("nosig=", "lease_token=" are other names), and only where a
# name can start: both checks are cheap, and skip most positions of ordinary text at once.
_CREDENTIAL = re.compile(
    rf"(?i)(?<![a-z_])(?=[aceikprstx])((?:{_CREDENTIAL_NAME}){_SEPARATOR}(?:(?:bearer|basic|token){_SPACE}{{1,16}})?)"
    rf"(?:\\.|[^{_END}&,;\\])+"
)
# "Bearer <token>" wherever it stands, whatever the token looks like.
_BEARER = re.compile(rf"(?i)(bearer{_SPACE}{{1,16}})[^{_END},;]+")


def secret_spellings(secret: str) -> list[str]:
    """`secret` as it may appear in text: plain, percent- and form-encoded, JSON-escaped.

    JSON escaping comes with and without `\\/` and `\\uXXXX`, also over the encoded forms
    (a form body echoed inside a JSON answer), and twice (an answer quoted in a JSON log);
    so does Python's repr (a dict or an exception turned into text).
    Longest first, so that a longer spelling is not cut short by a shorter one.
    """
    encoded = {secret}
    encoders: tuple[Callable[[str], str], ...] = (
        functools.partial(quote, safe=""),
        functools.partial(quote, safe="/"),
        functools.partial(quote_plus, safe=""),
    )
    for encode in encoders:
        # A lone surrogate cannot be encoded: no encoder would send it either.
        with contextlib.suppress(UnicodeEncodeError):
            encoded.add(encode(secret))
    spellings = set(encoded)
    for _ in range(2):
        for text in list(spellings):
            for ensure_ascii in (True, False):
                escaped = json.dumps(text, ensure_ascii=ensure_ascii)[1:-1]
                spellings.update((escaped, escaped.replace("/", "\\/")))
            # Python's repr, as in str() of a dict or an exception's args: `'` escaped or
            # not, depending on the quotes in the whole string.
            quoted = repr("'\"" + text)[4:-1]
            spellings.update((quoted, quoted.replace("\\'", "'")))
    return sorted(spellings, key=lambda s: (-len(s), s))


def _secrets_pattern(secrets: Iterable[str]) -> re.Pattern[str] | None:
    wanted = tuple(sorted({s for s in secrets if isinstance(s, str)}))
    return _compiled_secrets(wanted) if wanted else None


@functools.lru_cache(maxsize=32)
def _compiled_secrets(secrets: tuple[str, ...]) -> re.Pattern[str] | None:
    # Cached: the log scrubber asks for the same few secrets on every line.
    spellings: set[str] = set()
    for secret in secrets:
        if len(secret) >= MIN_SECRET_LENGTH:
            spellings.update(secret_spellings(secret))
    if not spellings:
        return None
    ordered = sorted(spellings, key=lambda s: (-len(s), s))
    # Case-insensitive: percent-encoding and `\u` escapes come in either case, and removing
    # a differently cased twin of a secret costs nothing.
    return re.compile("|".join(re.escape(s) for s in ordered), re.IGNORECASE)


def redact_secrets(text: str, secrets: Iterable[str]) -> str:
    """`text` with every spelling of the known `secrets` replaced, and nothing else touched.

    For text that must stay usable, such as an answer body still to be parsed (its output
    URL is needed with its query string). Anything shown or stored goes through `redact`.
    """
    pattern = _secrets_pattern(secrets)
    return text if pattern is None else pattern.sub(REDACTED, text)


def redact_secrets_in_bytes(content: bytes, secrets: Iterable[str]) -> bytes:
    """`redact_secrets` over raw bytes; bytes that are not UTF-8 come back unchanged."""
    pattern = _secrets_pattern(secrets)
    if pattern is None:
        return content
    text = content.decode("utf-8", errors="surrogateescape")
    return pattern.sub(REDACTED, text).encode("utf-8", errors="surrogateescape")


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` without secrets, tokens, query strings or credential values.

    URLs keep their scheme, host and path (`https://host/a.csv?<redacted>`); a credential
    keeps its name (`X-Amz-Signature=<redacted>`, `"x-api-key": "<redacted>"`).
    Never raises on any str.
    """
    text = _redact_queries(_redact_jwts(redact_secrets(text, secrets)))
    text = _CREDENTIAL.sub(lambda m: f"{m.group(1)}{REDACTED}", text)
    return _BEARER.sub(lambda m: f"{m.group(1)}{REDACTED}", text)


def _redact_jwts(text: str) -> str:
    # A plain `_JWT.sub` is quadratic on text like "eyJeyJeyJ...": every start rescans the
    # same segment. A start that fails fails for every later start in its first segment
    # too (they reach the same first dot), so the scan resumes past that segment.
    pieces: list[str] = []
    done = 0
    start = text.find("eyJ")
    while start >= 0:
        match = _JWT.match(text, start)
        if match is not None:
            pieces += (text[done:start], REDACTED)
            done = match.end()
            start = text.find("eyJ", done)
        else:
            segment_end = _BASE64URL_RUN.match(text, start).end()  # type: ignore[union-attr]
            start = text.find("eyJ", max(segment_end, start + 1))
    pieces.append(text[done:])
    return "".join(pieces)


def _redact_queries(text: str) -> str:
    # Every URL start scans forward to its query or to the end of the URL. Starts that end
    # the same way share that scan: once an end is found, the search resumes past it.
    pieces: list[str] = []
    done = position = 0
    while (start := _URL_START.search(text, position)) is not None:
        stop = _QUERY_OR_END.search(text, start.end())
        if stop is None:
            break
        if stop.group(1) is None:  # the URL ended before any query
            position = stop.end()
            continue
        end = _VALUE_END.search(text, stop.end())
        query_end = len(text) if end is None else end.start()
        pieces += (text[done : stop.start()], f"?{REDACTED}")
        done = position = query_end
    pieces.append(text[done:])
    return "".join(pieces)
