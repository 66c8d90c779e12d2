"""Durations as people write them: "30", "0.5", "90s", "15m", "1h30m", "1.5h", "7d", "2w".

A bare number is seconds (fractions allowed), so every setting that took seconds before
still reads the same. Units are s, m, h, d and w, each used at most once and from largest
to smallest ("1h30m", not "30m1h" or "1m1m"): a repeated or reversed unit is far more
likely a typo than an intent. Pure: no I/O.
"""

from __future__ import annotations

import math
import re

__all__ = ["UNIT_SECONDS", "format_duration", "parse_duration"]

UNIT_SECONDS: dict[str, int] = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}
_UNIT_ORDER = "wdhms"
_UNITS_TEXT = "s, m, h, d or w"
_EXAMPLES = "e.g. 30, 0.5, 90s, 15m, 1h30m, 1.5h, 7d"

# A bare number keeps float()'s exponent form ("1e+16") because TOML floats reach the
# parser through str(); signs, "nan", "inf" and "1_000" are refused before float() sees them.
_PLAIN_NUMBER = re.compile(r"(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_AMOUNT = r"[0-9]+\.?[0-9]*|\.[0-9]+"
# One "<amount><unit>" part; whitespace between parts is allowed ("1h 30m").
_PART = re.compile(rf"\s*({_AMOUNT})\s*([A-Za-z]+)")


def parse_duration(text: str) -> float:
    """Seconds meant by `text`, or ValueError saying what is wrong (never naming a setting)."""
    stripped = text.strip()
    if not stripped:
        raise ValueError(f"is empty: expected a duration ({_EXAMPLES})")
    if stripped.startswith("-"):
        raise ValueError("must not be negative")
    if _PLAIN_NUMBER.fullmatch(stripped):
        return _finite(float(stripped))

    total = 0.0
    position = 0
    last_unit_rank = -1
    while position < len(stripped):
        part = _PART.match(stripped, position)
        if part is None:
            rest = stripped[position:].strip()
            if re.fullmatch(_AMOUNT, rest):
                raise ValueError(f"{rest!r} has no unit: use {_UNITS_TEXT} ({_EXAMPLES})")
            raise ValueError(
                f"cannot read {rest!r}: expected a number of seconds or amounts with units "
                f"{_UNITS_TEXT} ({_EXAMPLES})"
            )
        amount, unit = part.groups()
        if unit not in UNIT_SECONDS:
            raise ValueError(f"unknown unit {unit!r}: use {_UNITS_TEXT} ({_EXAMPLES})")
        rank = _UNIT_ORDER.index(unit)
        if rank <= last_unit_rank:
            raise ValueError(
                f"unit {unit!r} is repeated or out of order: write units from largest to "
                "smallest, each once (e.g. 1d12h, 1h30m)"
            )
        last_unit_rank = rank
        total += float(amount) * UNIT_SECONDS[unit]
        position = part.end()
    return _finite(total)


def _finite(seconds: float) -> float:
    if not math.isfinite(seconds):
        raise ValueError("is too large")
    return seconds


def format_duration(seconds: float) -> str:
    """A compact text that `parse_duration` reads back: 5400 -> "1h30m", 0.5 -> "0.5s".

    Whole units down to minutes, then seconds with any fraction; meant for showing ages
    and intervals to people, so the largest unit is days (weeks read worse: "1w2d").
    """
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"cannot format {seconds!r} as a duration")
    whole = int(seconds)
    fraction = seconds - whole
    parts: list[str] = []
    for unit in "dhm":
        count, whole = divmod(whole, UNIT_SECONDS[unit])
        if count:
            parts.append(f"{count}{unit}")
    if fraction:
        # Rounded so float noise ("1.4999999999") does not reach a person's screen.
        parts.append(f"{round(whole + fraction, 3):g}s")
    elif whole or not parts:
        parts.append(f"{whole}s")
    return "".join(parts)
