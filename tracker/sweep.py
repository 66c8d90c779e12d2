"""One pass over the due batches: claim -> ask Deepvue -> decide -> write back -> download.

The APScheduler job and `tracker sweep` both call `Sweeper.sweep`. Network calls run with
no transaction open; every write goes through a group commit so that many workers
finishing together share one transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
import structlog

from tracker.db import describe_db_error
from tracker.deepvue import AuthFailed, CallsPaused, DeepvueClient
from tracker.domain.model import DownloadProblem, PollPolicy, Tracked
from tracker.domain.policy import (
    decide_before_call,
    decide_on_answer,
    decide_on_download_done,
    decide_on_download_problem,
)
from tracker.domain.schedule import BudgetView, LoadHistory
from tracker.domain.states import State
from tracker.domain.urls import redact_url
from tracker.download import (
    Downloader,
    DownloadError,
    DownloadRefused,
    OutputUnwritable,
    OwnershipLost,
    UrlExpired,
)
from tracker.store import (
    BatchWrite,
    LeaseExtension,
    Store,
    StoredFile,
    WriteRefused,
    connection_lost,
)

if TYPE_CHECKING:
    from tracker.metrics import Metrics

log = structlog.get_logger("tracker.sweep")

BUDGET_VIEW_SECONDS = 60.0
# How often a sweep kept going by downloads looks for batches that fell due meanwhile.
LOOK_AGAIN_SECONDS = 1.0
DAY_SECONDS = 86400.0


def utcnow() -> datetime:
    return datetime.now(UTC)


class GroupCommit:
    """Writes (and lease keep-alives) from concurrent workers, committed together while the
    previous commit runs.

    A worker awaits its own write and learns whether it still held its lease (or, with
    WriteRefused, that this one write could not be applied). While one
    transaction is in flight the next writes queue up and go in the following one, so
    commits stay few under load and immediate when idle.

    When the database is unreachable the group is retried with backoff for up to
    `outage_patience` seconds, so a restart of PostgreSQL delays transitions instead of
    losing them. Retrying is safe: every write is guarded by its lease token and the state
    it read, so a write that did commit before the connection dropped cannot apply twice.
    """

    def __init__(
        self,
        store: Store,
        clock: Callable[[], datetime],
        *,
        max_group: int = 256,
        outage_patience: float = 60.0,
    ) -> None:
        self._store = store
        self._clock = clock
        self._max_group = max_group
        self._outage_patience = outage_patience
        self._queue: list[tuple[BatchWrite | LeaseExtension, asyncio.Future[bool]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def write(self, write: BatchWrite | LeaseExtension) -> bool:
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queue.append((write, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        while self._queue:
            group = self._queue[: self._max_group]
            del self._queue[: self._max_group]
            try:
                applied = await self._apply_with_retry([write for write, _ in group])
            except Exception as error:
                for _, future in group:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, future), outcome in zip(group, applied, strict=True):
                if future.done():
                    continue
                if isinstance(outcome, WriteRefused):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)

    async def _apply_with_retry(
        self, writes: list[BatchWrite | LeaseExtension]
    ) -> list[bool | WriteRefused]:
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self._outage_patience
        delay = 0.5
        while True:
            try:
                return await asyncio.to_thread(self._store.apply, writes, self._clock())
            except sa.exc.DBAPIError as error:
                if not connection_lost(error) or loop.time() + delay > give_up_at:
                    raise
                log.warning(
                    "db.unreachable",
                    retry_in=delay,
                    writes=len(writes),
                    error=describe_db_error(error),
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)


@dataclass(frozen=True)
class _Download:
    """A checked batch whose file is to be fetched now; it holds a download slot."""

    batch: Tracked
    url: str
    log: structlog.BoundLogger
    # An earlier fetch of this batch may have been killed and left a temp file behind.
    leftovers_possible: bool


class _WorkerSlots:
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


@dataclass
class _InFlight:
    """The tasks of one sweep: checks (each holds a worker slot) and downloads."""

    checking: dict[asyncio.Task[_Download | None], Tracked] = field(default_factory=dict)
    downloading: dict[asyncio.Task[None], Tracked] = field(default_factory=dict)
    # Claimed, with a call permit reserved, waiting for a worker slot.
    backlog: deque[Tracked] = field(default_factory=deque)

    def any(self) -> bool:
        return bool(self.checking or self.downloading or self.backlog)

    def tasks(self) -> list[asyncio.Task[Any]]:
        return [*self.checking, *self.downloading]

    def items(self) -> list[tuple[asyncio.Task[Any], Tracked]]:
        return [*self.checking.items(), *self.downloading.items()]

    def finished(self, task: asyncio.Task[Any]) -> _Download | BaseException | None:
        """Forget a task that is done; what it left: a download to start, an error, or None."""
        self.checking.pop(task, None)
        self.downloading.pop(task, None)
        if task.cancelled():
            return None
        error = task.exception()
        if error is not None:
            return error
        result = task.result()
        return result if isinstance(result, _Download) else None

    def clear(self) -> None:
        self.checking.clear()
        self.downloading.clear()
        self.backlog.clear()


@dataclass
class SweepReport:
    claimed: int = 0
    checked: int = 0
    transitions: int = 0
    downloaded: int = 0
    conflicts: int = 0
    errors: int = 0
    auth_failed: bool = False
    # A 429's pause (or an exhausted budget) stopped the checks; what was claimed went back.
    paused: bool = False


class Sweeper:
    def __init__(
        self,
        *,
        store: Store,
        client: DeepvueClient,
        downloader: Downloader,
        policy: PollPolicy,
        owner: str,
        concurrency: int,
        lease_seconds: float,
        download_concurrency: int | None = None,
        shutdown_grace: float,
        rng: random.Random | None = None,
        clock: Callable[[], datetime] = utcnow,
        max_quota_wait: float = 5.0,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.client = client
        self.downloader = downloader
        self.policy = policy
        self.owner = owner
        self.concurrency = concurrency
        # Downloads run beside the checks, not in their slots: a long file must not stop
        # status checks, and a check must not wait for another batch's file.
        self.download_slots = asyncio.Semaphore(download_concurrency or concurrency)
        self.lease_seconds = lease_seconds
        self.shutdown_grace = shutdown_grace
        self.rng = rng or random.Random()
        self.clock = clock
        self.max_quota_wait = max_quota_wait
        self.metrics = metrics
        self._view: BudgetView | None = None
        self._view_taken = -math.inf
        self.stopping = asyncio.Event()
        # Grows whenever work moves (a claim, a finished batch, a download's keep-alive), so
        # the daemon can tell a long but healthy sweep from a wedged one.
        self.progress = 0
        self._commit = GroupCommit(store, clock)
        self._orphaned_leases = False
        self._auth_backoff = 0.0

    async def sweep(self) -> SweepReport:
        """Work every batch that is due now, then return.

        Claims happen in small bites as worker slots free up, never more than the rate
        limit lets start now, so no batch sits leased while waiting for quota.
        """
        if self._orphaned_leases:
            # An earlier sweep lost the database while holding leases; sweeps never overlap,
            # so none of that work is in flight now: hand them back instead of waiting out
            # the lease (TRACKER_LEASE_DURATION, 5 minutes by default).
            released = await asyncio.to_thread(self.store.release_owned, self.owner)
            self._orphaned_leases = False
            if released:
                log.warning("sweep.released_orphaned_leases", batches=released)
        report = SweepReport()
        self._view = await self._budget_view()
        # Check tasks hold the worker slots. One that finds a file waits for a download
        # slot, then hands the batch to a download task, which runs on outside the worker
        # slots: a long file must not hold up status checks of other batches.
        work = _InFlight()
        slots = _WorkerSlots(self.concurrency)
        throttle = self.client.throttle
        # Claims run beside the work, so that slots freed meanwhile are refilled from the
        # batches claimed ahead (a quarter of the slots) instead of waiting for a claim
        # transaction; claims come in bites of a quarter of the slots or more.
        ahead = max(1, self.concurrency // 4)
        claiming: asyncio.Task[tuple[int, list[Tracked]]] | None = None
        # When a claim last found fewer batches due than it asked for (loop time). While
        # downloads keep the sweep going, it looks again now and then (reading only), so
        # that checks falling due meanwhile are not held up by a long file.
        exhausted_at: float | None = None
        loop = asyncio.get_running_loop()
        quota_at = -math.inf  # out of call permits until then (loop time)
        try:
            while True:
                if work.backlog and (report.paused or self._calls_paused()):
                    # A deliberate wait, not a hang: what has not started goes back now,
                    # for whichever instance is first to call once the pause is over.
                    report.paused = True
                    await self._hand_back_backlog(work)
                while work.backlog and slots.free() > 0 and not self.stopping.is_set():
                    batch = work.backlog.popleft()
                    check = self._check(batch, report, slots.take())
                    work.checking[asyncio.create_task(check)] = batch
                may_claim = not (self.stopping.is_set() or report.auth_failed or report.paused)
                looked_lately = (
                    exhausted_at is not None and loop.time() - exhausted_at < LOOK_AGAIN_SECONDS
                )
                room = slots.free() + ahead - len(work.backlog)
                has_permits = loop.time() >= quota_at
                if (
                    claiming is None
                    and may_claim
                    and not looked_lately
                    and has_permits
                    and (room >= ahead or not work.any())
                ):
                    peek = exhausted_at is not None or not work.any()
                    claiming = asyncio.create_task(self._claim(room, peek=peek))
                if claiming is not None and claiming.done():
                    want, claimed = claiming.result()
                    claiming = None
                    report.claimed += len(claimed)
                    self.progress += 1
                    work.backlog.extend(claimed)
                    if want == 0:
                        # Out of permits: ask again when the budget says one comes free.
                        quota_at = loop.time() + max(throttle.wait_time(), 0.01)
                    else:
                        exhausted_at = loop.time() if len(claimed) < want else None
                    continue
                if not work.any() and claiming is None:
                    # Nothing in flight. Out of permits, wait for the next one when it is
                    # near (the per-second window), else finish and let a later sweep pick
                    # up the rest.
                    wait = quota_at - loop.time()
                    if not may_claim or exhausted_at is not None or wait > self.max_quota_wait:
                        break
                    await self._sleep_unless_stopping(wait)
                    continue
                if self.stopping.is_set():
                    if claiming is not None:
                        work.backlog.extend((await claiming)[1])
                        claiming = None
                    await self._wind_down(work)
                    break
                slot_freed = slots.freed()
                waiting_on: list[asyncio.Future[Any]] = [*work.tasks(), slot_freed]
                if claiming is not None:
                    waiting_on.append(claiming)
                # Wake for the next permit too, if the work in flight does not end first.
                until_permit = quota_at - loop.time()
                timeout = min(until_permit, 1.0) if until_permit > 0 else 1.0
                done, _ = await asyncio.wait(
                    waiting_on, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    if task is claiming or not isinstance(task, asyncio.Task):
                        continue  # the claim, or slot_freed: a loop turn is all they ask for
                    self.progress += 1
                    outcome = work.finished(task)
                    if isinstance(outcome, _Download):
                        started = asyncio.create_task(self._download(outcome, report))
                        work.downloading[started] = outcome.batch
                    elif isinstance(outcome, BaseException):
                        self._on_worker_error(outcome, report)
        except BaseException:
            self._orphaned_leases = True
            raise
        finally:
            if claiming is not None:
                claiming.cancel()
            if work.any():  # cancelled from outside: hand the rest back
                await self._wind_down(work, grace=0.0)
        return report

    async def _claim(self, room: int, *, peek: bool) -> tuple[int, list[Tracked]]:
        """Reserve call permits, then lease as many due batches: (permits, batches).

        With `peek`, first count what is due, so that a sweep with nothing to do (the usual
        idle sweep, or every due batch leased elsewhere) ends having written nothing.
        """
        max_age = self.policy.max_age
        if peek:
            due = await asyncio.to_thread(self.store.count_due, room, self.clock(), max_age=max_age)
            if due == 0:
                return room, []
            room = due
        throttle = self.client.throttle
        want = await throttle.reserve(room)
        if want <= 0:
            return 0, []
        # The claim reads the database's clock itself: leases are compared on one clock.
        claimed = await asyncio.to_thread(
            self.store.claim_due, self.owner, want, self.lease_seconds, max_age=max_age
        )
        if len(claimed) < want:
            await throttle.give_back(want - len(claimed))
        return want, claimed

    def _on_worker_error(self, error: BaseException, report: SweepReport) -> None:
        report.errors += 1
        if isinstance(error, sa.exc.DBAPIError):
            self._orphaned_leases = True
            # The batch's lease expires and it is looked at again later.
            log.error("db.write_failed", error=describe_db_error(error))
        else:
            log.error("sweep.worker_crashed", exc_info=error)

    async def _budget_view(self) -> BudgetView | None:
        """The call budget and the recent load, for the budget-aware schedule.

        Refreshed at most once a minute: it changes slowly, and reading a day of history
        for every sweep would cost more than it could save. Without it (the database
        hiccuped) batches fall back to plain backoff for this pass.
        """
        if time.monotonic() - self._view_taken < BUDGET_VIEW_SECONDS:
            return self._view
        try:
            ledger, budget_now = await self.client.throttle.budget.snapshot()
            since = datetime.fromtimestamp(budget_now - DAY_SECONDS, UTC)
            lifetimes, first_seen, open_batches = await asyncio.to_thread(
                self.store.load_history, since
            )
        except sa.exc.SQLAlchemyError as error:
            log.warning("budget.view_failed", error=describe_db_error(error))
            return None
        load = LoadHistory.from_lifetimes(
            [(c.timestamp(), f.timestamp() if f else None) for c, f in lifetimes],
            now=budget_now,
            first_seen=first_seen.timestamp() if first_seen else None,
        )
        self._view_taken = time.monotonic()
        return BudgetView.from_ledger(
            ledger, budget_now, open_batches=max(open_batches, 1), load=load
        )

    def _calls_paused(self) -> bool:
        return self.client.throttle.wait_time() > self.max_quota_wait

    async def _hand_back_backlog(self, work: _InFlight) -> None:
        """Return the batches claimed ahead and not started, and their call permits."""
        waiting = list(work.backlog)
        work.backlog.clear()
        await self.client.throttle.give_back(len(waiting))
        released = await asyncio.to_thread(self.store.release, waiting)
        log.info("sweep.paused_handed_back", batches=released)

    async def _sleep_unless_stopping(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)

    async def _wind_down(self, work: _InFlight, grace: float | None = None) -> None:
        """Let in-flight work finish within the grace period, then hand the rest back."""
        grace = self.shutdown_grace if grace is None else grace
        if work.backlog:
            # Never started: their permits go back to the budget.
            await self.client.throttle.give_back(len(work.backlog))
        hand_back: list[Tracked] = list(work.backlog)
        work.backlog.clear()
        if grace > 0 and work.any():
            await asyncio.wait(work.tasks(), timeout=grace)
        for task, batch in work.items():
            if not task.done():
                task.cancel()
                hand_back.append(batch)
        if hand_back:
            await asyncio.wait(work.tasks())
        for task in list(work.checking):
            outcome = work.finished(task)
            if isinstance(outcome, _Download):
                # A check that found a file after the stop began: no time is left to fetch it.
                self.download_slots.release()
                hand_back.append(outcome.batch)
        work.clear()
        if hand_back:
            released = await asyncio.to_thread(self.store.release, hand_back)
            log.warning("sweep.handed_back", batches=released)

    async def _check(
        self, batch: Tracked, report: SweepReport, release_slot: Callable[[], None]
    ) -> _Download | None:
        """Look at one claimed batch and write back what it became.

        Returns the download to start when the batch is complete; by then the "ready"
        transition is committed, the lease kept, and a download slot held.
        """
        try:
            return await self._look(batch, report, release_slot)
        finally:
            release_slot()

    async def _look(
        self, batch: Tracked, report: SweepReport, release_slot: Callable[[], None]
    ) -> _Download | None:
        bound = log.bind(request_id=batch.request_id, batch_id=batch.id)
        settled = decide_before_call(batch, self.policy, self.clock())
        if settled is not None:
            # No status call for this one (malformed id, too old): its permit goes back.
            release_slot()
            await self.client.throttle.give_back(1)
            await self._write(report, bound, BatchWrite(batch, settled))
            return None

        try:
            answer = await self.client.batch_status(batch.request_id)
        except AuthFailed as error:
            await self._on_auth_failed(batch, report, str(error))
            return None
        except CallsPaused:
            # Untouched: the batch is not at fault, and another instance may take it once
            # the pause is over. The sweep hands back the rest of what it claimed.
            report.paused = True
            release_slot()
            await asyncio.to_thread(self.store.release, [batch])
            return None
        self._auth_backoff = 0.0
        report.checked += 1
        if self.metrics is not None:
            self.metrics.observe_status(answer.outcome.value)
        decision = decide_on_answer(
            batch, answer, self.policy, self.clock(), self.rng, budget=self._view
        )
        if answer.detail and decision.to_state is batch.state:
            bound.warning("api.error", outcome=answer.outcome.value, detail=answer.detail)
        url = decision.download_url
        if url is None:
            release_slot()
            await self._write(report, bound, BatchWrite(batch, decision))
            return None

        # Record "ready" before the download, and keep the lease while it runs.
        ready = replace(decision, download_url=None)
        if not await self._write(report, bound, BatchWrite(batch, ready, keep_lease=True)):
            return None
        # Only a batch that was already ready can have a fetch that died without cleaning
        # up (kill -9 mid-download): every fetch starts with a "ready" write.
        download = _Download(
            replace(batch, state=State.READY, checks=batch.checks + 1),
            url,
            bound,
            leftovers_possible=batch.state is State.READY,
        )
        # Hold this worker slot until a download slot is free: when files arrive faster
        # than they can be fetched, claiming more batches would only strand their leases.
        while True:
            try:
                async with asyncio.timeout(self.lease_seconds / 3):
                    await self.download_slots.acquire()
                return download
            except TimeoutError:
                if not await self._still_owner(download.batch):
                    report.conflicts += 1
                    bound.warning("download.ownership_lost")
                    return None

    async def _still_owner(self, batch: Tracked) -> bool:
        """Extend the lease of a batch being downloaded; False when another owner has it."""
        self.progress += 1
        give_up_at = time.monotonic() + self.lease_seconds
        while True:
            try:
                # The group commit retries through a database outage for a while itself.
                return await self._commit.write(LeaseExtension(batch, self.lease_seconds))
            except sa.exc.OperationalError:
                if time.monotonic() > give_up_at:
                    return False  # our lease has run out meanwhile: assume it is lost

    async def _download(self, download: _Download, report: SweepReport) -> None:
        try:
            await self._fetch(download, report)
        finally:
            self.download_slots.release()

    async def _fetch(self, download: _Download, report: SweepReport) -> None:
        batch, url, bound = download.batch, download.url, download.log

        async def still_owner() -> bool:
            return await self._still_owner(batch)

        started = time.monotonic()
        try:
            fetched = await self.downloader.fetch(
                url,
                batch.request_id,
                keep_alive=still_owner,
                keep_alive_every=self.lease_seconds / 3,
                clean_leftovers=download.leftovers_possible,
            )
        except OwnershipLost:
            report.conflicts += 1
            bound.warning("download.ownership_lost")
            return
        except DownloadError as error:
            problem = _download_problem(error)
            bound.warning(
                "download.problem", problem=problem.value, error=str(error), url=redact_url(url)
            )
            decision = decide_on_download_problem(
                batch, problem, str(error), self.policy, self.clock(), self.rng
            )
            await self._write(report, bound, BatchWrite(batch, decision))
            return
        decision = decide_on_download_done(batch, fetched.size, fetched.sha256)
        stored = StoredFile(str(fetched.path), fetched.size, fetched.sha256)
        if self.metrics is not None:
            self.metrics.observe_download(fetched.size, time.monotonic() - started)
        # The downloader has logged download.done; the transition line follows from _write.
        if await self._write(report, bound, BatchWrite(batch, decision, file=stored)):
            report.downloaded += 1

    async def _write(
        self, report: SweepReport, bound: structlog.BoundLogger, write: BatchWrite
    ) -> bool:
        try:
            applied = await self._commit.write(write)
        except WriteRefused as refused:
            # This write alone failed (its group committed); the batch was handed back.
            report.errors += 1
            bound.error("batch.write_refused", error=str(refused))
            return False
        if not applied:
            report.conflicts += 1
            bound.warning(
                "batch.conflict",
                detail="the batch changed under us (another instance, an operator or a hand edit); "
                "this result was dropped",
            )
            return False
        if write.decision.to_state is not write.batch.state:
            report.transitions += 1
            if self.metrics is not None:
                self.metrics.observe_transition(write.decision.to_state.value)
            bound.info(
                "batch.transition",
                from_state=write.batch.state.value,
                to_state=write.decision.to_state.value,
                detail=write.decision.detail,
            )
        return True

    async def _on_auth_failed(self, batch: Tracked, report: SweepReport, message: str) -> None:
        """Credentials refused: a service-wide problem, so no batch is penalised for it."""
        await asyncio.to_thread(self.store.release, [batch])
        if report.auth_failed:
            return
        report.auth_failed = True
        # One error per backoff period: pausing the client keeps later sweeps quiet.
        self._auth_backoff = min(600.0, max(30.0, self._auth_backoff * 2))
        await self.client.throttle.pause(self._auth_backoff)
        log.error("api.auth_failed", error=message, retry_in=self._auth_backoff)


def _download_problem(error: DownloadError) -> DownloadProblem:
    if isinstance(error, DownloadRefused):
        return DownloadProblem.REFUSED
    if isinstance(error, UrlExpired):
        return DownloadProblem.URL_EXPIRED
    if isinstance(error, OutputUnwritable):
        return DownloadProblem.UNWRITABLE
    return DownloadProblem.INTERRUPTED
