"""The list page's keyset cursor: where the next page starts, opaque to the reader.

It carries the last id shown. It is no secret and needs no signature: a forged cursor only
starts a page elsewhere. Anything that does not decode to a positive id is refused.
"""

from __future__ import annotations

import base64
import binascii

_PREFIX = "id:"
# The largest id either backend's integer key can hold; anything longer is not a cursor.
_MAX_LENGTH = 40


class BadCursor(ValueError):
    """The cursor was not made by this console."""


def encode_cursor(last_id: int) -> str:
    raw = f"{_PREFIX}{last_id}".encode("ascii")
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_cursor(text: str) -> int:
    """The id a page of the list starts below; BadCursor for anything else."""
    if not text or len(text) > _MAX_LENGTH or not text.isascii():
        raise BadCursor("not a cursor")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode("ascii")
    except (binascii.Error, ValueError):
        raise BadCursor("not a cursor") from None
    number = raw.removeprefix(_PREFIX)
    if number == raw or not (number.isascii() and number.isdigit()) or int(number) <= 0:
        raise BadCursor("not a cursor")
    return int(number)
