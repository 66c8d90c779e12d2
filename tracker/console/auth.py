"""Who may see the console: the token as a bearer header, or a session from the login form.

The token is compared in constant time and never logged or echoed. A request that is not
authenticated is sent to the login page when a person's browser asked for a page, and gets
a 401 otherwise (a script, or a wrong bearer token).
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass

from aiohttp import web

from tracker.console.sessions import Sessions

SESSION_COOKIE = "tracker_console_session"
# A bearer caller has no session; every bearer request shares this identity (for CSRF).
BEARER_IDENTITY = "bearer"
# Where a login may send the browser next: a path on this console, nothing else
# (no scheme, no host, no "//evil.example", no backslash tricks).
_LOCAL_PATH = re.compile(r"/(?![/\\])[A-Za-z0-9/_.~%?=&+-]{0,512}")


@dataclass(frozen=True)
class Identity:
    """An authenticated requester: "bearer", or the id of its session."""

    name: str
    session_id: str | None = None


class Authenticator:
    def __init__(self, token: str, sessions: Sessions) -> None:
        self._token = token.encode("utf-8")
        self._sessions = sessions

    @property
    def session_lifetime(self) -> float:
        return self._sessions.lifetime

    def open_session(self) -> str:
        """A new session after a good login; its id goes into the cookie."""
        return self._sessions.open()

    def close_session(self, session_id: str) -> None:
        self._sessions.close(session_id)

    def token_matches(self, given: str) -> bool:
        return hmac.compare_digest(given.encode("utf-8", errors="surrogateescape"), self._token)

    def identify(self, request: web.Request) -> Identity | None:
        """The requester, if the bearer token or a live session cookie says who it is.

        A wrong Authorization header is not rescued by a cookie: what the caller meant to
        use failed.
        """
        header = request.headers.get("Authorization")
        if header is not None:
            scheme, _, given = header.partition(" ")
            if scheme.lower() == "bearer" and self.token_matches(given.strip()):
                return Identity(BEARER_IDENTITY)
            return None
        session_id = request.cookies.get(SESSION_COOKIE)
        if session_id and self._sessions.is_open(session_id):
            return Identity(f"session:{session_id}", session_id)
        return None


def wants_login_page(request: web.Request) -> bool:
    """A browser asking for a page, not a script: send it to the login form."""
    if "Authorization" in request.headers or request.method not in ("GET", "HEAD"):
        return False
    return "text/html" in request.headers.get("Accept", "")


def local_path(candidate: str | None) -> str:
    """`candidate` if it is a path on this console, else "/"."""
    if candidate and _LOCAL_PATH.fullmatch(candidate):
        return candidate
    return "/"
