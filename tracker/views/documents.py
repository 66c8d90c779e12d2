"""The JSON documents `list --json`, `show --json` and `status --json` print, for programs:
every value as stored, timestamps ISO-8601 UTC."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any

from tracker.schema import UnreadableTimestamp
from tracker.store import BatchRow, TransitionRow
from tracker.views.snapshots import StatusReport
from tracker.views.text import iso_utc


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return iso_utc(value)
    # SQLite keeps whatever another application wrote, a blob included.
    return repr(value) if isinstance(value, bytes) else value


def batch_json(row: BatchRow) -> dict[str, Any]:
    """Every column of the batch; timestamps ISO-8601 UTC."""
    return {f.name: _jsonable(getattr(row, f.name)) for f in dataclasses.fields(row)}


def transition_json(row: TransitionRow) -> dict[str, Any]:
    return {f.name: _jsonable(getattr(row, f.name)) for f in dataclasses.fields(row)}


def status_json(report: StatusReport) -> dict[str, Any]:
    oldest = report.oldest_unfinished
    return {
        "now": iso_utc(report.now),
        "counts": report.counts,
        "total": report.total,
        "unfinished": report.unfinished,
        "quota": {
            name: {"used": used, "limit": limit, "left": max(0, limit - used)}
            for name, (used, limit) in report.quota.items()
        },
        "oldest_unfinished": None
        if oldest is None
        else {
            "request_id": oldest.request_id,
            "label": oldest.label,
            "state": oldest.state,
            "created_at": iso_utc(oldest.created_at),
            "age_seconds": None
            if isinstance(oldest.created_at, UnreadableTimestamp)
            else round((report.now - oldest.created_at).total_seconds(), 3),
        },
        "last_sweep": {
            "any_host": iso_utc(report.last_sweep_any_host),
            "this_host": iso_utc(report.last_sweep_this_host),
            "host": report.host,
        },
        "last_webhook_delivery": iso_utc(report.last_delivery),
        "recent_errors": [
            {
                "request_id": row.request_id,
                "state": row.state,
                "updated_at": iso_utc(row.updated_at),
                "last_error": row.last_error,
            }
            for row in report.recent_errors
        ],
    }
