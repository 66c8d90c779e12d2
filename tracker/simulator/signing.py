"""The simulator's secrets at work: HS256 bearer tokens and presigned file URL signatures."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Signer:
    """Signs and checks with a key of its own, so a new simulator invalidates old tokens
    and URLs, as a real key rotation would (which exercises the tracker's re-authorize path)."""

    def __init__(self, client_id: str) -> None:
        self._client_id = client_id
        self._key = secrets.token_bytes(32)

    def _sign(self, data: str) -> bytes:
        return hmac.new(self._key, data.encode(), hashlib.sha256).digest()

    def make_token(self, subject: str, expires_at: int) -> str:
        header = _b64url(b'{"alg":"HS256","typ":"JWT"}')
        payload = _b64url(
            json.dumps({"sub": subject, "exp": expires_at}, separators=(",", ":")).encode()
        )
        signature = _b64url(self._sign(f"{header}.{payload}"))
        return f"{header}.{payload}.{signature}"

    def token_valid(self, token: str) -> bool:
        parts = token.split(".")
        if len(parts) != 3:
            return False
        expected = _b64url(self._sign(f"{parts[0]}.{parts[1]}"))
        if not hmac.compare_digest(expected.encode(), parts[2].encode("utf-8", "replace")):
            return False
        try:
            claims = json.loads(_b64url_decode(parts[1]))
        except (ValueError, binascii.Error):
            return False
        if not isinstance(claims, dict):
            return False
        expires_at = claims.get("exp")
        if not isinstance(expires_at, int | float) or time.time() >= expires_at:
            return False
        return bool(claims.get("sub") == self._client_id)

    def url_signature(self, name: str, date: str, expires: str) -> str:
        return hmac.new(
            self._key, f"{name}\n{date}\n{expires}".encode(), hashlib.sha256
        ).hexdigest()
