"""The domain's plain data: a tracked batch, the polling settings, and what the policy decides.

No behaviour beyond validation lives here: tracker.domain.policy and tracker.domain.schedule
compute with these types, and the store reads and writes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from tracker.domain.states import State

__all__ = ["Decision", "DownloadPlan", "DownloadProblem", "PollPolicy", "Tracked"]


@dataclass(frozen=True)
class PollPolicy:
    min_interval: float = 30.0
    max_interval: float = 900.0
    # Each check of a still-processing batch waits `growth` times longer than the last.
    growth: float = 1.5
    # Transient faults back off from fault_base, doubling per fault, up to max_interval: the
    # call budget protects the quota, the backoff only spaces out retries.
    fault_base: float = 5.0
    # An optional tighter ceiling for that backoff (the demo's quick runs use one); by
    # default max_interval alone caps it.
    fault_cap: float = math.inf
    max_age: float = 7 * 86400.0
    max_rejections: int = 3
    max_download_attempts: int = 5
    # A server's Retry-After is honoured up to this; beyond it, it is clamped.
    max_retry_after: float = 3600.0
    # The share of batches expected to be found by their webhook (0: webhooks off). The
    # budget-aware schedule then leaves unspent the calls polling alone would have made
    # after those batches finished (docs/polling.md, "With webhooks on").
    webhook_share: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.min_interval <= self.max_interval:
            raise ValueError("poll intervals need 0 < min <= max")
        if self.growth < 1:
            raise ValueError("growth must be >= 1")
        if not 0 <= self.webhook_share <= 1:
            raise ValueError("webhook_share must be between 0 and 1")


@dataclass(frozen=True)
class Tracked:
    """What the policy needs to know about one claimed batch."""

    id: int
    request_id: str
    state: State
    lease_token: int
    checks: int
    faults: int
    rejections: int
    download_attempts: int
    created_at: datetime
    # What is wrong with the row itself (a value another application wrote that is not a
    # timestamp, a counter the columns cannot hold), one phrase each; empty when sound.
    problems: tuple[str, ...] = ()
    # When this lease was taken: a webhook hint stamped after it arrived while the batch's
    # call was in flight, and the write-back keeps it (see Store.bring_forward).
    claimed_at: datetime | None = None
    # This check was brought forward by a webhook delivery (its transition is marked so).
    brought_forward: bool = False


@dataclass(frozen=True)
class Decision:
    """What to write back for a batch after looking at it."""

    to_state: State
    next_check_at: datetime | None
    checked: bool = False
    faults: int = 0
    rejections: int = 0
    download_attempts: int = 0
    api_status: int | None = None
    api_message: str | None = None
    last_error: str | None = None
    # Why the state changed; stored on the transition row.
    detail: str | None = None
    # Set when the output should be fetched now. Never stored: it may be a presigned URL.
    download_url: str | None = None


@dataclass(frozen=True)
class DownloadPlan:
    """How a batch found complete is fetched: first `ready` is written, then `url` fetched."""

    # The write before the fetch: the batch becomes (or stays) ready, its lease is kept, and
    # no URL is stored.
    ready: Decision
    # What the download's own decision starts from: the claimed batch, now ready and
    # checked once more, its lease kept (same token).
    batch: Tracked
    url: str
    # An earlier fetch may have been killed and left a temp file behind to clean up.
    leftovers_possible: bool


class DownloadProblem(StrEnum):
    REFUSED = "refused"  # the URL is not one we may fetch: permanent
    URL_EXPIRED = "url_expired"  # the file host refused the URL: ask Deepvue for a fresh one
    INTERRUPTED = "interrupted"  # network, 5xx, truncation, deadline: try again later
    UNWRITABLE = "unwritable"  # our disk is full or read-only: not the batch's fault
