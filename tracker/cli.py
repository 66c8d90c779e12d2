"""`tracker`: parse arguments, build the objects, call one function.

Heavy imports (SQLAlchemy, httpx, APScheduler) happen inside the commands, so `--help`
and simple commands start fast.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from types import FrameType

    from tracker.settings import Settings
    from tracker.store import Store

    # What `add_subparsers` returns: each configure_*_parser function adds one command to it.
    Commands = argparse._SubParsersAction[argparse.ArgumentParser]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

# Request ids `tracker add` inserts per statement.
ADD_CHUNK = 1000

# The settings that shape how the daemon recovers, waits and bounds what it takes in; the
# README lists every one.
RUN_SETTINGS = """\
recovery and pauses (environment, or the TOML file without the prefix):
  TRACKER_LEASE_DURATION=300     how long a claim lasts before another instance may take it
  TRACKER_HEARTBEAT_TIMEOUT=30   an instance silent this long is presumed dead and its
                                 batches are freed (a restart on the same machine frees
                                 its dead predecessor's batches at once); at least 3 s
  TRACKER_MAX_RETRY_AFTER=3600   the longest pause a 429's Retry-After may impose
  TRACKER_SHUTDOWN_GRACE=20      on SIGTERM, how long in-flight work may finish
limits:
  TRACKER_MAX_FILE_SIZE=10G      the largest output file accepted (and never more than the
                                 output directory's free space)
  TRACKER_FILE_MODE=640          output files: 600, 640, 400 or 440
  TRACKER_ON_FINAL_ENV=          names of further variables the on-final hook may see
every setting: README.md, section Configuration
"""


def _settings(args: argparse.Namespace) -> Settings:
    from tracker.settings import load_settings

    return load_settings(config_file=args.config)


def _logging(settings: Settings) -> Any:
    from tracker.logs import configure_logging

    return configure_logging(settings.log_format, settings.log_level)


def _store(settings: Settings, *, migrate: bool = False) -> Store:
    from tracker.db import create_engine_for, upgrade_database
    from tracker.services import make_store

    engine = create_engine_for(settings.database_url)
    if migrate:
        upgrade_database(engine)
    return make_store(settings, engine)


def _now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _logging(settings)
    _store(settings, migrate=True)
    print("database is at the latest schema")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    import asyncio

    from tracker.daemon import run_service

    settings = _settings(args)
    settings.require_credentials()
    settings.require_webhook_secret()
    scrubber = _logging(settings)
    if _signalled_before_start:  # some `except BaseException` swallowed its SystemExit
        return EXIT_OK
    asyncio.run(run_service(settings, scrubber))
    return EXIT_OK


# Set by the handler below: cmd_run checks it in case an `except BaseException` somewhere in
# the start-up code swallowed the SystemExit.
_signalled_before_start = False


def _exit_0_on_signals_until_the_daemon_starts() -> None:
    """SIGTERM or SIGINT from now until run_service installs its own handlers: exit 0.

    Importing SQLAlchemy, httpx and APScheduler, loading settings and setting up logging
    come before run_service installs the daemon's handlers (its first step; they replace
    these). With the default action a signal in that window killed the process by signal,
    which systemd counts as a failure, though nothing was claimed yet. The handler raises
    rather than sets a flag: Python retries a system call the signal interrupted (a blocking
    open() or read()) once the handler returns, so only an exception gets out of it.
    """
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _exit_before_start)


def _exit_before_start(signum: int, frame: FrameType | None) -> None:
    global _signalled_before_start
    _signalled_before_start = True
    raise SystemExit(EXIT_OK)


def cmd_sweep(args: argparse.Namespace) -> int:
    import asyncio

    from tracker.services import open_services

    settings = _settings(args)
    settings.require_credentials()
    scrubber = _logging(settings)

    async def one_pass() -> Any:
        async with open_services(settings, scrubber) as services:
            sweeper = services.sweeper
            return await sweeper.sweep()

    report = asyncio.run(one_pass())
    print(
        f"claimed {report.claimed}, checked {report.checked}, transitions {report.transitions}, "
        f"downloaded {report.downloaded}, conflicts {report.conflicts}, errors {report.errors}"
    )
    return EXIT_FAILURE if report.auth_failed else EXIT_OK


def cmd_web(args: argparse.Namespace) -> int:
    import asyncio

    from tracker.console.serve import serve_console

    settings = _settings(args)
    token = settings.read_console_token()
    scrubber = _logging(settings)
    # The last line of defence: were the token ever to reach a log value, it goes.
    scrubber.add(token)
    if _signalled_before_start:
        return EXIT_OK
    asyncio.run(serve_console(settings, token=token, allow_actions=args.allow_actions))
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    from tracker.health import health_problem

    settings = _settings(args)
    problem = health_problem(settings)
    if problem is not None:
        print(f"tracker: unhealthy: {problem}", file=sys.stderr)
        return EXIT_FAILURE
    print("ok")
    return EXIT_OK


def cmd_add(args: argparse.Namespace) -> int:
    from tracker.domain.request_ids import request_id_problem

    # id -> where it came from ("ids.txt:3"), first occurrence wins: a repeated id is
    # one batch, not an "already tracked" surprise on its second line.
    wanted: dict[str, str | None] = dict.fromkeys(args.request_ids)
    if args.from_file is not None:
        try:
            for line_id, line_origin in _request_ids_from(args.from_file):
                wanted.setdefault(line_id, line_origin)
        except OSError as error:
            print(f"tracker: cannot read {args.from_file}: {error.strerror}", file=sys.stderr)
            return EXIT_USAGE
    if not wanted and args.from_file is None:
        print("tracker: add: give request ids, or --from-file PATH", file=sys.stderr)
        return EXIT_USAGE

    settings = _settings(args)
    _logging(settings)
    store = _store(settings, migrate=True)
    valid: list[str] = []
    refused = 0
    for request_id, origin in wanted.items():
        problem = request_id_problem(request_id)
        if problem is None:
            valid.append(request_id)
            continue
        where = f" ({origin})" if origin else ""
        print(f"refused{where}: {problem}", file=sys.stderr)
        refused += 1
    added = known = 0
    # Many ids per INSERT rather than one round trip each: a long file goes in quickly,
    # and each chunk's ids are reported as soon as it is committed.
    for start in range(0, len(valid), ADD_CHUNK):
        chunk = valid[start : start + ADD_CHUNK]
        new = store.enqueue_many(chunk, label=args.label)
        for request_id in chunk:
            print(f"added {request_id}" if request_id in new else f"already tracked {request_id}")
        added += len(new)
        known += len(chunk) - len(new)
    # On stderr, so stdout stays one line per id for scripts.
    print(f"added {added}, already tracked {known}, refused {refused}", file=sys.stderr)
    return EXIT_FAILURE if refused else EXIT_OK


def _request_ids_from(path: str) -> list[tuple[str, str]]:
    """Ids in a file (or stdin for "-"), one per line; blank lines and # comments skipped.

    Undecodable bytes become U+FFFD, so such a line is refused as malformed on its own
    instead of failing the whole file.
    """
    if path == "-":
        data, name = sys.stdin.buffer.read(), "stdin"
    else:
        data, name = Path(path).read_bytes(), path
    found: list[tuple[str, str]] = []
    for number, line in enumerate(data.decode("utf-8-sig", "replace").splitlines(), start=1):
        request_id = line.split("#", 1)[0].strip()
        if request_id:
            found.append((request_id, f"{name}:{number}"))
    return found


def cmd_list(args: argparse.Namespace) -> int:
    from tracker.views.render import print_batches

    settings = _settings(args)
    _logging(settings)
    store = _store(settings)
    print_batches(store.list_batches(args.state, limit=args.limit), as_json=args.json)
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    from tracker.views.render import print_batch

    settings = _settings(args)
    _logging(settings)
    store = _store(settings)
    row = store.get(args.request_id)
    if row is None:
        print(f"not tracked: {args.request_id}", file=sys.stderr)
        return EXIT_FAILURE
    print_batch(row, store.history(row.id), as_json=args.json)
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from tracker.services import read_only_services
    from tracker.views.render import print_status
    from tracker.views.snapshots import collect_status

    settings = _settings(args)
    _logging(settings)
    # Read, never reserved from: the budget every instance sharing the database draws on.
    services = read_only_services(settings)
    print_status(collect_status(services.store, services.budget), as_json=args.json)
    return EXIT_OK


def cmd_watch(args: argparse.Namespace) -> int:
    from tracker.views.watch import watch_batches

    settings = _settings(args)
    _logging(settings)
    store = _store(settings)
    return watch_batches(
        store, interval=args.interval, label=args.label, until_done=args.until_done
    )


def _operator(args: argparse.Namespace, verb: str) -> int:
    from tracker.store import OperatorResult

    settings = _settings(args)
    _logging(settings)
    store = _store(settings)
    move = store.retry if verb == "retry" else store.cancel
    result, state = move(args.request_id, _now())
    if result is OperatorResult.NOT_FOUND:
        print(f"not tracked: {args.request_id}", file=sys.stderr)
        return EXIT_FAILURE
    if result is OperatorResult.WRONG_STATE:
        need = "a finished" if verb == "retry" else "an unfinished"
        print(f"cannot {verb} {args.request_id}: it is {state}, not {need} batch", file=sys.stderr)
        return EXIT_FAILURE
    print(f"{verb}: {args.request_id} ({state} -> {'pending' if verb == 'retry' else 'cancelled'})")
    return EXIT_OK


def cmd_retry(args: argparse.Namespace) -> int:
    return _operator(args, "retry")


def cmd_cancel(args: argparse.Namespace) -> int:
    return _operator(args, "cancel")


def cmd_prune(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime, timedelta

    from tracker.prune import FileRemoval, remove_output_file

    settings = _settings(args)
    _logging(settings)
    store = _store(settings)
    cutoff = datetime.now(UTC) - timedelta(seconds=args.older_than)
    output_dir = settings.output_dir.resolve()
    batches = files = missing = 0
    for chunk in store.prune(cutoff, chunk=args.chunk):
        batches += len(chunk)
        if not args.files:
            continue
        for row in chunk:
            removal = remove_output_file(row.file_path, output_dir)
            if removal is FileRemoval.KEPT:
                print(f"kept {Path(str(row.file_path))}: not in {output_dir}", file=sys.stderr)
            files += removal is FileRemoval.DELETED
            missing += removal is FileRemoval.ALREADY_GONE
    note = f", {files} files deleted ({missing} already gone)" if args.files else ""
    if args.files:
        from tracker.leftovers import remove_stale_temp_files

        # Temp files of downloads that will never finish (older than the deadline, their
        # batch not leased), whatever the age of the batch: partial KYC data.
        stale = remove_stale_temp_files(output_dir, store, settings.download_deadline)
        note += f", {len(stale)} stale temp files removed"
    print(f"pruned {batches} final batches finished before {cutoff:%Y-%m-%d %H:%M:%S} UTC{note}")
    return EXIT_OK


def cmd_submit(args: argparse.Namespace) -> int:
    import asyncio

    from tracker.deepvue import AuthFailed, SubmitFailed
    from tracker.services import open_api

    settings = _settings(args)
    settings.require_credentials()
    scrubber = _logging(settings)
    if not args.file.is_file():
        print(f"tracker: submit: no such file: {args.file}", file=sys.stderr)
        return EXIT_USAGE

    webhook_url, webhook_secret = None, None
    if settings.webhook_public_url:
        webhook_url, webhook_secret = _webhook_url(settings)
        scrubber.add(webhook_secret)

    async def upload_and_track() -> str:
        async with open_api(settings, scrubber) as api:
            client, store = api.client, api.store
            request_id = await client.submit_upi_batch(args.file, webhook_url=webhook_url)
            await asyncio.to_thread(store.enqueue, request_id, label=args.label)
            return request_id

    try:
        request_id = asyncio.run(upload_and_track())
    except (SubmitFailed, AuthFailed) as error:
        from tracker.domain.redact import redact

        # The client scrubs its own secret; the webhook URL it was given holds another.
        shown = redact(str(error), [webhook_secret] if webhook_secret else [])
        print(f"tracker: submit failed: {shown}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"submitted {args.file.name} as {request_id}; tracking it")
    return EXIT_OK


def _webhook_url(settings: Settings) -> tuple[str, str]:
    """The URL Deepvue is to call (public base + the listener's path) and its secret."""
    from tracker.settings import SettingsError
    from tracker.webhook import WEBHOOK_PATH

    if not settings.webhook_public_url:
        raise SettingsError("TRACKER_WEBHOOK_PUBLIC_URL must be set for webhooks")
    secret = settings.read_webhook_secret()
    return settings.webhook_public_url + WEBHOOK_PATH.replace("{secret}", secret), secret


def cmd_webhook_url(args: argparse.Namespace) -> int:
    url, _secret = _webhook_url(_settings(args))
    print(url)
    return EXIT_OK


def cmd_fake_api(args: argparse.Namespace) -> int:
    from tracker.simulator import SimulatorConfig, serve_forever

    config = SimulatorConfig(
        client_id=args.client_id,
        client_secret=args.client_secret,
        completion_delay=args.completion_delay,
        latency=args.latency,
        error_rate=args.error_rate,
        rate_per_second=args.rate_per_second,
        rate_per_minute=args.rate_per_minute,
        rate_per_day=args.rate_per_day,
        url_ttl=args.url_ttl,
        file_size=args.file_size,
        big_file_size=args.big_file_size,
        throttle_first=args.throttle_first,
        throttle_retry_after=args.throttle_retry_after,
        webhook_url=args.webhook_url,
        webhook_drop_rate=args.webhook_drop_rate,
        webhook_delay=args.webhook_delay,
        webhook_duplicates=args.webhook_duplicates,
        webhook_wrong_secret_rate=args.webhook_wrong_secret_rate,
        webhook_garbage_rate=args.webhook_garbage_rate,
    )

    def announce(url: str) -> None:
        print(json.dumps({"event": "simulator.listening", "url": url}), flush=True)

    serve_forever(config, host=args.host, port=args.port, announce=announce)
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from tracker.demo import run_demo

    return run_demo(clean=args.clean)


def build_parser() -> argparse.ArgumentParser:
    from tracker import __version__

    parser = argparse.ArgumentParser(
        prog="tracker",
        description="Track Deepvue bulk-verification batches until their output files are on disk.",
        epilog="Settings come from TRACKER_* environment variables and an optional TOML file; see the README.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--config",
        type=Path,
        help="TOML settings file (default: $TRACKER_CONFIG); environment wins",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # In this order in `tracker --help`.
    configure_db_parser(commands)
    configure_run_parser(commands)
    configure_sweep_parser(commands)
    configure_check_parser(commands)
    configure_add_parser(commands)
    configure_list_parser(commands)
    configure_show_parser(commands)
    configure_status_parser(commands)
    configure_watch_parser(commands)
    configure_retry_parser(commands)
    configure_cancel_parser(commands)
    configure_prune_parser(commands)
    configure_submit_parser(commands)
    configure_webhook_url_parser(commands)
    configure_web_parser(commands)
    configure_fake_api_parser(commands)
    configure_demo_parser(commands)
    return parser


def _add_command(
    commands: Commands, name: str, handler: Callable[[argparse.Namespace], int], text: str
) -> argparse.ArgumentParser:
    """A sub-command whose one-line help is also its description, run by `handler`."""
    sub = commands.add_parser(name, help=text, description=text)
    sub.set_defaults(handler=handler)
    return sub


def configure_db_parser(commands: Commands) -> None:
    db = commands.add_parser(
        "db", help="database schema commands", description="Database schema commands."
    )
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="COMMAND")
    upgrade = db_commands.add_parser(
        "upgrade",
        help="apply migrations (safe when several instances start at once)",
        description="Apply the Alembic migrations to TRACKER_DATABASE_URL.",
    )
    upgrade.set_defaults(handler=cmd_db_upgrade)


def configure_run_parser(commands: Commands) -> None:
    run = _add_command(
        commands,
        "run",
        cmd_run,
        "run the daemon in the foreground (applies migrations first); SIGTERM stops it cleanly",
    )
    run.formatter_class = argparse.RawDescriptionHelpFormatter
    run.epilog = RUN_SETTINGS


def configure_sweep_parser(commands: Commands) -> None:
    _add_command(commands, "sweep", cmd_sweep, "work every batch that is due now once, then exit")


def configure_check_parser(commands: Commands) -> None:
    _add_command(
        commands,
        "check",
        cmd_check,
        "exit 0 if the database answers, its schema is current and this host's daemon swept "
        "recently; else exit 1 with one line saying what is wrong",
    )


def configure_add_parser(commands: Commands) -> None:
    add = _add_command(
        commands,
        "add",
        cmd_add,
        "start tracking request ids given as arguments and/or one per line in a file "
        "(already tracked ones are reported, not errors; malformed ones are refused, exit 1)",
    )
    add.add_argument("request_ids", nargs="*", metavar="ID")
    add.add_argument(
        "--from-file",
        metavar="PATH",
        help="also read ids from PATH ('-' for stdin): one per line, blank lines and # comments ignored",
    )
    add.add_argument("--label", help="free text stored with the batch for the producer")


def configure_list_parser(commands: Commands) -> None:
    listing = _add_command(commands, "list", cmd_list, "list tracked batches")
    listing.add_argument("--state", type=_state_arg, help="only batches in this state")
    listing.add_argument("--limit", type=int, default=None, help="at most this many rows")
    listing.add_argument(
        "--json",
        action="store_true",
        help="print a JSON array of batches with every column (timestamps ISO-8601 UTC)",
    )


def configure_show_parser(commands: Commands) -> None:
    show = _add_command(commands, "show", cmd_show, "show one batch and its transitions")
    show.add_argument("request_id", metavar="ID")
    show.add_argument(
        "--json",
        action="store_true",
        help="print a JSON object: every column of the batch plus a 'transitions' array",
    )


def configure_status_parser(commands: Commands) -> None:
    status = _add_command(
        commands,
        "status",
        cmd_status,
        "one screen: batches per state, call budget used and left, the oldest unfinished "
        "batch, the last sweep, recent errors",
    )
    status.add_argument("--json", action="store_true", help="print the same as a JSON object")


def configure_watch_parser(commands: Commands) -> None:
    watch = _add_command(
        commands,
        "watch",
        cmd_watch,
        "a live view of batches per state, progress and recent transitions; "
        "Ctrl-C or SIGTERM quits (exit 0)",
    )
    watch.add_argument(
        "--interval",
        type=_duration_arg,
        default=2.0,
        metavar="DURATION",
        help="refresh every DURATION: seconds or with units, e.g. 0.5, 2, 10s, 1m (default 2)",
    )
    watch.add_argument(
        "--label", help="only batches with this label (progress and transitions alike)"
    )
    watch.add_argument(
        "--until-done",
        action="store_true",
        help="exit 0 as soon as no batch (with --label: no such batch) is unfinished",
    )


def configure_retry_parser(commands: Commands) -> None:
    retry = _add_command(
        commands,
        "retry",
        cmd_retry,
        "put a finished batch back to pending (recorded as a transition)",
    )
    retry.add_argument("request_id", metavar="ID")


def configure_cancel_parser(commands: Commands) -> None:
    cancel = _add_command(commands, "cancel", cmd_cancel, "stop tracking an unfinished batch")
    cancel.add_argument("request_id", metavar="ID")


def configure_prune_parser(commands: Commands) -> None:
    prune = _add_command(
        commands,
        "prune",
        cmd_prune,
        "delete final batches (and their transitions) finished longer ago than --older-than, "
        "in small chunks that never block the daemon",
    )
    prune.add_argument(
        "--older-than",
        type=_duration_arg,
        required=True,
        metavar="DURATION",
        help="age of the batches to delete, e.g. 30d, 12h, 90m (a bare number is seconds)",
    )
    prune.add_argument(
        "--files",
        action="store_true",
        help="also delete their output files, and stale download temp files (.part) whose "
        "batch holds no lease (only inside the output dir)",
    )
    prune.add_argument(
        "--chunk", type=int, default=500, help="batches per transaction (default 500)"
    )


def configure_submit_parser(commands: Commands) -> None:
    submit = _add_command(
        commands,
        "submit",
        cmd_submit,
        "upload a UPI batch file to Deepvue (/v1/verification/upi-basic/batch) and track the "
        "request_id it returns",
    )
    submit.add_argument("file", type=Path, metavar="FILE")
    submit.add_argument("--label", help="free text stored with the batch")


def configure_webhook_url_parser(commands: Commands) -> None:
    _add_command(
        commands,
        "webhook-url",
        cmd_webhook_url,
        "print the URL Deepvue is to call back (TRACKER_WEBHOOK_PUBLIC_URL + /webhook/<secret>); "
        "it holds the webhook secret",
    )


WEB_SETTINGS = """\
settings (environment, or the TOML file without the prefix):
  TRACKER_CONSOLE_ADDR=127.0.0.1:8465  where the console listens (HOST:PORT); keep it on
                                       loopback and put an HTTPS proxy in front to share it
  TRACKER_CONSOLE_TOKEN=               the access token, at least 16 characters (required)
  TRACKER_CONSOLE_TOKEN_FILE=          or a file holding it (default under systemd: the
                                       credential console_token)
  TRACKER_DATABASE_URL                 the database the daemon uses
Browsers log in with the token at /login (a session cookie); scripts send
"Authorization: Bearer <token>". Without --allow-actions the console only reads, and a
read-only database role is enough on PostgreSQL.
"""


def configure_web_parser(commands: Commands) -> None:
    web = _add_command(
        commands,
        "web",
        cmd_web,
        "serve the operator console (overview, batches, one batch's history) in the "
        "foreground; SIGTERM stops it (exit 0)",
    )
    web.formatter_class = argparse.RawDescriptionHelpFormatter
    web.epilog = WEB_SETTINGS
    web.add_argument(
        "--allow-actions",
        action="store_true",
        help="show Retry and Cancel on a batch's page and accept them (recorded as "
        "transitions, like `tracker retry` and `tracker cancel`); read-only otherwise",
    )


def configure_fake_api_parser(commands: Commands) -> None:
    fake = _add_command(
        commands, "fake-api", cmd_fake_api, "serve the bundled Deepvue simulator on loopback"
    )
    fake.add_argument(
        "--host", default="127.0.0.1", help="loopback address to bind (default 127.0.0.1)"
    )
    fake.add_argument(
        "--port", type=int, default=8765, help="port (0 picks a free one; default 8765)"
    )
    fake.add_argument("--client-id", default="demo-client")
    fake.add_argument("--client-secret", default="demo-secret")
    fake.add_argument(
        "--completion-delay", type=float, default=2.0, help="seconds until a batch completes"
    )
    fake.add_argument(
        "--latency", type=float, default=0.0, help="seconds added to each status answer"
    )
    fake.add_argument(
        "--error-rate", type=float, default=0.0, help="share of status calls answered 503"
    )
    fake.add_argument(
        "--rate-per-second", type=int, default=None, help="answer 429 above this rate"
    )
    fake.add_argument("--rate-per-minute", type=int, default=None)
    fake.add_argument("--rate-per-day", type=int, default=None)
    fake.add_argument(
        "--url-ttl", type=float, default=600.0, help="seconds an output URL stays valid"
    )
    fake.add_argument("--file-size", type=int, default=4096, help="bytes per output file")
    fake.add_argument(
        "--big-file-size", type=int, default=8 << 20, help="bytes for ids starting big-"
    )
    fake.add_argument(
        "--throttle-first",
        type=int,
        default=0,
        metavar="N",
        help="answer the first N status calls (since start or /_sim/reset) with 429",
    )
    fake.add_argument(
        "--throttle-retry-after",
        default="300",
        metavar="VALUE",
        help="the Retry-After header of those 429s, sent as given (default 300)",
    )
    fake.add_argument(
        "--webhook-url",
        default=None,
        metavar="URL",
        help="POST each batch's webhook here when it completes (loopback only), unless its "
        "submission or POST /_sim/webhooks named another",
    )
    fake.add_argument(
        "--webhook-drop-rate",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="share of webhooks never sent",
    )
    fake.add_argument(
        "--webhook-delay",
        type=_delay_range_arg,
        default=(0.0, 0.0),
        metavar="SECONDS|LOW:HIGH",
        help="seconds from completion to the webhook, or a range drawn uniformly (default 0)",
    )
    fake.add_argument(
        "--webhook-duplicates",
        type=int,
        default=1,
        metavar="N",
        help="send each webhook N times (default 1)",
    )
    fake.add_argument(
        "--webhook-wrong-secret-rate",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="share of deliveries sent with the URL's last path segment (its secret) altered",
    )
    fake.add_argument(
        "--webhook-garbage-rate",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="share of deliveries whose body is random bytes instead of JSON",
    )


def _delay_range_arg(text: str) -> tuple[float, float]:
    low_text, _, high_text = text.partition(":")
    try:
        low = float(low_text)
        high = float(high_text) if high_text else low
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not SECONDS or LOW:HIGH") from None
    if not 0 <= low <= high:
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 <= LOW <= HIGH")
    return (low, high)


def configure_demo_parser(commands: Commands) -> None:
    demo = _add_command(
        commands,
        "demo",
        cmd_demo,
        "run a dozen batches against the simulator, end to end, in a temp dir",
    )
    demo.add_argument("--clean", action="store_true", help="remove the temp directory afterwards")


def _duration_arg(text: str) -> float:
    from tracker.domain.durations import parse_duration

    try:
        seconds = parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: {error}") from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: must be positive")
    return seconds


def _state_arg(text: str) -> Any:
    from tracker.domain.states import parse_state

    try:
        return parse_state(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.handler in (cmd_run, cmd_web):
        # Before anything heavy is imported (the next line already is).
        _exit_0_on_signals_until_the_daemon_starts()
    from sqlalchemy.exc import OperationalError

    from tracker.db import describe_db_error
    from tracker.settings import SettingsError

    try:
        return int(args.handler(args))
    except SettingsError as error:
        print(f"tracker: configuration error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except OperationalError as error:
        reason = describe_db_error(error, with_type=False)
        print(f"tracker: database unreachable: {reason}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE
