"""What a simulator is started with: credentials, timings, injected faults, file sizes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SimulatorConfig:
    client_id: str = "demo-client"
    # The demo's own credentials, valid only against this loopback simulator.
    client_secret: str = "demo-secret"  # noqa: S105
    token_ttl: float = 86400.0
    completion_delay: float = 2.0
    latency: float = 0.0
    error_rate: float = 0.0
    rate_per_second: int | None = None
    rate_per_minute: int | None = None
    rate_per_day: int | None = None
    url_ttl: float = 600.0
    file_size: int = 4096
    big_file_size: int = 8 * 1024 * 1024
    seed: int = 0
    # The first `throttle_first` status calls (since start or /_sim/reset) answer 429 with
    # this Retry-After header, sent verbatim: "300", "1e12" or an HTTP-date.
    throttle_first: int = 0
    throttle_retry_after: str = "300"
    # What ``huge-`` status answers are padded to, and what ``gzipbomb-`` ones inflate to.
    huge_answer_size: int = 64 * 1024 * 1024
    gzip_bomb_size: int = 256 * 1024 * 1024
    # Webhooks (docs/simulator.md): where every batch's goes unless the submission or
    # POST /_sim/webhooks named another (loopback only), and the injected faults. The delay
    # after completion is drawn uniformly from the (low, high) range.
    webhook_url: str | None = None
    webhook_drop_rate: float = 0.0
    webhook_delay: tuple[float, float] = (0.0, 0.0)
    webhook_duplicates: int = 1
    webhook_wrong_secret_rate: float = 0.0
    webhook_garbage_rate: float = 0.0
