"""Heartbeats, freeing a dead instance's leases, due times and the database's clock, on
SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from tracker.domain.model import Decision
from tracker.domain.states import State
from tracker.store import BatchWrite, LeaseExtension, Store

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
DAY = 86400.0


def _set(engine: sa.Engine, sql: str, **params: object) -> None:
    with engine.begin() as connection:
        connection.execute(sa.text(sql), params)


def _naive(moment: datetime) -> datetime:
    """As another application would bind a UTC timestamp on SQLite (naive text)."""
    return moment.astimezone(UTC).replace(tzinfo=None)


def _age_heartbeat(engine: sa.Engine, owner: str, seconds: float, store: Store) -> None:
    """Make `owner` look silent for `seconds`, measured on the database's clock."""
    stamp = store.database_now() - timedelta(seconds=seconds)
    value = _naive(stamp) if engine.dialect.name == "sqlite" else stamp
    _set(
        engine, "UPDATE tracker_instances SET heartbeat_at = :t WHERE owner = :o", t=value, o=owner
    )


def test_a_silent_instance_loses_its_leases_and_a_live_one_keeps_them(engine: sa.Engine) -> None:
    store = Store(engine)
    store.enqueue_many(["dead1", "dead2", "live1"])
    for owner in ("dead", "live"):
        store.register_instance(owner, "host", 1, None)
    dead_batches = store.claim_due("dead", 2, 300)
    [live_batch] = store.claim_due("live", 1, 300)
    _age_heartbeat(engine, "dead", 40, store)

    assert store.free_silent_instances(30) == {"dead": 2}
    rows = {row.request_id: row for row in store.list_batches()}
    assert [rows[b.request_id].lease_owner for b in dead_batches] == [None, None]
    assert rows["live1"].lease_owner == "live"
    # Freed at once: claimable now, not after the 300 s lease.
    assert {b.request_id for b in store.claim_due("live", 10, 300)} == {"dead1", "dead2"}
    # Nothing more to free, and nothing written for it.
    assert store.free_silent_instances(30) == {}
    assert live_batch.request_id == "live1"


def test_the_freed_owner_is_fenced_out_when_it_wakes(engine: sa.Engine) -> None:
    store = Store(engine)
    store.enqueue("paused1")
    store.register_instance("paused", "host", 1, None)
    [batch] = store.claim_due("paused", 1, 300)
    _age_heartbeat(engine, "paused", 60, store)
    assert store.free_silent_instances(30) == {"paused": 1}

    # Woken, it heartbeats (and is alive again) but none of its old work is its own.
    store.heartbeat("paused")
    later = NOW + timedelta(minutes=5)
    decision = Decision(State.PROCESSING, later, checked=True)
    assert store.apply([BatchWrite(batch, decision)], NOW) == [False]
    assert store.apply([LeaseExtension(batch, 300)], NOW) == [False]
    row = store.get("paused1")
    assert row is not None
    assert (row.state, row.checks, row.lease_owner, row.lease_expires_at) == (
        "pending",
        0,
        None,
        None,
    )
    assert store.free_silent_instances(30) == {}


def test_instances_that_never_heartbeat_are_left_to_their_lease(engine: sa.Engine) -> None:
    """An older version still running during a rolling upgrade has no heartbeat at all."""
    store = Store(engine)
    store.enqueue("old1")
    store.register_instance("old", "host", 1, None)
    _set(engine, "UPDATE tracker_instances SET heartbeat_at = NULL")
    store.claim_due("old", 1, 300)
    _set(engine, "UPDATE tracker_instances SET heartbeat_at = NULL")
    assert store.free_silent_instances(3) == {}
    row = store.get("old1")
    assert row is not None and row.lease_owner == "old"


def test_known_dead_instances_are_freed_and_marked_stopped(engine: sa.Engine) -> None:
    store = Store(engine)
    store.enqueue_many(["a1", "b1"])
    store.register_instance("crashed", "host", 41, "boot/1")
    store.register_instance("other", "host", 42, "boot/1")
    store.claim_due("crashed", 1, 300)
    store.claim_due("other", 1, 300)
    assert [row.owner for row in store.running_instances("host")] == ["crashed", "other"]

    assert store.free_instances(["crashed"]) == {"crashed": 1}
    assert [row.owner for row in store.running_instances("host")] == ["other"]
    owners = {row.request_id: row.lease_owner for row in store.list_batches()}
    assert owners == {"a1": None, "b1": "other"}
    assert store.free_instances(["crashed"]) == {}


def test_heartbeat_records_the_last_sweep_and_returns_the_database_clock(
    engine: sa.Engine,
) -> None:
    store = Store(engine)
    store.register_instance("me", "host", 1, None)
    swept = NOW - timedelta(seconds=3)
    now = store.heartbeat("me", swept)
    assert abs(now - datetime.now(UTC)) < timedelta(minutes=1)
    assert store.last_sweep("host") == swept
    store.heartbeat("me")  # no new sweep: the recorded one stays
    assert store.last_sweep("host") == swept
    store.mark_stopped("me")
    assert store.last_sweep("host") is None


def test_heartbeats_tell_the_last_webhook_delivery_of_any_instance(engine: sa.Engine) -> None:
    store = Store(engine)
    assert store.last_delivery() is None
    store.register_instance("a", "host-a", 1, None)
    store.register_instance("b", "host-b", 2, None)
    first = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    store.heartbeat("a", None, first)
    store.heartbeat("b", None, first + timedelta(seconds=5))
    assert store.last_delivery() == first + timedelta(seconds=5)
    # A heartbeat with no delivery since keeps what was told.
    store.heartbeat("b")
    assert store.last_delivery() == first + timedelta(seconds=5)


@pytest.mark.postgres
def test_claims_and_leases_use_the_database_clock(pg_url: str) -> None:
    """Whatever this host's clock says: the database stamps and compares leases."""
    engine = sa.create_engine(pg_url)
    try:
        store = Store(engine)
        store.enqueue_many(["soon", "due", "leased"])
        with engine.begin() as connection:
            connection.execute(
                sa.text(
                    "UPDATE tracker_batches SET next_check_at = clock_timestamp() + interval '10 minutes' "
                    "WHERE request_id = 'soon';"
                    "UPDATE tracker_batches SET lease_owner = 'elsewhere', lease_token = 1, "
                    "lease_expires_at = clock_timestamp() + interval '1 minute' "
                    "WHERE request_id = 'leased'"
                )
            )
        [claimed] = store.claim_due("me", 10, 300)
        assert claimed.request_id == "due"
        with engine.begin() as connection:
            expires, database_now = connection.execute(
                sa.text(
                    "SELECT lease_expires_at, clock_timestamp() FROM tracker_batches "
                    "WHERE request_id = 'due'"
                )
            ).one()
        assert timedelta(seconds=295) < expires - database_now <= timedelta(seconds=300)
    finally:
        engine.dispose()


def test_count_due_sees_what_a_claim_would_take_and_writes_nothing(engine: sa.Engine) -> None:
    store = Store(engine)
    store.enqueue_many(["c1", "c2", "c3"])
    store.claim_due("other", 1, 300, NOW)
    assert store.count_due(10, NOW) == 2
    assert store.count_due(1, NOW) == 1
    assert store.count_due(10, NOW + timedelta(seconds=301)) == 3
    assert len(store.claim_due("me", 10, 300, NOW)) == 2


def test_a_batch_past_its_maximum_age_is_due_whatever_its_next_check_says(
    engine: sa.Engine,
) -> None:
    store = Store(engine)
    store.enqueue_many(["ancient", "young"])
    far = datetime(2999, 1, 1, tzinfo=UTC)
    value = _naive(far) if engine.dialect.name == "sqlite" else far
    created = NOW - timedelta(days=8)
    created_value = _naive(created) if engine.dialect.name == "sqlite" else created
    _set(engine, "UPDATE tracker_batches SET next_check_at = :t", t=value)
    _set(
        engine,
        "UPDATE tracker_batches SET created_at = :c WHERE request_id = 'ancient'",
        c=created_value,
    )
    assert store.claim_due("me", 10, 300, NOW) == []
    assert store.count_due(10, NOW, max_age=7 * DAY) == 1
    assert [b.request_id for b in store.claim_due("me", 10, 300, NOW, max_age=7 * DAY)] == [
        "ancient"
    ]


def test_next_check_due_skips_batches_leased_elsewhere_until_their_lease_ends(
    engine: sa.Engine,
) -> None:
    store = Store(engine)
    store.enqueue_many(["leased", "later"])
    [leased] = store.claim_due("other", 1, 120, NOW)
    assert leased.request_id == "leased"
    in_ten = NOW + timedelta(minutes=10)
    value = _naive(in_ten) if engine.dialect.name == "sqlite" else in_ten
    _set(
        engine, "UPDATE tracker_batches SET next_check_at = :t WHERE request_id = 'later'", t=value
    )
    # "leased" is due (next_check_at NULL) but cannot be claimed before its lease ends.
    assert store.next_check_due(NOW) == NOW + timedelta(seconds=120)
    # Once the lease has ended, the other batch's check is next.
    assert store.next_check_due(NOW + timedelta(seconds=121)) == in_ten


def test_next_check_due_counts_from_the_deadline_when_it_comes_first(engine: sa.Engine) -> None:
    store = Store(engine)
    store.enqueue("parked")
    far = datetime(2999, 1, 1, tzinfo=UTC)
    created = NOW - timedelta(hours=1)
    sqlite = engine.dialect.name == "sqlite"
    _set(
        engine,
        "UPDATE tracker_batches SET next_check_at = :t, created_at = :c",
        t=_naive(far) if sqlite else far,
        c=_naive(created) if sqlite else created,
    )
    assert store.next_check_due(NOW) == far
    assert store.next_check_due(NOW, max_age=2 * 3600) == created + timedelta(hours=2)
