"""The long-running service: an APScheduler tick that calls `Sweeper.sweep`, and its lifecycle.

APScheduler keeps only an in-memory interval trigger here: the database rows are the queue
and the source of truth, so several instances can run without a shared job store.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
import structlog

from tracker.clock import DatabaseClock
from tracker.db import create_engine_for, describe_db_error, upgrade_database
from tracker.health import health_problem
from tracker.instance import boot_identity, dead_predecessors, instance_name
from tracker.listen import listen_for_new_batches
from tracker.notify import Notifier
from tracker.services import make_store, open_services

if TYPE_CHECKING:
    from pathlib import Path

    from aiohttp import web

    from tracker.budget import Throttle
    from tracker.domain.model import PollPolicy
    from tracker.logs import SecretScrubber
    from tracker.metrics import Metrics
    from tracker.settings import Settings
    from tracker.store import Store
    from tracker.sweep import Sweeper

log = structlog.get_logger("tracker.daemon")

# Batch counts scan the whole table; refreshing them for every sweep would cost more than
# they are worth. A scrape every 15 s or more is what Prometheus does anyway.
GAUGE_REFRESH_SECONDS = 15.0
# How often stale download temp files are looked for (and once at start).
LEFTOVERS_INTERVAL_SECONDS = 600.0
# The largest webhook body read; a delivery names a few ids, never megabytes.
WEBHOOK_MAX_BODY = 64 << 10


class Daemon:
    """Runs sweeps on an interval until told to stop."""

    def __init__(
        self,
        sweeper: Sweeper,
        *,
        store: Store,
        throttle: Throttle,
        owner: str,
        stopping: asyncio.Event,
        max_age: float,
        shutdown_grace: float,
        sweep_interval: float,
        clock: DatabaseClock,
        heartbeat_timeout: float = 30.0,
        on_final: str | None = None,
        on_final_timeout: float = 60.0,
        on_final_env: tuple[str, ...] = (),
        notifier: Notifier | None = None,
        metrics: Metrics | None = None,
        leftovers_dir: Path | None = None,
        leftovers_age: float = 3600.0,
    ) -> None:
        """`sweeper` sweeps `store` as `owner`, calling through `throttle`; `stopping`, the
        event the sweeper winds down on, is set here on a signal. `max_age` is the poll
        policy's, for when the next check falls due."""
        self._sweeper = sweeper
        self._store = store
        self._throttle = throttle
        self._owner = owner
        self._stopping = stopping
        self._max_age = max_age
        self._shutdown_grace = shutdown_grace
        self.clock = clock
        self.heartbeat_timeout = heartbeat_timeout
        self.notifier = notifier
        self.metrics = metrics
        self.sweep_interval = sweep_interval
        self.on_final = on_final
        self.on_final_timeout = on_final_timeout
        self.on_final_env = on_final_env
        # Stale download temp files (tracker/leftovers.py): where, and how old they must be.
        self.leftovers_dir = leftovers_dir
        self.leftovers_age = leftovers_age
        self._again = False
        self._woken: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._last_tick_end: float | None = None
        self._progress_at_ping = -1
        self.stopped = asyncio.Event()
        self.last_sweep_at: datetime | None = None
        self._current: asyncio.Task[object] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._signals = 0
        # After a failed sweep (database unreachable) wait longer before each new try.
        self._failures = 0
        self._next_try = 0.0
        self._progress_seen = 0
        # Whether the database has heard of a finished sweep yet (`tracker check` asks).
        self._sweep_recorded = False
        # When the webhook listener last took a delivery; told with the next heartbeat.
        self._last_delivery_at: datetime | None = None

    def delivery_heard(self) -> None:
        """A webhook delivery with the right secret came in (`tracker status` shows when)."""
        self._last_delivery_at = self.clock.now()

    def heartbeat_interval(self) -> float:
        # Three heartbeats per timeout: one lost to a database blip does not look like death.
        return self.heartbeat_timeout / 3

    async def heartbeat(self) -> None:
        """Tell the others this instance is alive, and free the leases of silent ones.

        The heartbeat is the one write of an idle daemon. It carries when this instance
        last swept (during a long sweep: when its work last moved, for `tracker check`),
        and brings the database's clock back for the due times and leases compared here.
        """
        store = self._store
        progress = self._sweeper.progress
        if self._current is not None and progress != self._progress_seen:
            self._progress_seen = progress
            self.last_sweep_at = self.clock.now()
        try:
            now = await asyncio.to_thread(
                store.heartbeat, self._owner, self.last_sweep_at, self._last_delivery_at
            )
            self.clock.sync(now)
            freed = await asyncio.to_thread(store.free_silent_instances, self.heartbeat_timeout)
        except sa.exc.SQLAlchemyError as error:
            log.warning("instance.heartbeat_failed", error=describe_db_error(error))
            return
        self._sweep_recorded = self.last_sweep_at is not None
        if freed:
            log.warning(
                "instance.presumed_dead",
                owners=sorted(freed),
                batches=sum(freed.values()),
                detail=f"no heartbeat for {self.heartbeat_timeout:g} s; its batches are free",
            )
            self.wake()

    def wake(self) -> None:
        """Sweep now (a new batch was inserted), or again right after the running sweep."""
        if self._stopping.is_set():
            return
        if self._current is not None:
            self._again = True
            return
        task = asyncio.get_running_loop().create_task(self.tick())
        self._woken.add(task)
        task.add_done_callback(self._woken.discard)

    async def tick(self) -> None:
        """The APScheduler job: sweeps until nothing is left to do, never raising."""
        if self._current is not None:
            self._again = True
            return
        self._current = asyncio.current_task()
        self._idle.clear()
        try:
            self._again = True
            while self._again and not self._stopping.is_set():
                self._again = False
                if not await self._sweep_once():
                    break
            await self._run_final_hooks()
        finally:
            self._current = None
            self._last_tick_end = asyncio.get_running_loop().time()
            self._idle.set()

    async def _sweep_once(self) -> bool:
        loop = asyncio.get_running_loop()
        if loop.time() < self._next_try:
            return False
        try:
            report = await self._sweeper.sweep()
            now = self.clock.now()
            self.last_sweep_at = now
            if not self._sweep_recorded:
                # The first sweep is told at once; later ones ride on the heartbeat.
                await self.heartbeat()
        except asyncio.CancelledError:
            raise
        except Exception as error:  # e.g. the database is unreachable right now
            self._failures += 1
            backoff = min(60.0, self.sweep_interval * 2 ** min(self._failures, 10))
            self._next_try = loop.time() + backoff
            log.error("sweep.failed", error=describe_db_error(error), retry_in=round(backoff, 1))
            return False
        if self._failures:
            log.info("sweep.recovered", after_failures=self._failures)
        self._failures = 0
        if self.metrics is not None:
            self.metrics.mark_sweep(now.timestamp())
        if self.notifier is not None:
            self.notifier.status(
                f"last sweep {now:%H:%M:%S} UTC: checked {report.checked}, "
                f"transitions {report.transitions}, downloaded {report.downloaded}"
            )
        await self._wake_when_next_due(now)
        if report.claimed or report.errors:
            log.info(
                "sweep.done",
                claimed=report.claimed,
                checked=report.checked,
                transitions=report.transitions,
                downloaded=report.downloaded,
                conflicts=report.conflicts,
                errors=report.errors,
            )
        return True

    async def _wake_when_next_due(self, now: datetime) -> None:
        """Sweep again when the next check falls due, if that is before the next tick.

        The interval tick is only the safety net: a batch due in 0.5 s is looked at in 0.5 s
        (or when the budget allows), not at the next interval.
        """
        due = await asyncio.to_thread(self._store.next_check_due, now, self._max_age)
        if due is None:
            return
        delay = max((due - now).total_seconds(), self._throttle.wait_time(), 0.01)
        if delay >= self.sweep_interval:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(delay, self.wake)

    async def _run_final_hooks(self) -> None:
        if self.on_final is None or self._stopping.is_set():
            return
        from tracker.hooks import run_final_hook

        try:
            while not self._stopping.is_set():
                batches = await asyncio.to_thread(self._store.claim_final_hooks, 8)
                if not batches:
                    return
                outcomes = await asyncio.gather(
                    *(
                        run_final_hook(
                            self.on_final,
                            b,
                            self.on_final_timeout,
                            allowed_env=self.on_final_env,
                        )
                        for b in batches
                    ),
                    return_exceptions=True,
                )
                for batch, outcome in zip(batches, outcomes, strict=True):
                    if isinstance(outcome, Exception):
                        log.error("hook.failed", request_id=batch.request_id, error=repr(outcome))
        except sa.exc.SQLAlchemyError as error:
            log.error("hook.claim_failed", error=describe_db_error(error))

    async def remove_leftovers(self) -> None:
        """Remove stale download temp files (older than the deadline, batch not leased)."""
        if self.leftovers_dir is None:
            return
        from tracker.leftovers import remove_stale_temp_files

        try:
            await asyncio.to_thread(
                remove_stale_temp_files,
                self.leftovers_dir,
                self._store,
                self.leftovers_age,
            )
        except (sa.exc.SQLAlchemyError, OSError) as error:
            log.warning("leftovers.failed", error=describe_db_error(error))

    async def watchdog(self) -> None:
        """Ping systemd's watchdog only while the sweep loop really moves.

        Between sweeps, ticks must keep finishing; during a long sweep, work must keep
        progressing (claims, finished batches, download keep-alives). A wedged loop stops
        the pings and lets systemd restart the service.
        """
        if self.notifier is None:
            return
        loop = asyncio.get_running_loop()
        interval = self.notifier.watchdog_interval() or self.sweep_interval
        if self._current is None:
            recent = max(3 * self.sweep_interval, 2 * interval)
            alive = self._last_tick_end is not None and loop.time() - self._last_tick_end < recent
        else:
            progress = self._sweeper.progress
            alive = progress != self._progress_at_ping
            self._progress_at_ping = progress
        if alive:
            self.notifier.watchdog()
        else:
            log.warning("daemon.no_progress", detail="withholding the systemd watchdog ping")

    async def refresh_gauges(self) -> None:
        """Cluster-wide figures for the metrics endpoint, from the database."""
        if self.metrics is None:
            return
        store = self._store
        try:
            counts = await asyncio.to_thread(store.count_by_state)
            oldest = await asyncio.to_thread(store.oldest_unfinished)
            usage = await self._throttle.usage()
        except sa.exc.SQLAlchemyError as error:
            log.warning("metrics.refresh_failed", error=describe_db_error(error))
            return
        self.metrics.set_batch_counts(counts)
        self.metrics.set_quota(usage)
        age = (self.clock.now() - oldest.created_at).total_seconds() if oldest else None
        self.metrics.set_oldest_unfinished_age(age)

    def request_stop(self) -> None:
        """First signal: stop claiming, let work finish. Second: cut in-flight work short."""
        self._signals += 1
        self._stopping.set()
        self.stopped.set()
        if self._signals == 1:
            if self.notifier is not None:
                self.notifier.stopping()
            log.info("daemon.stopping", grace=self._shutdown_grace)
        else:
            log.warning("daemon.stopping_now")
            if self._current is not None:
                self._current.cancel()

    async def run(self) -> None:
        from apscheduler.schedulers.asyncio import AsyncIOScheduler

        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop)
        scheduler = AsyncIOScheduler(event_loop=loop, timezone=UTC)

        def every(
            job: Callable[[], Awaitable[None]], seconds: float, *, at_once: bool, **options: Any
        ) -> None:
            # One run of a job at a time; runs missed while it was busy collapse into one.
            if at_once:
                options["next_run_time"] = datetime.now(UTC)
            scheduler.add_job(
                job,
                "interval",
                seconds=seconds,
                id=job.__name__,
                max_instances=1,
                coalesce=True,
                **options,
            )

        # A sweep that starts late still runs: it is the safety net for every batch.
        every(self.tick, self.sweep_interval, at_once=True, misfire_grace_time=None)
        every(self.heartbeat, self.heartbeat_interval(), at_once=False)
        if self.leftovers_dir is not None:
            every(self.remove_leftovers, LEFTOVERS_INTERVAL_SECONDS, at_once=True)
        watchdog_interval = None if self.notifier is None else self.notifier.watchdog_interval()
        if watchdog_interval is not None:
            every(self.watchdog, watchdog_interval, at_once=False)
        if self.metrics is not None:
            every(self.refresh_gauges, GAUGE_REFRESH_SECONDS, at_once=True)
        scheduler.start()
        if self.notifier is not None:
            # Migrations are applied and the database answered before we got here.
            self.notifier.ready(status="started; first sweep running")
        log.info("daemon.started", owner=self._owner, sweep_interval=self.sweep_interval)
        try:
            await self.stopped.wait()
        finally:
            # No new ticks; the running one winds itself down within the grace period.
            # Shutting the scheduler down now would cancel that tick mid-work, so it waits.
            scheduler.pause()
            try:
                await asyncio.wait_for(self._idle.wait(), self._shutdown_grace + 10)
            except TimeoutError:  # only bounds a hang
                if self._current is not None:
                    self._current.cancel()
            scheduler.shutdown(wait=False)
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
        log.info("daemon.stopped")


async def _until_database_answers(engine: sa.Engine, stop: asyncio.Event) -> bool:
    """Apply migrations, retrying with backoff while the database is unreachable.

    False if told to stop before the database answered.
    """
    delay = 1.0
    while True:
        try:
            await asyncio.to_thread(upgrade_database, engine)
            return True
        except sa.exc.OperationalError as error:
            log.error("db.unreachable", error=describe_db_error(error), retry_in=delay)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        if stop.is_set():
            return False
        delay = min(delay * 2, 60.0)


async def run_service(
    settings: Settings,
    scrubber: SecretScrubber,
    *,
    policy: PollPolicy | None = None,
    until: Callable[[Store], bool] | None = None,
) -> None:
    """Migrate, then sweep on an interval until a signal (or `until(store)` holds)."""
    engine = create_engine_for(settings.database_url)
    notifier = Notifier()
    early_stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, early_stop.set)
    try:
        if not await _until_database_answers(engine, early_stop) or early_stop.is_set():
            return
        store = make_store(settings, engine)
        metrics = None
        if settings.metrics_addr:
            # Imported only when asked for: prometheus_client and aiohttp.web cost memory.
            from tracker.metrics import Metrics

            metrics = Metrics()
        owner = instance_name()
        clock = DatabaseClock(await _register(store, owner))
        policy = policy or settings.poll_policy
        async with open_services(
            settings,
            scrubber,
            store=store,
            policy=policy,
            metrics=metrics,
            clock=clock,
            owner=owner,
        ) as services:
            daemon = Daemon(
                services.sweeper,
                store=store,
                throttle=services.throttle,
                owner=owner,
                stopping=services.stopping,
                max_age=policy.max_age,
                shutdown_grace=settings.shutdown_grace,
                sweep_interval=settings.sweep_interval,
                clock=clock,
                heartbeat_timeout=settings.heartbeat_timeout,
                on_final=settings.on_final,
                on_final_timeout=settings.on_final_timeout,
                on_final_env=settings.on_final_env,
                notifier=notifier,
                metrics=metrics,
                leftovers_dir=settings.output_dir,
                leftovers_age=settings.download_deadline,
            )
            helpers: list[asyncio.Task[None]] = []
            if until is not None:
                helpers.append(asyncio.create_task(_stop_when(daemon, store, until)))
            if engine.dialect.name == "postgresql":
                helpers.append(
                    asyncio.create_task(
                        listen_for_new_batches(settings.database_url, daemon.wake, daemon.stopped)
                    )
                )
            webhook_server = None
            if settings.webhook_addr:
                webhook_server = await _start_webhook_listener(
                    settings, scrubber, store=store, clock=clock, daemon=daemon, metrics=metrics
                )
            metrics_server = None
            if metrics is not None and settings.metrics_addr:
                from tracker.metrics import start_metrics_server

                metrics_server = await start_metrics_server(
                    settings.metrics_addr,
                    metrics,
                    lambda: asyncio.to_thread(health_problem, settings),
                )
            if early_stop.is_set():
                # A signal during start-up (migrations, registering): stop as soon as started.
                daemon.request_stop()
            try:
                await daemon.run()
            finally:
                for helper in helpers:
                    helper.cancel()
                await asyncio.gather(*helpers, return_exceptions=True)
                if webhook_server is not None:
                    await webhook_server.cleanup()
                if metrics_server is not None:
                    await metrics_server.cleanup()
                with contextlib.suppress(sa.exc.SQLAlchemyError):
                    await asyncio.to_thread(store.mark_stopped, owner)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        notifier.close()
        engine.dispose()


async def _start_webhook_listener(
    settings: Settings,
    scrubber: SecretScrubber,
    *,
    store: Store,
    clock: DatabaseClock,
    daemon: Daemon,
    metrics: Metrics | None,
) -> web.AppRunner:
    """Serve webhook deliveries on TRACKER_WEBHOOK_ADDR until `cleanup()`.

    A delivery moves the named batches' next check to now in the database and wakes this
    daemon; on PostgreSQL the store's NOTIFY wakes the other instances too. Every delivery
    with the right secret is counted by outcome and noted for the heartbeat.
    """

    from tracker.domain.addresses import parse_listen_address
    from tracker.domain.recent_hints import RecentlyAsked
    from tracker.http_listener import start_listener
    from tracker.webhook import webhook_app

    secret = settings.read_webhook_secret()
    scrubber.add(secret)
    host, port = parse_listen_address(settings.webhook_addr or "")

    recent = RecentlyAsked(settings.poll_min_interval)
    loop = asyncio.get_running_loop()

    async def bring_forward(request_ids: set[str]) -> set[str]:
        # Ids asked about within the spacing cannot be brought forward again: a flood of
        # deliveries naming the same batches costs no database work past the first.
        fresh = recent.claim(request_ids, loop.time())
        if not fresh:
            return set()
        try:
            moved = await asyncio.to_thread(
                store.bring_forward, fresh, clock.now(), settings.poll_min_interval
            )
        except BaseException:
            recent.forget(fresh)
            raise
        if moved:
            daemon.wake()
        return moved

    def on_outcome(outcome: str) -> None:
        if metrics is not None:
            metrics.observe_webhook(outcome)
        if outcome != "refused":
            daemon.delivery_heard()

    app = webhook_app(
        secret, bring_forward=bring_forward, max_body=WEBHOOK_MAX_BODY, on_outcome=on_outcome
    )
    return await start_listener(app, host, port, event="webhook.listening")


async def _register(store: Store, owner: str) -> datetime:
    """Join the instances, first freeing the leases of this machine's dead predecessors.

    After a crash, systemd restarts the daemon within seconds; the batches its predecessor
    held are taken up again now, not after the heartbeat timeout or the lease. Returns the
    database's clock.
    """
    host, pid, boot = socket.gethostname(), os.getpid(), boot_identity()
    predecessors = await asyncio.to_thread(store.running_instances, host)
    dead = dead_predecessors(predecessors, me=owner, my_pid=pid, my_boot=boot)
    if dead:
        freed = await asyncio.to_thread(store.free_instances, dead)
        log.warning(
            "instance.predecessors_freed",
            owners=sorted(freed),
            batches=sum(freed.values()),
            detail="their process is gone; their batches are free",
        )
    return await asyncio.to_thread(store.register_instance, owner, host, pid, boot)


async def _stop_when(daemon: Daemon, store: Store, until: Callable[[Store], bool]) -> None:
    while not await asyncio.to_thread(until, store):
        await asyncio.sleep(0.2)
    daemon.request_stop()
