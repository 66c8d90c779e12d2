"""Local stand-in for Deepvue's bulk-verification API and the S3 bucket holding its output files.

Deepvue publishes no sandbox, so the tests, the demo and the benchmarks talk to this asyncio
server instead; it only ever binds loopback. What it imitates, the request_id prefixes that
choose a scenario and its test hooks: docs/simulator.md.
"""

from __future__ import annotations

from tracker.simulator.app import build_app
from tracker.simulator.config import SimulatorConfig
from tracker.simulator.content import (
    MULTIPART_THRESHOLD,
    expected_md5,
    expected_sha256,
    expected_size,
    output_bytes,
)
from tracker.simulator.serving import SimulatorHandle, running_simulator, serve_forever

__all__ = [
    "MULTIPART_THRESHOLD",
    "SimulatorConfig",
    "SimulatorHandle",
    "build_app",
    "expected_md5",
    "expected_sha256",
    "expected_size",
    "output_bytes",
    "running_simulator",
    "serve_forever",
]
