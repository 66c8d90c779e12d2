"""Structured logs for the tracker and for every library it uses, with secrets scrubbed.

In json mode each line on stderr is one JSON object, whether it came from structlog or
from a library's stdlib logger (alembic, httpx, sqlalchemy, apscheduler).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from tracker.domain.redact import MIN_SECRET_LENGTH, redact


class SecretScrubber:
    """Removes known secrets, JWTs, URL query strings and credential values from log values.

    The last line of defence, whichever library wrote the line: the redaction itself is
    `tracker.domain.redact.redact`, the same that guards stored answers and shown URLs.
    """

    def __init__(self) -> None:
        self._secrets: set[str] = set()

    def add(self, secret: str) -> None:
        # Very short strings would blank out ordinary words; a real secret is never that short.
        if len(secret) >= MIN_SECRET_LENGTH:
            self._secrets.add(secret)

    def scrub(self, text: str) -> str:
        return redact(text, self._secrets)

    def __call__(
        self, _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key, value in event_dict.items():
            if isinstance(value, str):
                event_dict[key] = self.scrub(value)
            elif value is not None and not isinstance(value, bool | int | float):
                event_dict[key] = self.scrub(str(value))
        return event_dict


def _stdlib_message(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    # A library's record arrives with its formatted message as `event`; keep its logger
    # name so a reader can tell httpx from alembic.
    record = event_dict.get("_record")
    if record is not None and "logger" not in event_dict:
        event_dict["logger"] = record.name
    return event_dict


def configure_logging(
    log_format: str, level: str, *, stream: TextIO | None = None
) -> SecretScrubber:
    """Route structlog and stdlib logging through one handler; return the scrubber to feed."""
    scrubber = SecretScrubber()
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, _stdlib_message],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            scrubber,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    # One line per HTTP request is noise at INFO; the tracker logs its own events instead.
    quiet = logging.DEBUG if level == "DEBUG" else logging.WARNING
    for name in ("httpx", "httpcore", "apscheduler", "sqlalchemy.engine", "aiohttp.access"):
        logging.getLogger(name).setLevel(quiet)
    logging.getLogger("alembic").setLevel(logging.INFO if level != "DEBUG" else logging.DEBUG)
    # Alembic announces each of its plugins at INFO on every start: noise for operators.
    logging.getLogger("alembic.runtime.plugins").setLevel(quiet)

    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    return scrubber
