"""A stored batch row for tests that render or hand one on, without a database."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

from tracker.store import BatchRow

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)

# A downloaded batch: every column set as the daemon leaves it.
_DOWNLOADED = BatchRow(
    id=1,
    request_id="abc123",
    label="run-1",
    state="downloaded",
    created_at=NOW,
    updated_at=NOW,
    next_check_at=None,
    checks=3,
    api_status=200,
    api_message=None,
    file_path="/srv/out/abc123.csv",
    file_size=10,
    file_sha256="ab" * 32,
    last_error=None,
    finished_at=NOW,
    faults=0,
    rejections=0,
    download_attempts=1,
    lease_owner=None,
    lease_token=1,
    lease_expires_at=None,
    hook_pending=False,
)


def batch_row(**changes: object) -> BatchRow:
    """A downloaded batch's row, with `changes` applied."""
    return dataclasses.replace(_DOWNLOADED, **changes)  # type: ignore[arg-type]
