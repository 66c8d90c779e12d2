"""Track Deepvue bulk-verification batches until their output files are safely on disk.

Producers: `tracker.enqueue(database_url_or_engine, request_id, label=None)`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import sqlalchemy as sa

__version__ = "0.1.0"
__all__ = ["__version__", "enqueue"]


def enqueue(database: str | sa.Engine, request_id: str, label: str | None = None) -> bool:
    """Start tracking `request_id`; see `tracker.producer.enqueue`."""
    # Imported here so that `import tracker` (and `tracker --help`) stay light.
    from tracker.producer import enqueue as enqueue_batch

    return enqueue_batch(database, request_id, label)
