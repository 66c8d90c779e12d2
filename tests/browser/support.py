"""What the browser tests share: the real `tracker web` as a subprocess, and a database
seeded the way other applications and the daemon leave it.

Plain functions and classes; the pytest fixtures built on them are in conftest.py.
"""

from __future__ import annotations

import hashlib
import subprocess
from dataclasses import dataclass
from pathlib import Path

import httpx
import sqlalchemy as sa

from tests.e2e.support import TRACKER, free_port, plain_env, wait_until
from tracker.db import create_engine_for, upgrade_database

TOKEN = "browser-test-console-token-0123456789"
LOGIN_PATH = "/login"
SCRIPT_LABEL = "<script>alert(1)</script>"
# A presigned download URL as Deepvue hands it out; its query string must never be shown.
PRESIGNED_URL = (
    "https://deepvue-output.s3.amazonaws.com/out/dl-0001.csv"
    "?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAEXAMPLE"
    "&X-Amz-Signature=5ecre7519a7ure"
)
PRESIGNED_SECRETS = ("X-Amz-Signature", "5ecre7519a7ure", "AKIAEXAMPLE")
# The downloaded batch's file: the console shows its path, size and checksum, never this.
FILE_CONTENT = b"KYC data the console must never show\n"
FILE_SHA256 = hashlib.sha256(FILE_CONTENT).hexdigest()


@dataclass(frozen=True)
class Seeded:
    """The request ids the seeded database holds, by what each is there for."""

    downloaded: str = "dl-0001"
    failed: str = "fail-0002"
    pending: str = "pend-0003"
    processing: str = "proc-0004"
    scripted: str = "xss-0005"

    def all(self) -> set[str]:
        return {
            self.downloaded,
            self.failed,
            self.pending,
            self.processing,
            self.scripted,
        }


SEEDED = Seeded()


@dataclass
class Console:
    """`tracker web` as a child process, logging to a file."""

    url: str
    process: subprocess.Popen[str]
    log_path: Path

    def wait_serving(self, timeout: float = 30) -> None:
        def answers() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"tracker web exited with {self.process.returncode}: {self.log_path.read_text()}"
                )
            try:
                return httpx.get(f"{self.url}{LOGIN_PATH}", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(answers, timeout, "the console to serve its login page", poll=0.1)

    def stop(self, timeout: float = 15) -> int:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=timeout)
            raise


def start_console(database_url: str, log_path: Path, *args: str) -> Console:
    """`tracker web` on a free loopback port, the token in its environment, as documented."""
    port = free_port()
    env = plain_env(
        database_url,
        TRACKER_CONSOLE_TOKEN=TOKEN,
        TRACKER_CONSOLE_ADDR=f"127.0.0.1:{port}",
    )
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            [*TRACKER, "web", *args], env=env, stdout=log_file, stderr=subprocess.STDOUT, text=True
        )
    console = Console(url=f"http://127.0.0.1:{port}", process=process, log_path=log_path)
    console.wait_serving()
    return console


def migrated_sqlite(path: Path) -> str:
    url = f"sqlite:///{path}"
    engine = create_engine_for(url)
    try:
        upgrade_database(engine)
    finally:
        engine.dispose()
    return url


def seed(database_url: str, output_dir: Path) -> Seeded:
    """The rows of a small day's work, written with bare SQL as the console finds them.

    Pending rows are what other applications INSERT; the finished ones, with their
    transitions, are what the daemon leaves behind (written here directly, so the tests
    need neither a daemon nor the simulator).
    """
    s = SEEDED
    file_path = output_dir / f"{s.downloaded}.csv"
    file_path.write_bytes(FILE_CONTENT)
    engine = create_engine_for(database_url)
    try:
        with engine.begin() as connection:
            _seed_rows(connection, file_path)
    finally:
        engine.dispose()
    return s


def _seed_rows(connection: sa.Connection, file_path: Path) -> None:
    s = SEEDED

    def execute(sql: str, **params: object) -> None:
        connection.execute(sa.text(sql), params)

    batches = [
        (s.downloaded, "payroll", "downloaded"),
        (s.failed, "payroll", "failed"),
        (s.pending, "onboarding", "pending"),
        (s.processing, "onboarding", "processing"),
        (s.scripted, SCRIPT_LABEL, "pending"),
    ]
    for request_id, label, state in batches:
        execute(
            "INSERT INTO tracker_batches (request_id, label) VALUES (:rid, :label)",
            rid=request_id,
            label=label,
        )
        if state != "pending":
            execute(
                "UPDATE tracker_batches SET state = :state WHERE request_id = :rid",
                state=state,
                rid=request_id,
            )
    execute(
        "UPDATE tracker_batches SET checks = 3, api_status = 200, api_message = 'completed',"
        " file_path = :path, file_size = :size, file_sha256 = :sha, finished_at = CURRENT_TIMESTAMP"
        " WHERE request_id = :rid",
        path=str(file_path),
        size=file_path.stat().st_size,
        sha=FILE_SHA256,
        rid=s.downloaded,
    )
    execute(
        "UPDATE tracker_batches SET checks = 2, api_status = 200, api_message = 'failed',"
        " last_error = 'Deepvue reported the batch failed', finished_at = CURRENT_TIMESTAMP"
        " WHERE request_id = :rid",
        rid=s.failed,
    )
    # from_state, to_state, api_message, detail: the daemon's transitions for each batch.
    chains: dict[str, list[tuple[str, str, str | None, str | None]]] = {
        s.downloaded: [
            ("pending", "processing", "in_progress", None),
            ("processing", "ready", "completed", f"download url {PRESIGNED_URL}"),
            ("ready", "downloaded", None, "file verified"),
        ],
        s.failed: [
            ("pending", "processing", "in_progress", None),
            ("processing", "failed", "failed", "Deepvue reported the batch failed"),
        ],
        s.processing: [("pending", "processing", "in_progress", None)],
    }
    for request_id, chain in chains.items():
        for from_state, to_state, message, detail in chain:
            execute(
                "INSERT INTO tracker_transitions"
                " (batch_id, request_id, from_state, to_state, api_status, api_message, detail)"
                " SELECT id, request_id, :from_state, :to_state, 200, :message, :detail"
                " FROM tracker_batches WHERE request_id = :rid",
                from_state=from_state,
                to_state=to_state,
                message=message,
                detail=detail,
                rid=request_id,
            )
