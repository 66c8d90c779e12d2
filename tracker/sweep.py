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
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
import structlog

from tracker.budget import CallsPaused, Throttle
from tracker.db import describe_db_error
from tracker.deepvue import AuthFailed, DeepvueClient
from tracker.domain.model import DownloadProblem, PollPolicy, Tracked
from tracker.domain.policy import (
    decide_before_call,
    decide_on_answer,
    decide_on_download_done,
    decide_on_download_problem,
    plan_download,
)
from tracker.domain.schedule import BudgetView, LoadHistory
from tracker.domain.urls import redact_url
from tracker.download import (
    Downloader,
    DownloadError,
    DownloadRefused,
    OutputUnwritable,
    OwnershipLost,
    UrlExpired,
)
from tracker.group_commit import GroupCommit
from tracker.store import BatchWrite, LeaseExtension, Store, StoredFile, WriteRefused
from tracker.worker_slots import WorkerSlots

if TYPE_CHECKING:
    from tracker.metrics import Metrics

log = structlog.get_logger("tracker.sweep")

BUDGET_VIEW_SECONDS = 60.0
# How often a sweep kept going by downloads looks for batches that fell due meanwhile.
LOOK_AGAIN_SECONDS = 1.0
DAY_SECONDS = 86400.0


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class _Download:
    """A checked batch whose file is to be fetched now; it holds a download slot."""

    batch: Tracked
    url: str
    log: structlog.BoundLogger
    # An earlier fetch of this batch may have been killed and left a temp file behind.
    leftovers_possible: bool


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


@dataclass(frozen=True)
class _BatchWork:
    """What a pass asks the Sweeper to do with one batch; the pass decides when."""

    claim: Callable[[int, bool], Coroutine[Any, Any, tuple[int, list[Tracked]]]]
    check: Callable[
        [Tracked, SweepReport, Callable[[], None]], Coroutine[Any, Any, _Download | None]
    ]
    download: Callable[[_Download, SweepReport], Coroutine[Any, Any, None]]
    on_error: Callable[[BaseException, SweepReport], None]
    # Called whenever work moves (the daemon's watchdog reads the count).
    moved: Callable[[], None]


class _Pass:
    """The loop state of one sweep, and the steps the loop takes over it.

    Check tasks hold the worker slots. One that finds a file waits for a download slot,
    then hands the batch to a download task, which runs on outside the worker slots: a
    long file must not hold up status checks of other batches.
    """

    def __init__(
        self,
        work: _BatchWork,
        *,
        store: Store,
        throttle: Throttle,
        stopping: asyncio.Event,
        download_slots: asyncio.Semaphore,
        concurrency: int,
        max_quota_wait: float,
        shutdown_grace: float,
    ) -> None:
        self._work = work
        self._store = store
        self._throttle = throttle
        self._stopping = stopping
        self._download_slots = download_slots
        self._max_quota_wait = max_quota_wait
        self._shutdown_grace = shutdown_grace
        self._loop = asyncio.get_running_loop()
        self.report = SweepReport()
        self._slots = WorkerSlots(concurrency)
        self._checking: dict[asyncio.Task[_Download | None], Tracked] = {}
        self._downloading: dict[asyncio.Task[None], Tracked] = {}
        # Claimed, with a call permit reserved, waiting for a worker slot.
        self._backlog: deque[Tracked] = deque()
        # Claims run beside the work, so that slots freed meanwhile are refilled from the
        # batches claimed ahead (a quarter of the slots) instead of waiting for a claim
        # transaction; claims come in bites of a quarter of the slots or more.
        self._ahead = max(1, concurrency // 4)
        self._claiming: asyncio.Task[tuple[int, list[Tracked]]] | None = None
        # When a claim last found fewer batches due than it asked for (loop time). While
        # downloads keep the sweep going, it looks again now and then (reading only), so
        # that checks falling due meanwhile are not held up by a long file.
        self._exhausted_at: float | None = None
        self._quota_at = -math.inf  # out of call permits until then (loop time)

    async def refill(self) -> None:
        """Start checks of the batches claimed ahead in the free worker slots; during a
        pause, hand them back instead."""
        report = self.report
        if self._backlog and (report.paused or self._calls_paused()):
            # A deliberate wait, not a hang: what has not started goes back now,
            # for whichever instance is first to call once the pause is over.
            report.paused = True
            await self._hand_back_backlog()
        while self._backlog and self._slots.free() > 0 and not self._stopping.is_set():
            batch = self._backlog.popleft()
            check = self._work.check(batch, report, self._slots.take())
            self._checking[asyncio.create_task(check)] = batch

    def claim(self) -> bool:
        """Start a claim if there is room for one; True when one has just come in."""
        now = self._loop.time()
        looked_lately = (
            self._exhausted_at is not None and now - self._exhausted_at < LOOK_AGAIN_SECONDS
        )
        room = self._slots.free() + self._ahead - len(self._backlog)
        if (
            self._claiming is None
            and self._may_claim()
            and not looked_lately
            and now >= self._quota_at
            and (room >= self._ahead or not self._any())
        ):
            peek = self._exhausted_at is not None or not self._any()
            self._claiming = asyncio.create_task(self._work.claim(room, peek))
        if self._claiming is None or not self._claiming.done():
            return False
        want, claimed = self._claiming.result()
        self._claiming = None
        self.report.claimed += len(claimed)
        self._work.moved()
        self._backlog.extend(claimed)
        if want == 0:
            # Out of permits: ask again when the budget says one comes free.
            self._quota_at = self._loop.time() + max(self._throttle.wait_time(), 0.01)
        else:
            self._exhausted_at = self._loop.time() if len(claimed) < want else None
        return True

    def idle(self) -> bool:
        """Nothing in flight, nothing claimed ahead, no claim running."""
        return not self._any() and self._claiming is None

    async def wait_for_permit(self) -> bool:
        """While idle: wait for the next call permit when it is near (the per-second window)
        and say whether to go on; False ends the pass, and a later sweep picks up the rest."""
        wait = self._quota_at - self._loop.time()
        if not self._may_claim() or self._exhausted_at is not None or wait > self._max_quota_wait:
            return False
        await self._sleep_unless_stopping(wait)
        return True

    async def wind_down(self) -> bool:
        """Whether a stop has come; if so, in-flight work finishes within the grace period and
        the rest goes back."""
        if not self._stopping.is_set():
            return False
        if self._claiming is not None:
            self._backlog.extend((await self._claiming)[1])
            self._claiming = None
        await self._hand_back()
        return True

    async def absorb(self) -> None:
        """Wait for a task to finish (or a slot, the claim, the next permit), then take in
        what finished: start the downloads checks found, count the errors."""
        slot_freed = self._slots.freed()
        waiting_on: list[asyncio.Future[Any]] = [*self._tasks(), slot_freed]
        if self._claiming is not None:
            waiting_on.append(self._claiming)
        # Wake for the next permit too, if the work in flight does not end first.
        until_permit = self._quota_at - self._loop.time()
        timeout = min(until_permit, 1.0) if until_permit > 0 else 1.0
        done, _ = await asyncio.wait(
            waiting_on, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        for task in done:
            if task is self._claiming or not isinstance(task, asyncio.Task):
                continue  # the claim, or slot_freed: a loop turn is all they ask for
            self._work.moved()
            outcome = self._finished(task)
            if isinstance(outcome, _Download):
                started = asyncio.create_task(self._work.download(outcome, self.report))
                self._downloading[started] = outcome.batch
            elif isinstance(outcome, BaseException):
                self._work.on_error(outcome, self.report)

    async def close(self) -> None:
        """After the loop, however it ended: cancelled from outside, hand the rest back."""
        if self._claiming is not None:
            self._claiming.cancel()
        if self._any():
            await self._hand_back(grace=0.0)

    def _calls_paused(self) -> bool:
        return self._throttle.wait_time() > self._max_quota_wait

    async def _sleep_unless_stopping(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    def _may_claim(self) -> bool:
        report = self.report
        return not (self._stopping.is_set() or report.auth_failed or report.paused)

    def _any(self) -> bool:
        return bool(self._checking or self._downloading or self._backlog)

    def _tasks(self) -> list[asyncio.Task[Any]]:
        return [*self._checking, *self._downloading]

    def _finished(self, task: asyncio.Task[Any]) -> _Download | BaseException | None:
        """Forget a task that is done; what it left: a download to start, an error, or None."""
        self._checking.pop(task, None)
        self._downloading.pop(task, None)
        if task.cancelled():
            return None
        error = task.exception()
        if error is not None:
            return error
        result = task.result()
        return result if isinstance(result, _Download) else None

    async def _hand_back_backlog(self) -> None:
        """Return the batches claimed ahead and not started, and their call permits."""
        waiting = list(self._backlog)
        self._backlog.clear()
        await self._throttle.give_back(len(waiting))
        released = await asyncio.to_thread(self._store.release, waiting)
        log.info("sweep.paused_handed_back", batches=released)

    async def _hand_back(self, grace: float | None = None) -> None:
        """Let in-flight work finish within the grace period, then hand the rest back."""
        grace = self._shutdown_grace if grace is None else grace
        if self._backlog:
            # Never started: their permits go back to the budget.
            await self._throttle.give_back(len(self._backlog))
        hand_back: list[Tracked] = list(self._backlog)
        self._backlog.clear()
        if grace > 0 and self._any():
            await asyncio.wait(self._tasks(), timeout=grace)
        for task, batch in [*self._checking.items(), *self._downloading.items()]:
            if not task.done():
                task.cancel()
                hand_back.append(batch)
        tasks = self._tasks()
        if hand_back and tasks:  # (asyncio.wait refuses an empty list)
            await asyncio.wait(tasks)
        for task in list(self._checking):
            outcome = self._finished(task)
            if isinstance(outcome, _Download):
                # A check that found a file after the stop began: no time is left to fetch it.
                self._download_slots.release()
                hand_back.append(outcome.batch)
        self._checking.clear()
        self._downloading.clear()
        if hand_back:
            released = await asyncio.to_thread(self._store.release, hand_back)
            log.warning("sweep.handed_back", batches=released)


class Sweeper:
    def __init__(
        self,
        *,
        store: Store,
        client: DeepvueClient,
        throttle: Throttle,
        downloader: Downloader,
        policy: PollPolicy,
        owner: str,
        stopping: asyncio.Event,
        concurrency: int,
        lease_seconds: float,
        download_concurrency: int | None = None,
        shutdown_grace: float,
        rng: random.Random | None = None,
        clock: Callable[[], datetime] = utcnow,
        max_quota_wait: float = 5.0,
        metrics: Metrics | None = None,
    ) -> None:
        """`throttle` is the one `client` calls through: the sweep reserves its permits
        before claiming, and hands them back for batches it does not call about.
        `stopping`, once set, stops claiming and winds the running sweep down within
        `shutdown_grace` seconds."""
        self._store = store
        self._client = client
        self._throttle = throttle
        self._downloader = downloader
        self._policy = policy
        self._owner = owner
        self._stopping = stopping
        self._concurrency = concurrency
        # Downloads run beside the checks, not in their slots: a long file must not stop
        # status checks, and a check must not wait for another batch's file.
        self._download_slots = asyncio.Semaphore(download_concurrency or concurrency)
        self._lease_seconds = lease_seconds
        self._shutdown_grace = shutdown_grace
        self._rng = rng or random.Random()
        self._clock = clock
        self._max_quota_wait = max_quota_wait
        self._metrics = metrics
        self._view: BudgetView | None = None
        self._view_taken = -math.inf
        self._progress = 0
        self._commit = GroupCommit(store, clock)
        self._orphaned_leases = False
        self._auth_backoff = 0.0

    @property
    def progress(self) -> int:
        """Grows whenever work moves (a claim, a finished batch, a download's keep-alive),
        so the daemon can tell a long but healthy sweep from a wedged one."""
        return self._progress

    async def sweep(self) -> SweepReport:
        """Work every batch that is due now, then return.

        Claims happen in small bites as worker slots free up, never more than the rate
        limit lets start now, so no batch sits leased while waiting for quota.
        """
        if self._orphaned_leases:
            # An earlier sweep lost the database while holding leases; sweeps never overlap,
            # so none of that work is in flight now: hand them back instead of waiting out
            # the lease (TRACKER_LEASE_DURATION, 5 minutes by default).
            released = await asyncio.to_thread(self._store.release_owned, self._owner)
            self._orphaned_leases = False
            if released:
                log.warning("sweep.released_orphaned_leases", batches=released)
        self._view = await self._budget_view()
        work = _BatchWork(
            claim=self._claim,
            check=self._check,
            download=self._download,
            on_error=self._on_worker_error,
            moved=self._moved,
        )
        one_pass = _Pass(
            work,
            store=self._store,
            throttle=self._throttle,
            stopping=self._stopping,
            download_slots=self._download_slots,
            concurrency=self._concurrency,
            max_quota_wait=self._max_quota_wait,
            shutdown_grace=self._shutdown_grace,
        )
        try:
            while True:
                await one_pass.refill()
                if one_pass.claim():
                    continue  # refill from what came in before anything else
                if one_pass.idle():
                    if not await one_pass.wait_for_permit():
                        break
                    continue  # a permit is free now: claim before waiting on anything
                if await one_pass.wind_down():
                    break
                await one_pass.absorb()
        except BaseException:
            self._orphaned_leases = True
            raise
        finally:
            await one_pass.close()
        return one_pass.report

    def _moved(self) -> None:
        self._progress += 1

    async def _claim(self, room: int, peek: bool) -> tuple[int, list[Tracked]]:
        """Reserve call permits, then lease as many due batches: (permits, batches).

        With `peek`, first count what is due, so that a sweep with nothing to do (the usual
        idle sweep, or every due batch leased elsewhere) ends having written nothing.
        """
        max_age = self._policy.max_age
        if peek:
            due = await asyncio.to_thread(
                self._store.count_due, room, self._clock(), max_age=max_age
            )
            if due == 0:
                return room, []
            room = due
        want = await self._throttle.reserve(room)
        if want <= 0:
            return 0, []
        # The claim reads the database's clock itself: leases are compared on one clock.
        claimed = await asyncio.to_thread(
            self._store.claim_due, self._owner, want, self._lease_seconds, max_age=max_age
        )
        if len(claimed) < want:
            await self._throttle.give_back(want - len(claimed))
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
            ledger, budget_now = await self._throttle.snapshot()
            since = datetime.fromtimestamp(budget_now - DAY_SECONDS, UTC)
            lifetimes, first_seen, open_batches = await asyncio.to_thread(
                self._store.load_history, since
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

    async def _check(
        self, batch: Tracked, report: SweepReport, release_slot: Callable[[], None]
    ) -> _Download | None:
        """Look at one claimed batch and write back what it became.

        Returns the download to start when the batch is complete; by then the "ready"
        transition is committed, the lease kept, and a download slot held. The worker slot
        is given back as soon as the batch no longer needs it, and at the latest on return.
        """
        try:
            bound = log.bind(request_id=batch.request_id, batch_id=batch.id)
            settled = decide_before_call(batch, self._policy, self._clock())
            if settled is not None:
                # No status call for this one (malformed id, too old): its permit goes back.
                release_slot()
                await self._throttle.give_back(1)
                await self._write(report, bound, BatchWrite(batch, settled))
                return None

            try:
                answer = await self._client.batch_status(batch.request_id)
            except AuthFailed as error:
                await self._on_auth_failed(batch, report, str(error))
                return None
            except CallsPaused:
                # Untouched: the batch is not at fault, and another instance may take it once
                # the pause is over. The sweep hands back the rest of what it claimed.
                report.paused = True
                release_slot()
                await asyncio.to_thread(self._store.release, [batch])
                return None
            self._auth_backoff = 0.0
            report.checked += 1
            if self._metrics is not None:
                self._metrics.observe_status(answer.outcome.value)
            decision = decide_on_answer(
                batch, answer, self._policy, self._clock(), self._rng, budget=self._view
            )
            if answer.detail and decision.to_state is batch.state:
                bound.warning("api.error", outcome=answer.outcome.value, detail=answer.detail)
            plan = plan_download(batch, decision)
            if plan is None:
                release_slot()
                await self._write(report, bound, BatchWrite(batch, decision))
                return None

            # Record "ready" before the download, and keep the lease while it runs.
            if not await self._write(report, bound, BatchWrite(batch, plan.ready, keep_lease=True)):
                return None
            download = _Download(plan.batch, plan.url, bound, plan.leftovers_possible)
            # Hold this worker slot until a download slot is free: when files arrive faster
            # than they can be fetched, claiming more batches would only strand their leases.
            while True:
                try:
                    async with asyncio.timeout(self._lease_seconds / 3):
                        await self._download_slots.acquire()
                    return download
                except TimeoutError:
                    if not await self._still_owner(download.batch):
                        report.conflicts += 1
                        bound.warning("download.ownership_lost")
                        return None
        finally:
            release_slot()

    async def _still_owner(self, batch: Tracked) -> bool:
        """Extend the lease of a batch being downloaded; False when another owner has it."""
        self._moved()
        give_up_at = time.monotonic() + self._lease_seconds
        while True:
            try:
                # The group commit retries through a database outage for a while itself.
                return await self._commit.write(LeaseExtension(batch, self._lease_seconds))
            except sa.exc.OperationalError:
                if time.monotonic() > give_up_at:
                    return False  # our lease has run out meanwhile: assume it is lost

    async def _download(self, download: _Download, report: SweepReport) -> None:
        """Fetch the file of a ready batch and write back what became of it; the download
        slot its check took is given back at the end."""
        try:
            batch, url, bound = download.batch, download.url, download.log

            async def still_owner() -> bool:
                return await self._still_owner(batch)

            started = time.monotonic()
            try:
                fetched = await self._downloader.fetch(
                    url,
                    batch.request_id,
                    keep_alive=still_owner,
                    keep_alive_every=self._lease_seconds / 3,
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
                if self._metrics is not None:
                    self._metrics.observe_download_problem(problem.value)
                decision = decide_on_download_problem(
                    batch, problem, str(error), self._policy, self._clock(), self._rng
                )
                await self._write(report, bound, BatchWrite(batch, decision))
                return
            decision = decide_on_download_done(batch, fetched.size, fetched.sha256)
            stored = StoredFile(str(fetched.path), fetched.size, fetched.sha256)
            if self._metrics is not None:
                self._metrics.observe_download(fetched.size, time.monotonic() - started)
            # The downloader has logged download.done; the transition line follows from _write.
            if await self._write(report, bound, BatchWrite(batch, decision, file=stored)):
                report.downloaded += 1
        finally:
            self._download_slots.release()

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
            if self._metrics is not None:
                self._metrics.observe_transition(write.decision.to_state.value)
            bound.info(
                "batch.transition",
                from_state=write.batch.state.value,
                to_state=write.decision.to_state.value,
                detail=write.decision.detail,
            )
        return True

    async def _on_auth_failed(self, batch: Tracked, report: SweepReport, message: str) -> None:
        """Credentials refused: a service-wide problem, so no batch is penalised for it."""
        await asyncio.to_thread(self._store.release, [batch])
        if report.auth_failed:
            return
        report.auth_failed = True
        # One error per backoff period: pausing the client keeps later sweeps quiet.
        self._auth_backoff = min(600.0, max(30.0, self._auth_backoff * 2))
        await self._throttle.pause(self._auth_backoff)
        log.error("api.auth_failed", error=message, retry_in=self._auth_backoff)


def _download_problem(error: DownloadError) -> DownloadProblem:
    if isinstance(error, DownloadRefused):
        return DownloadProblem.REFUSED
    if isinstance(error, UrlExpired):
        return DownloadProblem.URL_EXPIRED
    if isinstance(error, OutputUnwritable):
        return DownloadProblem.UNWRITABLE
    return DownloadProblem.INTERRUPTED
