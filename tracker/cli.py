"""`tracker`: parse arguments, build the objects, call one function.

Heavy imports (SQLAlchemy, httpx, APScheduler) happen inside the commands, so `--help`
and simple commands start fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tracker.settings import Settings
    from tracker.store import Store

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def _settings(args: argparse.Namespace) -> Settings:
    from tracker.settings import load_settings

    return load_settings(config_file=args.config)


def _logging(settings: Settings) -> Any:
    from tracker.logs import configure_logging

    return configure_logging(settings.log_format, settings.log_level)


def _store(settings: Settings, *, migrate: bool = False) -> Store:
    from tracker.db import create_engine_for, upgrade_database
    from tracker.store import Store

    engine = create_engine_for(settings.database_url)
    if migrate:
        upgrade_database(engine)
    return Store(engine)


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
    scrubber = _logging(settings)
    asyncio.run(run_service(settings, scrubber))
    return EXIT_OK


def cmd_sweep(args: argparse.Namespace) -> int:
    import asyncio

    from tracker.daemon import open_sweeper

    settings = _settings(args)
    settings.require_credentials()
    scrubber = _logging(settings)
    store = _store(settings, migrate=True)

    async def one_pass() -> Any:
        async with open_sweeper(settings, store, scrubber) as sweeper:
            return await sweeper.sweep()

    report = asyncio.run(one_pass())
    print(
        f"claimed {report.claimed}, checked {report.checked}, transitions {report.transitions}, "
        f"downloaded {report.downloaded}, conflicts {report.conflicts}, errors {report.errors}"
    )
    return EXIT_FAILURE if report.auth_failed else EXIT_OK


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

    settings = _settings(args)
    _logging(settings)
    store = _store(settings, migrate=True)
    status = EXIT_OK
    for request_id in args.request_ids:
        problem = request_id_problem(request_id)
        if problem is not None:
            print(f"refused: {problem}", file=sys.stderr)
            status = EXIT_FAILURE
        elif store.enqueue(request_id, label=args.label):
            print(f"added {request_id}")
        else:
            print(f"already tracked {request_id}")
    return status


def _when(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else "-"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def cmd_list(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _logging(settings)
    store = _store(settings)
    rows = store.list_batches(args.state, limit=args.limit)
    print(
        _table(
            ["REQUEST_ID", "STATE", "CHECKS", "UPDATED (UTC)", "FILE / LAST ERROR"],
            [
                [
                    row.request_id,
                    row.state,
                    str(row.checks),
                    _when(row.updated_at),
                    row.file_path or (row.last_error or "")[:80],
                ]
                for row in rows
            ],
        )
    )
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _logging(settings)
    store = _store(settings)
    row = store.get(args.request_id)
    if row is None:
        print(f"not tracked: {args.request_id}", file=sys.stderr)
        return EXIT_FAILURE
    for name, value in vars(row).items():
        print(f"{name:18} {value if value is not None else '-'}")
    print()
    print(
        _table(
            ["AT (UTC)", "FROM", "TO", "API", "DETAIL"],
            [
                [
                    _when(t.at),
                    t.from_state,
                    t.to_state,
                    str(t.api_status) if t.api_status is not None else "-",
                    (t.detail or t.api_message or "")[:100],
                ]
                for t in store.history(row.id)
            ],
        )
    )
    return EXIT_OK


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

    def command(
        name: str, handler: Callable[[argparse.Namespace], int], text: str
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text, description=text)
        sub.set_defaults(handler=handler)
        return sub

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

    command(
        "run",
        cmd_run,
        "run the daemon in the foreground (applies migrations first); SIGTERM stops it cleanly",
    )
    command("sweep", cmd_sweep, "work every batch that is due now once, then exit")
    command(
        "check",
        cmd_check,
        "exit 0 if the database answers, its schema is current and this host's daemon swept "
        "recently; else exit 1 with one line saying what is wrong",
    )
    add = command(
        "add", cmd_add, "start tracking request ids (already tracked ones are reported, not errors)"
    )
    add.add_argument("request_ids", nargs="+", metavar="ID")
    add.add_argument("--label", help="free text stored with the batch for the producer")
    listing = command("list", cmd_list, "list tracked batches")
    listing.add_argument("--state", type=_state_arg, help="only batches in this state")
    listing.add_argument("--limit", type=int, default=None, help="at most this many rows")
    show = command("show", cmd_show, "show one batch and its transitions")
    show.add_argument("request_id", metavar="ID")
    retry = command(
        "retry", cmd_retry, "put a finished batch back to pending (recorded as a transition)"
    )
    retry.add_argument("request_id", metavar="ID")
    cancel = command("cancel", cmd_cancel, "stop tracking an unfinished batch")
    cancel.add_argument("request_id", metavar="ID")

    fake = command("fake-api", cmd_fake_api, "serve the bundled Deepvue simulator on loopback")
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

    demo = command(
        "demo", cmd_demo, "run a dozen batches against the simulator, end to end, in a temp dir"
    )
    demo.add_argument("--clean", action="store_true", help="remove the temp directory afterwards")
    return parser


def _state_arg(text: str) -> Any:
    from tracker.domain.states import parse_state

    try:
        return parse_state(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from sqlalchemy.exc import OperationalError

    from tracker.settings import SettingsError

    try:
        return int(args.handler(args))
    except SettingsError as error:
        print(f"tracker: configuration error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except OperationalError as error:
        reason = str(error.orig).strip().splitlines()[0] if error.orig else str(error)
        print(f"tracker: database unreachable: {reason}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE
