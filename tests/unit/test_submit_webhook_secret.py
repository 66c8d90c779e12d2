"""`tracker submit` with webhooks: the webhook secret never shows in what it prints."""

from __future__ import annotations

from pathlib import Path

import pytest

from tracker import cli
from tracker.deepvue import DeepvueClient, SubmitFailed

WEBHOOK_SECRET = "hook-secret-0123456789"


def test_a_failed_submit_echoing_the_webhook_url_hides_the_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in {
        "TRACKER_DATABASE_URL": f"sqlite:///{tmp_path / 'tracker.db'}",
        "TRACKER_CLIENT_ID": "me",
        "TRACKER_CLIENT_SECRET": "client-secret-value",
        "TRACKER_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "TRACKER_WEBHOOK_PUBLIC_URL": "https://hooks.example.com",
        "TRACKER_LOG_FORMAT": "json",
    }.items():
        monkeypatch.setenv(name, value)
    sent: list[str | None] = []

    async def echoing(
        self: DeepvueClient, batch_file: Path, *, webhook_url: str | None = None
    ) -> str:
        sent.append(webhook_url)
        raise SubmitFailed(f"Deepvue did not accept webhook_url={webhook_url}")

    monkeypatch.setattr(DeepvueClient, "submit_upi_batch", echoing)
    assert cli.main(["db", "upgrade"]) == 0
    batch = tmp_path / "upi.csv"
    batch.write_text("vpa\nname@upi\n")
    capsys.readouterr()

    assert cli.main(["submit", str(batch)]) == 1
    assert sent == [f"https://hooks.example.com/webhook/{WEBHOOK_SECRET}"]
    out, err = capsys.readouterr()
    assert "submit failed" in err
    assert WEBHOOK_SECRET not in out + err
