"""Stale download temp files: which names are ours, which files are old, what is removed."""

from __future__ import annotations

import os
import time
from collections.abc import Collection
from pathlib import Path

import pytest

from tracker.domain.temp_names import temp_file_request_id, temp_name
from tracker.leftovers import find_stale_temp_files, remove_stale_temp_files

HOUR = 3600.0


class FakeStore:
    def __init__(self, leased: set[str]) -> None:
        self.leased = leased
        self.asked: list[set[str]] = []

    def leased_request_ids(self, request_ids: Collection[str]) -> set[str]:
        self.asked.append(set(request_ids))
        return self.leased & set(request_ids)


@pytest.mark.parametrize(
    ("name", "request_id"),
    [
        (".abc123.csv.1f2e3d4c5b6a0.part", "abc123"),
        (".abc123.xlsx.00ff.part", "abc123"),
        (".trickle-x_1.json.deadbeef7.part", "trickle-x_1"),
        (".abc123.zip.part", None),  # no tag
        (".abc123.csv.deadbeefpart", None),  # no dot before "part"
        (".abc123.csv.abc123.json.part", None),  # a dot in the tag: not one of ours
        ("abc123.csv", None),
        ("abc123.csv.part", None),
        (".abc123.txt.1f2e.part", None),
        ("..csv.1f2e.part", None),
        (".-abc.csv.1f2e.part", None),
        (".abc123.csv.1f2e.part.bak", None),
        (".abc/def.csv.1f2e.part", None),
        ("." + "a" * 129 + ".csv.1f2e.part", None),
    ],
)
def test_only_the_downloaders_temp_names_are_recognised(name: str, request_id: str | None) -> None:
    assert temp_file_request_id(name) == request_id


@pytest.mark.parametrize(
    ("request_id", "extension"), [("abc123", "csv"), ("trickle-x_1", "xlsx"), ("a", "zip")]
)
def test_the_names_the_downloader_writes_are_recognised(request_id: str, extension: str) -> None:
    name = temp_name(request_id, extension, "0123456789ab1f")
    assert temp_file_request_id(name) == request_id


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then), follow_symlinks=False)


def test_only_temp_files_older_than_the_deadline_are_stale(tmp_path: Path) -> None:
    old = tmp_path / ".old1.csv.aa.part"
    fresh = tmp_path / ".fresh1.csv.bb.part"
    published = tmp_path / "old1.csv"
    for path in (old, fresh, published):
        path.write_bytes(b"partial KYC data")
    _age(old, 2 * HOUR)
    _age(fresh, 10)
    _age(published, 3 * HOUR)
    stale = find_stale_temp_files(tmp_path, HOUR)
    assert [(f.name, f.request_id) for f in stale] == [(old.name, "old1")]
    assert stale[0].age >= 2 * HOUR - 5


def test_leased_batches_keep_their_temp_files_the_others_lose_theirs(tmp_path: Path) -> None:
    names = [
        ".busy1.csv.aa.part",
        ".idle1.csv.bb.part",
        ".idle1.xlsx.cc.part",
        ".gone1.zip.dd.part",
    ]
    for name in names:
        (tmp_path / name).write_bytes(b"x" * 10)
        _age(tmp_path / name, 2 * HOUR)
    store = FakeStore(leased={"busy1"})
    removed = remove_stale_temp_files(tmp_path, store, HOUR)
    assert sorted(f.name for f in removed) == sorted(names[1:])
    assert sorted(p.name for p in tmp_path.iterdir()) == [".busy1.csv.aa.part"]
    assert store.asked == [{"busy1", "idle1", "gone1"}]


def test_nothing_stale_asks_the_store_nothing(tmp_path: Path) -> None:
    (tmp_path / ".fresh1.csv.aa.part").write_bytes(b"x")
    store = FakeStore(leased=set())
    assert remove_stale_temp_files(tmp_path, store, HOUR) == []
    assert store.asked == []
    assert remove_stale_temp_files(tmp_path / "missing", store, HOUR) == []


def test_symlinks_and_directories_are_never_followed_or_removed(tmp_path: Path) -> None:
    output = tmp_path / "out"
    output.mkdir()
    outside = tmp_path / "precious.csv"
    outside.write_bytes(b"not ours")
    _age(outside, 2 * HOUR)
    link = output / ".link1.csv.aa.part"
    link.symlink_to(outside)
    _age(link, 2 * HOUR)
    directory = output / ".dir1.csv.bb.part"
    directory.mkdir()
    (directory / "inside").write_bytes(b"x")
    _age(directory, 2 * HOUR)
    removed = remove_stale_temp_files(output, FakeStore(leased=set()), HOUR)
    assert removed == []
    assert outside.read_bytes() == b"not ours" and link.is_symlink()
    assert (directory / "inside").exists()


def test_a_file_already_gone_is_not_an_error(tmp_path: Path) -> None:
    doomed = tmp_path / ".raced1.csv.aa.part"
    doomed.write_bytes(b"x")
    _age(doomed, 2 * HOUR)

    class Racing(FakeStore):
        def leased_request_ids(self, request_ids: Collection[str]) -> set[str]:
            doomed.unlink()  # another instance removed it meanwhile
            return set()

    assert remove_stale_temp_files(tmp_path, Racing(leased=set()), HOUR) == []
