"""Stale download temp files: partial KYC data that no download will ever finish.

A download writes `.<request_id>.<ext>.<tag>.part` (tracker.domain.temp_names) in the
output directory and removes it whatever happens, and the next download of the batch
removes an earlier fetch's leftovers.
A temp file still survives a crash (kill -9, power cut) followed by anything but a new
download of the same batch on the same directory: the batch fails, is cancelled, or is
downloaded again by another host. Such a file is stale once it is older than the download
deadline (no fetch runs longer) and its batch holds no live lease (nobody is downloading
it now). The daemon removes stale files when it starts and every few minutes, and so does
`tracker prune --files`.

Only names of that exact shape directly in the output directory are considered; a symlink
or a directory is never followed nor removed, and nothing outside the directory is touched
(every call works through one descriptor of the directory).
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import structlog

from tracker.domain.temp_names import temp_file_request_id

log = structlog.get_logger("tracker.leftovers")


class LeaseReader(Protocol):
    def leased_request_ids(self, request_ids: Collection[str]) -> set[str]: ...


@dataclass(frozen=True)
class StaleTempFile:
    name: str
    request_id: str
    age: float
    size: int


def find_stale_temp_files(
    directory: Path, older_than: float, *, now: float | None = None
) -> list[StaleTempFile]:
    """Regular temp files directly in `directory` last modified `older_than` seconds ago."""
    with _opened(directory) as fd:
        return [] if fd is None else _stale_in(fd, older_than, now)


def remove_stale_temp_files(
    directory: Path, store: LeaseReader, older_than: float, *, now: float | None = None
) -> list[StaleTempFile]:
    """Remove the stale temp files whose batch is not leased now; those removed."""
    with _opened(directory) as fd:
        if fd is None:
            return []
        stale = _stale_in(fd, older_than, now)
        if not stale:
            return []
        leased = store.leased_request_ids({file.request_id for file in stale})
        removed: list[StaleTempFile] = []
        for file in stale:
            if file.request_id in leased:
                continue
            try:
                # Checked again just before: only ever a regular file, never a link's target.
                if not stat.S_ISREG(os.stat(file.name, dir_fd=fd, follow_symlinks=False).st_mode):
                    continue
                os.unlink(file.name, dir_fd=fd)
            except FileNotFoundError:
                continue  # removed meanwhile (another instance, or its own download)
            except OSError as error:
                log.warning(
                    "leftovers.not_removed",
                    file=file.name,
                    directory=str(directory),
                    error=error.strerror or type(error).__name__,
                )
                continue
            removed.append(file)
            log.info(
                "leftovers.removed",
                request_id=file.request_id,
                file=file.name,
                age=round(file.age),
                size=file.size,
            )
        return removed


@contextmanager
def _opened(directory: Path) -> Iterator[int | None]:
    """A descriptor of `directory` (None if it does not exist), closed again after."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        yield None
        return
    try:
        yield fd
    finally:
        os.close(fd)


def _stale_in(fd: int, older_than: float, now: float | None) -> list[StaleTempFile]:
    now = time.time() if now is None else now
    stale: list[StaleTempFile] = []
    with os.scandir(fd) as entries:
        for entry in entries:
            request_id = temp_file_request_id(entry.name)
            if request_id is None:
                continue
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(info.st_mode):
                continue
            age = now - info.st_mtime
            if age >= older_than:
                stale.append(StaleTempFile(entry.name, request_id, age, info.st_size))
    return sorted(stale, key=lambda file: file.name)
