"""TRACKER_FILE_MODE=400/440: the downloader still publishes (and re-publishes) the file.

It writes through the descriptor that created the temp file, fchmods that descriptor and
publishes with a rename, so an owner-read-only mode never needs a reopen for writing.
"""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import httpx
import pytest

from tracker.download import Downloader

BODY = b"kyc," * (600 << 10)  # past the first MiB: the writer-thread path too


@pytest.mark.parametrize("mode", [0o400, 0o440])
def test_a_read_only_mode_is_published_and_replaced(tmp_path: Path, mode: int) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, stream=httpx.ByteStream(BODY), headers={"Content-Length": str(len(BODY))}
        )

    async def twice() -> list[Path]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            downloader = Downloader(
                http, output_dir=tmp_path, allowed_hosts=["127.0.0.1"], file_mode=mode
            )
            url = "http://127.0.0.1/out/abc123.csv"
            return [(await downloader.fetch(url, "abc123")).path for _ in range(2)]

    first, second = asyncio.run(twice())
    assert first == second == tmp_path / "abc123.csv"
    assert stat.S_IMODE(os.stat(first).st_mode) == mode
    assert first.read_bytes() == BODY
    assert sorted(p.name for p in tmp_path.iterdir()) == ["abc123.csv"]
