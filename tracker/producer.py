"""The Python API for applications that enqueue batches: `tracker.enqueue(...)`."""

from __future__ import annotations

import sqlalchemy as sa

from tracker.db import create_engine_for
from tracker.domain.request_ids import request_id_problem
from tracker.store import Store


def enqueue(database: str | sa.Engine, request_id: str, label: str | None = None) -> bool:
    """Start tracking `request_id`; the same as the raw INSERT, plus a check of the id.

    `database` is a SQLAlchemy URL or an Engine of the producer's own. Returns True when
    the batch was added, False when it was already tracked. A malformed id raises
    ValueError here rather than being rejected later by the daemon. The tracker's tables
    must exist (`tracker db upgrade`, or a running daemon).
    """
    problem = request_id_problem(request_id)
    if problem is not None:
        raise ValueError(problem)
    if isinstance(database, sa.Engine):
        return Store(database).enqueue(request_id, label)
    engine = create_engine_for(database)
    try:
        return Store(engine).enqueue(request_id, label)
    finally:
        engine.dispose()
