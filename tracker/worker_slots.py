"""The sweep's worker slots (TRACKER_CONCURRENCY): how many batches may be worked at once."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class WorkerSlots:
    """TRACKER_CONCURRENCY worker slots. A batch holds one while its status call is in
    flight, and while, found complete, it waits for a download slot; not while its result
    is being written (the group commit batches those) nor while its file downloads."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.taken = 0
        self._freed: asyncio.Future[None] | None = None

    def free(self) -> int:
        return self.size - self.taken

    def take(self) -> Callable[[], None]:
        """Take a slot; the function returned gives it back (once, however often called)."""
        self.taken += 1
        held = True

        def give_back() -> None:
            nonlocal held
            if held:
                held = False
                self.taken -= 1
                if self._freed is not None and not self._freed.done():
                    self._freed.set_result(None)

        return give_back

    def freed(self) -> asyncio.Future[None]:
        """Done when a slot is given back (the sweep loop waits on it beside its tasks)."""
        if self._freed is None or self._freed.done():
            self._freed = asyncio.get_running_loop().create_future()
        return self._freed
