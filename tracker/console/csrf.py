"""CSRF tokens: one per session, derived with HMAC from a key the process draws at start.

Every POST form carries the token in a hidden field and every POST is checked, so another
site cannot make a logged-in browser retry, cancel or log out. Nothing is stored: the token
is recomputed from the session's identity.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

FIELD = "csrf"


class CsrfTokens:
    def __init__(self, key: bytes | None = None) -> None:
        self._key = key if key is not None else secrets.token_bytes(32)

    def for_identity(self, identity: str) -> str:
        return hmac.new(self._key, identity.encode("utf-8"), hashlib.sha256).hexdigest()

    def matches(self, identity: str, given: str | None) -> bool:
        if not given:
            return False
        expected = self.for_identity(identity).encode("ascii")
        return hmac.compare_digest(given.encode("utf-8", errors="surrogateescape"), expected)
