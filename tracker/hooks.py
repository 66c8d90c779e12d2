"""TRACKER_ON_FINAL: a command run once for each batch that became final.

The command gets the batch in its environment, runs with a time limit, and has its output
logged. Whatever it does, the batch is already final: a failing hook changes nothing.
"""

from __future__ import annotations

import asyncio
import os
import shlex
from collections.abc import Iterable, Mapping

import structlog

from tracker.store import BatchRow

log = structlog.get_logger("tracker.hooks")

# The hook gets an allow-list, not the daemon's environment: that holds the database URL
# (perhaps with a password), PGPASSWORD, TRACKER_CONFIG and whatever else the service has.
_PASSED = frozenset({"PATH", "LANG", "TZ", "HOME"})
_PASSED_PREFIX = "LC_"
# Never hand the API credentials to a hook, even when listed: it needs the batch, not the keys.
_WITHHELD = frozenset(
    {"TRACKER_CLIENT_SECRET", "TRACKER_CLIENT_SECRET_FILE", "CREDENTIALS_DIRECTORY"}
)
_MAX_LOGGED_LINES = 50


def hook_environment(
    batch: BatchRow, base: Mapping[str, str], allowed: Iterable[str] = ()
) -> dict[str, str]:
    """The hook's environment: PATH, LANG, LC_*, TZ, HOME, the names in `allowed`
    (TRACKER_ON_FINAL_ENV) that `base` has, and the batch's TRACKER_* variables."""
    listed = frozenset(allowed)
    env = {
        key: value
        for key, value in base.items()
        if (key in _PASSED or key.startswith(_PASSED_PREFIX) or key in listed)
        and key not in _WITHHELD
    }
    # Set last, so a listed name cannot stand in for the batch's own variables.
    env.update(
        TRACKER_REQUEST_ID=batch.request_id,
        TRACKER_STATE=batch.state,
        TRACKER_LABEL=batch.label or "",
        TRACKER_FILE_PATH=batch.file_path or "",
        TRACKER_FILE_SHA256=batch.file_sha256 or "",
        TRACKER_LAST_ERROR=batch.last_error or "",
    )
    return env


async def run_final_hook(
    command: str, batch: BatchRow, timeout: float, *, allowed_env: Iterable[str] = ()
) -> int | None:
    """Run the hook for one batch; its exit code, or None if it could not run or timed out."""
    bound = log.bind(request_id=batch.request_id, state=batch.state)
    try:
        process = await asyncio.create_subprocess_exec(
            *shlex.split(command),
            env=hook_environment(batch, os.environ, allowed_env),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
    except (OSError, ValueError) as error:  # ValueError: a NUL in the environment
        reason = error.strerror if isinstance(error, OSError) else str(error)
        bound.error("hook.failed", error=f"cannot start {command!r}: {reason}")
        return None
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        bound.error("hook.timeout", timeout=timeout)
        return None
    lines = output.decode("utf-8", errors="replace").splitlines()
    for line in lines[:_MAX_LOGGED_LINES]:
        bound.info("hook.output", line=line)
    if len(lines) > _MAX_LOGGED_LINES:
        bound.info("hook.output_truncated", lines=len(lines))
    if process.returncode == 0:
        bound.info("hook.done")
    else:
        bound.warning("hook.failed", exit_code=process.returncode)
    return process.returncode
