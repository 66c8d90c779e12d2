"""Bytes onto disk durably: a temp file written and hashed as they arrive, fsynced before
it is renamed, and the directory fsync that makes renames made together durable.

A big file is hashed and written by a worker thread while the event loop receives the
next bytes (hashlib and os.write release the GIL), so the tracker keeps up with the
network. A small file, the common case by far, is written on the event loop with no
thread hop per chunk.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import threading
from collections import deque
from contextlib import suppress
from pathlib import Path
from typing import Any

__all__ = ["DirectorySync", "TempFile", "is_unwritable"]

# Up to this many bytes of a file are written and hashed on the event loop: a thread hop
# costs more than writing a small file, and most output files are small.
_INLINE_BYTES = 1 << 20
# Bytes received while the writer thread is busy with the previous ones; past this, the
# event loop waits for the writer (and aiohttp stops reading the socket), which keeps the
# daemon's memory bounded whatever the network's speed against the disk's.
_QUEUE_BYTES = 2 << 20
_BATCH_BYTES = 1 << 20
# Every this many bytes the writer asks the kernel to start writing the file back, so
# that the fsync before publishing waits for the last few MiB instead of the whole file.
_WRITEBACK_BYTES = 8 << 20
_FADV_DONTNEED: int | None = getattr(os, "POSIX_FADV_DONTNEED", None)  # not on macOS
# The file system cannot take the file: an operator must act (free space, fix
# permissions, remount); whatever was being written is not at fault.
_UNWRITABLE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
)


def is_unwritable(error: OSError) -> bool:
    """Whether `error` says the file system refuses the bytes (full, quota, read-only...)."""
    return error.errno in _UNWRITABLE_ERRNOS


class TempFile:
    """The temp file of one fetch: its bytes written and hashed in the order received.

    The first `_INLINE_BYTES` are written and hashed on the event loop. Past that a
    `_Writer` thread takes over, so that hashing and disk writes overlap with receiving
    the next bytes (hashlib and os.write release the GIL).

    The descriptor is closed by whoever is last to use it: a cancelled fetch cannot wait
    for a thread still writing or syncing, and closing the descriptor under that thread
    could make it write into whatever file gets the same number next.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.size = 0  # bytes accepted; all of them are in the file unless an error is raised
        self.hasher = hashlib.sha256()
        # The MD5 of the bytes, kept only while the file host's ETag is one to check it by.
        self.md5: hashlib._Hash | None = None
        self._writer: _Writer | None = None
        self._batch: list[bytes] = []  # chunks not yet handed to the writer
        self._batch_size = 0
        self._lock = threading.Lock()
        self._threads_using_fd = 0
        self._close_requested = False
        self._closed = False

    async def write(self, chunk: bytes) -> None:
        if self._writer is None and self.size + len(chunk) <= _INLINE_BYTES:
            _write_all(self.fd, chunk)
            self.hasher.update(chunk)
            if self.md5 is not None:
                self.md5.update(chunk)
            self.size += len(chunk)
            return
        self.size += len(chunk)
        self._batch.append(chunk)
        self._batch_size += len(chunk)
        if self._batch_size >= _BATCH_BYTES:
            await self._hand_over()

    async def drain(self) -> None:
        """Wait until every accepted byte is hashed and in the file (raises OSError)."""
        if self._batch:
            await self._hand_over()
        writer, self._writer = self._writer, None
        if writer is not None:
            await writer.finish()

    async def restart(self) -> None:
        await self.drain()
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)
        self.size = 0
        self.hasher = hashlib.sha256()
        self.md5 = None

    def track_md5(self) -> None:
        """Hash MD5 too, from here on; called while the file is still empty."""
        self.md5 = hashlib.md5(usedforsecurity=False)

    async def md5_hexdigest(self) -> str | None:
        """The MD5 of every accepted byte (None when not tracked); waits for the writer."""
        await self.drain()
        return self.written_md5()

    def written_sha256(self) -> str:
        """The SHA-256 of the bytes written so far: of them all, once drained or closed."""
        return self.hasher.hexdigest()

    def written_md5(self) -> str | None:
        """The MD5 of the bytes written so far (None when not tracked)."""
        return None if self.md5 is None else self.md5.hexdigest()

    async def close_durably(self) -> int:
        """fsync and close the file; return its length on disk."""
        await self.drain()
        self.lend_fd()
        # fsync can take long on a big file: in a thread, so the event loop stays responsive.
        # Shielded: a cancelled fetch leaves the thread to finish, and to close the file.
        job = asyncio.get_running_loop().run_in_executor(None, self._sync_and_close)
        job.add_done_callback(_mark_retrieved)
        return await asyncio.shield(job)

    def discard(self) -> None:
        """Close the descriptor now, or when the last thread using it is done."""
        if self._writer is not None:
            self._writer.abandon()
            self._writer = None
        with self._lock:
            if self._closed:
                return
            if self._threads_using_fd:
                self._close_requested = True
                return
            self._closed = True
        os.close(self.fd)

    def lend_fd(self) -> None:
        """Called on the event loop before a thread starts using the descriptor."""
        with self._lock:
            self._threads_using_fd += 1

    def return_fd(self, *, close: bool = False) -> None:
        """Called by that thread when done with it (`close`: it is done with the file)."""
        with self._lock:
            self._threads_using_fd -= 1
            close = (close or self._close_requested) and not self._closed
            if close:
                self._closed = True
        if close:
            os.close(self.fd)

    async def _hand_over(self) -> None:
        # Chunks go over in batches of about a MiB: one thread wake-up per batch rather
        # than per socket read, which costs less CPU per byte.
        batch, size = self._batch, self._batch_size
        self._batch, self._batch_size = [], 0
        if self._writer is None:
            self._writer = _Writer(self, asyncio.get_running_loop(), offset=self.size - size)
        await self._writer.put(batch, size)

    def _sync_and_close(self) -> int:
        try:
            os.fsync(self.fd)
            return os.fstat(self.fd).st_size
        finally:
            self.return_fd(close=True)


class _Writer:
    """A thread that hashes and writes a temp file's bytes, in order, as they arrive.

    A thread of its own for the whole body, not a job per chunk in the shared executor:
    handing each chunk over as a new job left the thread idle while the event loop
    noticed the previous job's end. The queue is bounded: when it is full the event loop
    waits (and aiohttp stops reading the socket), so memory stays flat whatever the
    network's speed against the disk's. (Hashing in a second thread, beside the writing
    one, used more CPU per GiB and was no faster on two busy cores.)
    """

    def __init__(self, file: TempFile, loop: asyncio.AbstractEventLoop, *, offset: int) -> None:
        self._file = file
        self._loop = loop
        self._batches: deque[tuple[list[bytes], int]] = deque()
        self._queued = 0
        self._wake = threading.Condition(threading.Lock())
        self._room: asyncio.Future[None] | None = None  # the event loop waits for room
        self._stopping = False
        self._error: OSError | None = None
        self._finished: asyncio.Future[None] = loop.create_future()
        self._written = self._written_back = offset  # where the file ends, for writeback
        file.lend_fd()
        threading.Thread(target=self._run, name="download-writer", daemon=True).start()

    async def put(self, batch: list[bytes], size: int) -> None:
        if self._error is not None:
            raise self._error
        with self._wake:
            self._batches.append((batch, size))
            self._queued += size
            self._wake.notify()
            if self._queued < _QUEUE_BYTES:
                return
            room = self._room = self._loop.create_future()
        await room
        if self._error is not None:
            raise self._error

    async def finish(self) -> None:
        """Let the thread work through the queue, then end; raise its error if it had one."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        await asyncio.shield(self._finished)
        if self._error is not None:
            raise self._error

    def abandon(self) -> None:
        """End the thread after the batch in hand; what is still queued is dropped."""
        with self._wake:
            self._batches.clear()
            self._stopping = True
            self._wake.notify()

    def _run(self) -> None:
        try:
            while (item := self._next_batch()) is not None:
                batch, size = item
                if self._error is None:
                    try:
                        for chunk in batch:
                            self._write(chunk)
                    except OSError as exc:
                        self._error = exc  # raised on the event loop; the rest is dropped
                with self._wake:
                    self._queued -= size
                    room = self._room
                    if room is not None and (
                        self._queued <= _QUEUE_BYTES // 2 or self._error is not None
                    ):
                        self._room = None
                        self._call_soon(room)
        finally:
            self._file.return_fd()
            self._call_soon(self._finished)

    def _next_batch(self) -> tuple[list[bytes], int] | None:
        with self._wake:
            while not self._batches and not self._stopping:
                self._wake.wait()
            return self._batches.popleft() if self._batches else None

    def _write(self, chunk: bytes) -> None:
        file = self._file
        file.hasher.update(chunk)
        if file.md5 is not None:
            file.md5.update(chunk)
        _write_all(file.fd, chunk)
        self._written += len(chunk)
        behind = self._written - self._written_back
        if behind >= _WRITEBACK_BYTES and _FADV_DONTNEED is not None:
            # On dirty pages DONTNEED starts their writeback without waiting for it: the
            # disk works while the network does, the kernel never throttles us for having
            # too much dirty data, and the fsync before publishing has only the last few
            # MiB left.
            os.posix_fadvise(file.fd, self._written_back, behind, _FADV_DONTNEED)
            self._written_back = self._written

    def _call_soon(self, future: asyncio.Future[None]) -> None:
        # RuntimeError: the event loop is closed, nobody is waiting any more.
        with suppress(RuntimeError):
            self._loop.call_soon_threadsafe(_resolve, future)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _write_all(fd: int, chunk: bytes) -> None:
    written = os.write(fd, chunk)
    if written < len(chunk):
        view = memoryview(chunk)[written:]
        while view:
            view = view[os.write(fd, view) :]


class DirectorySync:
    """Directory fsyncs shared by the renames that happen together (a group commit).

    A rename is durable once a directory fsync that started after it has finished. A
    caller that finds an fsync already running cannot use that one (it may have started
    before the rename), so it waits for the next, which starts when the running one ends
    and serves every rename made meanwhile: N files published together cost two fsyncs,
    not N.
    """

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running: asyncio.Future[None] | None = None
        self._next: asyncio.Future[None] | None = None

    async def after_rename(self) -> None:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new event loop (tests): nothing carries over
            self._loop, self._running, self._next = loop, None, None
        if self._running is None:
            round_ = self._start(loop)
        else:
            if self._next is None:
                self._next = loop.create_future()
                self._next.add_done_callback(_mark_retrieved)
            round_ = self._next
        # Shielded: a cancelled waiter must not cancel the fsync the others wait for.
        await asyncio.shield(round_)

    def _start(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        running = loop.run_in_executor(None, _fsync_directory, self._directory)
        self._running = running
        running.add_done_callback(self._finished)
        return running

    def _finished(self, done: asyncio.Future[None]) -> None:
        _mark_retrieved(done)
        if self._running is not done:
            return  # from an abandoned event loop
        self._running = None
        waiting, self._next = self._next, None
        if waiting is None or self._loop is None:
            return
        following = self._start(self._loop)
        following.add_done_callback(lambda finished: _copy_outcome(finished, waiting))


def _mark_retrieved(future: asyncio.Future[Any]) -> None:
    # Every waiter may have been cancelled; an fsync error must not then be reported as
    # "never retrieved" by asyncio.
    if not future.cancelled():
        future.exception()


def _copy_outcome(source: asyncio.Future[None], target: asyncio.Future[None]) -> None:
    if target.done():
        return
    if source.cancelled():
        target.cancel()
    elif (error := source.exception()) is not None:
        target.set_exception(error)
    else:
        target.set_result(None)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
