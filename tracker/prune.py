"""Deleting the output files of pruned batches, where tracker/domain/prune.py allows it."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

from tracker.domain.prune import FileVerdict, output_file_verdict


class FileRemoval(Enum):
    NO_FILE = "no file recorded"
    DELETED = "deleted"
    ALREADY_GONE = "already gone"
    KEPT = "kept"


def remove_output_file(file_path: str | None, output_dir: Path) -> FileRemoval:
    """Delete the file a pruned row names, if it lies directly in `output_dir` (resolved).

    Two things are judged, both resolved (symlinks followed): the entry that unlink()
    removes (the recorded name in its resolved directory) and what it leads to. A link
    outside the directory pointing into it, or one inside pointing out, is kept.
    """
    if not file_path:
        return FileRemoval.NO_FILE
    path = Path(file_path)
    entry = path.parent.resolve() / path.name
    for judged in (entry, path.resolve()):
        if output_file_verdict(judged, output_dir) is FileVerdict.KEEP:
            return FileRemoval.KEPT
    try:
        path.unlink()
    except FileNotFoundError:
        return FileRemoval.ALREADY_GONE
    return FileRemoval.DELETED
