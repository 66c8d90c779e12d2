"""Run every benchmark and print each figure next to its baseline, measured in the same run.

    .venv/bin/python bench/run.py            # full run (see bench/README.md for how long)
    .venv/bin/python bench/run.py --quick    # about four minutes, smaller sizes
    .venv/bin/python bench/run.py --only engine,history --markdown out.md

Targets are ratios against a baseline measured side by side (absolute times on a shared
machine mean little), except the few absolute limits the issue sets (memory, pickup).
Exit status 1 when a target is missed, 2 when a benchmark could not run at all.
Everything runs on loopback, bounded in count and time, and cleans up after itself.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# The bench folder is put on the path first, so `common` is found from anywhere.
from common import (
    Figure,
    format_markdown,
    format_table,
    machine_summary,
    pg_admin_engine,
    say,
)

# Cheapest first, so a quick run reports something useful early.
SECTIONS = (
    "quota",
    "history",
    "pickup",
    "idle",
    "webhook",
    "console",
    "download",
    "engine",
    "ceiling",
)
MODULES = {
    "quota": "quota_sim",
    "history": "history",
    "pickup": "pickup",
    "idle": "idle",
    "webhook": "webhook_listener",
    "console": "console",
    "download": "download",
    "engine": "engine",
    "ceiling": "ceiling",
}


def load_section(section: str) -> Callable[[bool], list[Figure]] | str:
    """The section's `run(quick)`, or why it cannot run here."""
    try:
        module = importlib.import_module(MODULES[section])
    except ImportError as error:
        if section == "quota":
            return f"bench/quota_sim.py could not be imported ({error}); quota economy skipped"
        raise
    run: Callable[[bool], list[Figure]] = module.run
    return run


def preflight() -> list[str]:
    warnings = []
    try:
        import tracker  # noqa: F401
    except ImportError:
        print(
            "bench: the tracker package is not importable by this Python; install it first "
            "(python3 -m venv .venv && .venv/bin/pip install .) and run .venv/bin/python bench/run.py",
            file=sys.stderr,
        )
        sys.exit(2)
    if shutil.which("curl") is None:
        warnings.append("curl not found: the download figure cannot run")
    admin = pg_admin_engine()
    if admin is None:
        warnings.append(
            "no PostgreSQL answered at TRACKER_TEST_PG_URL: PostgreSQL figures are skipped"
        )
    else:
        admin.dispose()
    load = os.getloadavg()[0]
    if load > 0.5 * (os.cpu_count() or 1):
        warnings.append(
            f"the machine is busy (load average {load:.2f} on {os.cpu_count()} CPUs): "
            "ratios are measured side by side, but expect noise"
        )
    return warnings


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, about four minutes")
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run (default all: {','.join(SECTIONS)})",
    )
    parser.add_argument("--markdown", type=Path, help="also write the results as Markdown here")
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s): {', '.join(unknown)}")

    started = time.monotonic()
    when = datetime.now(UTC)
    machine = machine_summary()
    warnings = preflight()
    for warning in warnings:
        say(f"warning: {warning}")
    figures: list[Figure] = []
    broken: list[str] = []
    for section in SECTIONS:
        if section not in chosen:
            continue
        section_started = time.monotonic()
        say(f"== {section}")
        run = load_section(section)
        if isinstance(run, str):
            say(run)
            warnings.append(run)
            continue
        try:
            figures += run(args.quick)
        except Exception as error:
            traceback.print_exc()
            broken.append(f"{section}: {type(error).__name__}: {error}")
            figures.append(
                Figure(
                    f"{section}: could not run",
                    None,
                    None,
                    "",
                    "",
                    None,
                    "-",
                    False,
                    note=str(error),
                )
            )
        say(f"== {section} took {time.monotonic() - section_started:.0f} s")
    elapsed = time.monotonic() - started

    mode = "--quick" if args.quick else "full"
    print()
    print(f"tracker benchmarks ({mode}), {when:%Y-%m-%d %H:%M} UTC, {elapsed:.0f} s")
    print(machine)
    print()
    print(format_table(figures))
    notes = [f for f in figures if f.note or f.details]
    if notes:
        print()
        for figure in notes:
            if figure.note:
                print(f"- {figure.name}: {figure.note}")
            for line in figure.details:
                print(f"    {line}")
    for warning in warnings:
        print(f"! {warning}")

    missed = [f for f in figures if f.met is False]
    if args.markdown is not None:
        args.markdown.write_text(
            markdown_report(figures, when, machine, mode, elapsed, warnings), encoding="utf-8"
        )
    print()
    if broken:
        print(f"{len(broken)} benchmark(s) could not run: " + "; ".join(broken))
        return 2
    if missed:
        print(f"{len(missed)} target(s) missed: " + "; ".join(f.name for f in missed))
        return 1
    print("every target met")
    return 0


def markdown_report(
    figures: list[Figure],
    when: datetime,
    machine: str,
    mode: str,
    elapsed: float,
    warnings: list[str],
) -> str:
    lines = [
        f"Run: `python bench/run.py{' --quick' if mode == '--quick' else ''}`, "
        f"{when:%Y-%m-%d %H:%M} UTC, {elapsed:.0f} s.",
        "",
        f"Machine: {machine}.",
        "",
        format_markdown(figures),
        "",
    ]
    for figure in figures:
        if figure.note:
            lines.append(f"- {figure.name}: {figure.note}")
    for figure in figures:
        if figure.details:
            lines += ["", "```", *figure.details, "```"]
    for warning in warnings:
        lines.append(f"- note: {warning}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
