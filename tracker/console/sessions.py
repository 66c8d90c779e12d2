"""Browser sessions after the login form: random ids kept in memory, never the token.

A cookie that held the token would hand it to anything that reads cookies. A restart of the
console logs everyone out, which costs one login.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable

# How long a login lasts.
SESSION_LIFETIME = 8 * 3600.0
# Logins need the token, so only its holders open sessions; the bound keeps memory flat
# however often they do.
MAX_SESSIONS = 1000


class Sessions:
    """Session ids and when each expires; the oldest is dropped beyond `limit`."""

    def __init__(
        self,
        *,
        lifetime: float = SESSION_LIFETIME,
        limit: int = MAX_SESSIONS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lifetime = lifetime
        self._limit = limit
        self._clock = clock
        self._expiry: OrderedDict[str, float] = OrderedDict()

    def open(self) -> str:
        session_id = secrets.token_urlsafe(32)
        self._expiry[session_id] = self._clock() + self.lifetime
        while len(self._expiry) > self._limit:
            self._expiry.popitem(last=False)
        return session_id

    def is_open(self, session_id: str) -> bool:
        expires = self._expiry.get(session_id)
        if expires is None:
            return False
        if expires <= self._clock():
            del self._expiry[session_id]
            return False
        return True

    def close(self, session_id: str) -> None:
        self._expiry.pop(session_id, None)
