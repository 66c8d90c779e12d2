"""Which output files `tracker prune --files` may delete: only files directly in the output
directory, whatever a row says."""

from __future__ import annotations

from enum import Enum
from pathlib import PurePath


class FileVerdict(Enum):
    """Whether a pruned batch's output file may be deleted, and why."""

    DELETE = "directly in the output directory"
    KEEP = "not in the output directory"


def output_file_verdict(path: PurePath, output_dir: PurePath) -> FileVerdict:
    """Delete `path` only if it names an entry directly in `output_dir`.

    Both are as the filesystem resolves them (absolute, symlinks followed): the caller
    resolves, so a link in the directory that points elsewhere is judged by its target.
    A relative path, or one still holding "..", is kept: it could name anything.
    """
    if not path.is_absolute() or ".." in path.parts or path.parent != output_dir:
        return FileVerdict.KEEP
    return FileVerdict.DELETE
