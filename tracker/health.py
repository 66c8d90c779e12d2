"""One verdict on whether this host's tracker is healthy, for `tracker check` and /healthz."""

from __future__ import annotations

import socket
from datetime import datetime

import sqlalchemy as sa

from tracker.db import create_engine_for, describe_db_error, pending_migrations
from tracker.settings import Settings
from tracker.store import Store


def health_problem(
    settings: Settings, *, host: str | None = None, now: datetime | None = None
) -> str | None:
    """None when healthy; otherwise one line saying what is wrong.

    Healthy means: the database answers, its schema is current, and a running tracker on
    this host finished a sweep (or made progress inside a long one) recently.
    """
    host = host or socket.gethostname()
    # The last sweep reaches the database with the heartbeat, at most a third of the
    # heartbeat timeout late.
    limit = max(3 * settings.sweep_interval, 60.0, settings.heartbeat_timeout)
    options = (
        {"connect_args": {"connect_timeout": 5}} if "postgresql" in settings.database_url else {}
    )
    engine = create_engine_for(settings.database_url, **options)
    try:
        pending = pending_migrations(engine)
        if pending:
            return (
                f"database schema is not current: {len(pending)} migration(s) pending "
                "(run `tracker db upgrade`)"
            )
        store = Store(engine)
        last = store.last_sweep(host)
        # Sweeps are stamped with the database's clock, so they are judged by it too.
        now = now or store.database_now()
    except sa.exc.OperationalError as error:
        reason = describe_db_error(error, with_type=False)
        return f"database unreachable: {reason}"
    finally:
        engine.dispose()
    if last is None:
        return f"no running tracker on {host} has completed a sweep"
    age = (now - last).total_seconds()
    if age > limit:
        return f"the last sweep on {host} was {age:.0f} s ago (more than {limit:.0f} s)"
    return None
