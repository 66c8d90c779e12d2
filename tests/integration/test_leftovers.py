"""Stale temp files against a real store: a leased batch keeps its file, the others do not."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa

from tracker.leftovers import remove_stale_temp_files
from tracker.store import Store


def test_leased_request_ids_names_only_live_leases(engine: sa.Engine) -> None:
    store = Store(engine)
    store.enqueue_many(["live1", "expired1", "free1"])
    now = store.database_now()
    claimed = {b.request_id: b for b in store.claim_due("w", 3, 600, now)}
    assert set(claimed) == {"live1", "expired1", "free1"}
    store.release([claimed["free1"]])
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "UPDATE tracker_batches SET lease_expires_at = :past WHERE request_id = 'expired1'"
            ),
            {"past": now - timedelta(minutes=5)},
        )
    asked = ["live1", "expired1", "free1", "unknown1"]
    assert store.leased_request_ids(asked) == {"live1"}
    assert store.leased_request_ids([]) == set()
    many = [f"n{i}" for i in range(1500)] + ["live1"]
    assert store.leased_request_ids(many) == {"live1"}


def test_stale_temp_files_of_unleased_batches_are_removed(
    engine: sa.Engine, tmp_path: Path
) -> None:
    store = Store(engine)
    store.enqueue_many(["leased1", "cancelled1"])
    now = datetime.now(UTC)
    claimed = store.claim_due("w", 2, 600, now)
    [leased] = [b for b in claimed if b.request_id == "leased1"]
    store.release([b for b in claimed if b.request_id != "leased1"])
    store.cancel("cancelled1", now)
    names = {
        "leased1": ".leased1.csv.aa01.part",
        "cancelled1": ".cancelled1.csv.bb02.part",
        "pruned1": ".pruned1.xlsx.cc03.part",
    }
    output = tmp_path / "out"
    output.mkdir()
    then = time.time() - 7200
    for name in names.values():
        (output / name).write_bytes(b"partial KYC data")
        os.utime(output / name, (then, then))
    (output / ".young1.csv.dd04.part").write_bytes(b"still being written")
    removed = remove_stale_temp_files(output, store, 3600)
    assert sorted(f.request_id for f in removed) == ["cancelled1", "pruned1"]
    assert sorted(p.name for p in output.iterdir()) == sorted(
        [names["leased1"], ".young1.csv.dd04.part"]
    )
    assert leased.request_id == "leased1"
