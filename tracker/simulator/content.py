"""The output files' bytes, deterministic per request_id, and their checksums and ETags."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from functools import lru_cache
from typing import Final

from tracker.simulator.config import SimulatorConfig

CHUNK_SIZE: Final = 64 * 1024
# Bump when the content layout changes, so ETags of old and new content never collide.
_CONTENT_VERSION: Final = "v1"
_ROW_LEN: Final = 128
_ROWS_PER_BLOCK: Final = CHUNK_SIZE // _ROW_LEN
_BLOCK_DIGITS: Final = 8
_HEADER: Final = b"row_id,vpa,name_at_bank,status,match_score,reference\n"
# One column of identical digits per value: rewriting a block's row ids then costs a few
# strided memcpy calls instead of formatting 512 rows in Python.
_DIGIT_COLUMNS: Final = tuple(bytes([0x30 + d]) * _ROWS_PER_BLOCK for d in range(10))
_HANDLES: Final = ("asha", "ravi", "meera", "arjun", "kavya", "rohan", "divya", "vikram")
_BANKS: Final = ("okaxis", "oksbi", "okhdfcbank", "okicici", "ybl", "paytm", "ibl", "upi")
_FIRST: Final = ("ASHA", "RAVI", "MEERA", "ARJUN", "KAVYA", "ROHAN", "DIVYA", "VIKRAM")
_LAST: Final = ("SHARMA", "IYER", "REDDY", "GUPTA", "NAIR", "PATEL", "SINGH", "RAO")


@lru_cache(maxsize=256)
def _block_template(request_id: str) -> bytes:
    """512 fixed-width CSV rows for one id; each 64 KiB block stamps its number into it."""
    rows = []
    for i in range(_ROWS_PER_BLOCK):
        digest = hashlib.sha256(f"{request_id}\x00{i}".encode()).hexdigest()
        vpa = f"{_HANDLES[int(digest[0], 16) % 8]}{digest[1:7]}@{_BANKS[int(digest[7], 16) % 8]}"
        name = f"{_FIRST[int(digest[8], 16) % 8]} {_LAST[int(digest[9], 16) % 8]}"
        status = "NOT_FOUND" if int(digest[10:12], 16) < 26 else "VERIFIED"
        score = int(digest[12:14], 16) * 100 // 255
        prefix = f"{'0' * _BLOCK_DIGITS}-{i:03d},{vpa},{name},{status},{score},"
        filler = (digest * 2)[: _ROW_LEN - 1 - len(prefix)]
        row = f"{prefix}{filler}\n".encode()
        assert len(row) == _ROW_LEN
        rows.append(row)
    return b"".join(rows)


def iter_content(request_id: str, end: int, start: int = 0) -> Iterator[bytes]:
    """Bytes [start, end) of the id's content stream; a shorter file is a prefix of a longer."""
    header_len = len(_HEADER)
    pos = start
    if pos < header_len and pos < end:
        stop = min(header_len, end)
        yield _HEADER[pos:stop]
        pos = stop
    if pos >= end:
        return
    buf = bytearray(_block_template(request_id))
    block, offset = divmod(pos - header_len, CHUNK_SIZE)
    while pos < end:
        digits = b"%08d" % (block % 10**_BLOCK_DIGITS)
        for column, digit in enumerate(digits):
            buf[column::_ROW_LEN] = _DIGIT_COLUMNS[digit - 0x30]
        take = min(CHUNK_SIZE - offset, end - pos)
        yield bytes(buf[offset : offset + take]) if take != CHUNK_SIZE else bytes(buf)
        pos += take
        block += 1
        offset = 0


def output_bytes(request_id: str, size: int) -> Iterator[bytes]:
    """The deterministic output file for ``request_id``: exactly ``size`` bytes, in chunks."""
    return iter_content(request_id, size)


def expected_sha256(request_id: str, size: int) -> str:
    digest = hashlib.sha256()
    for chunk in iter_content(request_id, size):
        digest.update(chunk)
    return digest.hexdigest()


def expected_size(request_id: str, config: SimulatorConfig) -> int:
    return config.big_file_size if request_id.startswith("big-") else config.file_size


# S3's console and CLIs switch to multipart uploads for big files; their ETags are no MD5.
MULTIPART_THRESHOLD: Final = 64 * 1024 * 1024
_MULTIPART_PART: Final = 8 * 1024 * 1024


@lru_cache(maxsize=1024)
def s3_etag(request_id: str, size: int) -> str | None:
    """The file's ETag as S3 gives it: the content MD5, quoted, for a single-part object."""
    if request_id.startswith("unframed-noetag-"):
        return None
    if request_id.startswith("badetag-"):
        other = hashlib.md5(b"other bytes " + request_id.encode(), usedforsecurity=False)
        return f'"{other.hexdigest()}"'
    if size > MULTIPART_THRESHOLD:
        # Content is a pure function of (id, size, layout version): no need to hash it.
        token = hashlib.sha256(f"{_CONTENT_VERSION}\x00{request_id}\x00{size}".encode()).hexdigest()
        return f'"{token[:32]}-{-(-size // _MULTIPART_PART)}"'
    return f'"{expected_md5(request_id, size)}"'


def expected_md5(request_id: str, size: int) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    for chunk in iter_content(request_id, size):
        digest.update(chunk)
    return digest.hexdigest()
