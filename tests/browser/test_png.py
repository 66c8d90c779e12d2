"""The screenshot decoder (png.py) against PNGs built here with each scanline filter."""

from __future__ import annotations

import struct
import zlib

import pytest

from tests.browser.png import decode_png

# 3 x 2 RGB pixels, every channel different, so that a wrong neighbour shows.
ROWS = [
    bytes([10, 200, 30, 250, 5, 60, 128, 129, 130]),
    bytes([0, 255, 7, 99, 98, 97, 1, 2, 3]),
]


def _paeth(left: int, up: int, corner: int) -> int:
    estimate = left + up - corner
    distances = [abs(estimate - left), abs(estimate - up), abs(estimate - corner)]
    return (left, up, corner)[distances.index(min(distances))]


def _filtered(kind: int, row: bytes, above: bytes, step: int = 3) -> bytes:
    """The encoder's side of filter `kind` (PNG specification, section 9)."""
    out = bytearray()
    for x, value in enumerate(row):
        left = row[x - step] if x >= step else 0
        up = above[x]
        corner = above[x - step] if x >= step else 0
        predicted = [0, left, up, (left + up) // 2, _paeth(left, up, corner)][kind]
        out.append((value - predicted) & 0xFF)
    return bytes(kind.to_bytes()) + bytes(out)


def _chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload)
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def _png(kind: int, rows: list[bytes] = ROWS, colour_type: int = 2) -> bytes:
    width = len(rows[0]) // 3
    header = struct.pack(">IIBBBBB", width, len(rows), 8, colour_type, 0, 0, 0)
    above = bytes(len(rows[0]))
    raw = b""
    for row in rows:
        raw += _filtered(kind, row, above)
        above = row
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(raw))
        + _chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("kind", [0, 1, 2, 3, 4])
def test_each_filter_decodes_to_the_pixels(kind: int) -> None:
    picture = decode_png(_png(kind))
    assert (picture.width, picture.height, picture.channels) == (3, 2, 3)
    assert picture.rows == ROWS
    assert len(picture.colours()) == 6


def test_one_colour_is_counted_once() -> None:
    grey = bytes([200, 200, 200] * 3)
    assert decode_png(_png(2, [grey, grey])).colours() == {bytes([200, 200, 200])}


def test_what_it_cannot_read_is_refused() -> None:
    with pytest.raises(ValueError, match="not a PNG"):
        decode_png(b"GIF89a")
    with pytest.raises(ValueError, match="unsupported"):
        decode_png(_png(0, colour_type=0))
