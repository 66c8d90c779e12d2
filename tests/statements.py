"""The statements an engine sends, as sent: for reading their query plans (the tests and the
benchmarks EXPLAIN exactly what the store runs, parameters included)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa

Sent = tuple[str, Any]


@contextmanager
def sent_statements(engine: sa.Engine) -> Iterator[list[Sent]]:
    """Every (statement, parameters) `engine` sends to its driver while the block runs."""
    sent: list[Sent] = []

    def record(_connection: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        sent.append((statement, parameters))

    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)


def first_starting(sent: list[Sent], start: str) -> Sent:
    """The first statement sent that begins with `start` (say, the claim's UPDATE)."""
    return next((sql, parameters) for sql, parameters in sent if sql.lstrip().startswith(start))
