"""Just enough PNG decoding to tell a rendered screenshot from a blank one.

Chromium's screenshots are 8-bit RGB or RGBA, non-interlaced; anything else is refused
rather than misread. The standard library's zlib inflates the image data and the five
scanline filters are undone here, so no imaging library is needed.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHANNELS = {2: 3, 6: 4}  # colour type -> bytes per pixel at bit depth 8: RGB, RGBA


@dataclass(frozen=True)
class Picture:
    width: int
    height: int
    channels: int
    rows: list[bytes]  # unfiltered scanlines, `width * channels` bytes each

    def colours(self) -> set[bytes]:
        """The distinct pixel values."""
        step = self.channels
        return {row[x : x + step] for row in self.rows for x in range(0, len(row), step)}


def decode_png(data: bytes) -> Picture:
    if not data.startswith(SIGNATURE):
        raise ValueError("not a PNG file")
    header, compressed = _chunks(data)
    width, height, depth, colour_type, _, _, interlace = struct.unpack(">IIBBBBB", header)
    if depth != 8 or colour_type not in CHANNELS or interlace != 0:
        raise ValueError(f"unsupported PNG: depth {depth}, colour type {colour_type}")
    channels = CHANNELS[colour_type]
    raw = zlib.decompress(compressed)
    stride = width * channels
    if len(raw) != height * (stride + 1):
        raise ValueError("PNG image data does not match its header")
    rows: list[bytes] = []
    previous = bytes(stride)
    for y in range(height):
        start = y * (stride + 1)
        row = _unfilter(raw[start], raw[start + 1 : start + 1 + stride], previous, channels)
        rows.append(row)
        previous = row
    return Picture(width, height, channels, rows)


def _chunks(data: bytes) -> tuple[bytes, bytes]:
    """The IHDR payload and the IDAT chunks joined."""
    position = len(SIGNATURE)
    header = b""
    image = bytearray()
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        payload = data[position + 8 : position + 8 + length]
        position += 12 + length  # length, type, payload, CRC
        if kind == b"IHDR":
            header = payload
        elif kind == b"IDAT":
            image += payload
        elif kind == b"IEND":
            break
    if not header or not image:
        raise ValueError("PNG without a header or image data")
    return header, bytes(image)


def _unfilter(kind: int, line: bytes, above: bytes, step: int) -> bytes:
    # Short cuts for the rows a screenshot is mostly made of, which make the loop below
    # rare: unfiltered, or the same as the row above.
    if kind == 0:
        return line
    if kind == 2 and not any(line):
        return above
    out = bytearray(line)
    for x in range(len(out)):
        left = out[x - step] if x >= step else 0
        up = above[x]
        corner = above[x - step] if x >= step else 0
        if kind == 1:
            out[x] = (out[x] + left) & 0xFF
        elif kind == 2:
            out[x] = (out[x] + up) & 0xFF
        elif kind == 3:
            out[x] = (out[x] + (left + up) // 2) & 0xFF
        elif kind == 4:
            out[x] = (out[x] + _paeth(left, up, corner)) & 0xFF
        elif kind != 0:
            raise ValueError(f"unknown PNG filter {kind}")
    return bytes(out)


def _paeth(left: int, up: int, corner: int) -> int:
    estimate = left + up - corner
    to_left, to_up, to_corner = abs(estimate - left), abs(estimate - up), abs(estimate - corner)
    if to_left <= to_up and to_left <= to_corner:
        return left
    return up if to_up <= to_corner else corner
