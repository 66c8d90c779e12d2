"""The names of download temp files: `.<request_id>.<ext>.<tag>.part` in the output directory.

Hidden, so that nothing watching the directory takes a partial file for an output file;
the tag keeps fetches (and processes sharing the directory) apart. A request_id holds no
dot and the tag never does, so the name says whose file it is: request "a" never claims
the temp files of request "a.csv".
"""

from __future__ import annotations

import re

from tracker.domain.request_ids import REQUEST_ID_PATTERN
from tracker.domain.urls import OUTPUT_EXTENSIONS

__all__ = ["temp_file_request_id", "temp_name"]

_SUFFIX = ".part"
_TEMP_NAME = re.compile(
    rf"\.(?P<request_id>{REQUEST_ID_PATTERN.pattern})"
    r"\.(?:" + "|".join(map(re.escape, OUTPUT_EXTENSIONS)) + r")"
    r"\.[^./]+" + re.escape(_SUFFIX)
)


def temp_name(request_id: str, extension: str, tag: str) -> str:
    """The temp file name of one fetch; `tag` (no dot) is unique to that fetch."""
    return f".{request_id}.{extension}.{tag}{_SUFFIX}"


def temp_file_request_id(name: str) -> str | None:
    """The batch a temp file name belongs to, or None if it is not a download temp file."""
    match = _TEMP_NAME.fullmatch(name)
    return None if match is None else match.group("request_id")
