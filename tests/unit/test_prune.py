"""`tracker prune --files` deletes only output files directly in the output directory,
whatever the row says: the rule (pure) and the deleting (resolves symlinks first)."""

from __future__ import annotations

from pathlib import Path, PurePath

import pytest

from tracker.domain.prune import FileVerdict, output_file_verdict
from tracker.prune import FileRemoval, remove_output_file

OUT = PurePath("/srv/tracker/out")


def test_a_file_directly_in_the_output_directory_is_deleted() -> None:
    assert output_file_verdict(OUT / "abc.csv", OUT) is FileVerdict.DELETE


@pytest.mark.parametrize(
    "path",
    [
        PurePath("/etc/passwd"),
        PurePath("/srv/tracker/out-old/abc.csv"),  # a sibling sharing the prefix
        PurePath("/srv/tracker/abc.csv"),
        OUT / "sub" / "abc.csv",  # below the directory, not in it
        OUT,  # the directory itself
        PurePath("/"),
    ],
)
def test_anything_not_directly_in_the_output_directory_is_kept(path: PurePath) -> None:
    assert output_file_verdict(path, OUT) is FileVerdict.KEEP


@pytest.mark.parametrize(
    "path",
    [
        OUT / "..",  # its parent is OUT, yet it names the directory above
        OUT / ".." / "out" / "abc.csv",
        PurePath("out/abc.csv"),  # relative: depends on where the command runs
        PurePath("abc.csv"),
        PurePath(""),  # an empty file_path
    ],
)
def test_a_path_that_is_not_resolved_is_kept(path: PurePath) -> None:
    assert output_file_verdict(path, OUT) is FileVerdict.KEEP


def test_a_relative_output_directory_never_matches() -> None:
    assert output_file_verdict(PurePath("out/abc.csv"), PurePath("out")) is FileVerdict.KEEP


@pytest.fixture
def output_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "out"
    directory.mkdir()
    return directory.resolve()


def test_the_recorded_file_is_deleted_and_a_second_time_is_already_gone(
    output_dir: Path,
) -> None:
    recorded = output_dir / "abc.csv"
    recorded.write_text("kyc")
    assert remove_output_file(str(recorded), output_dir) is FileRemoval.DELETED
    assert not recorded.exists()
    assert remove_output_file(str(recorded), output_dir) is FileRemoval.ALREADY_GONE


@pytest.mark.parametrize("file_path", [None, ""])
def test_a_row_without_a_file_touches_nothing(
    output_dir: Path, file_path: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Run from inside the directory: an empty path must not stand for "."
    monkeypatch.chdir(output_dir)
    (output_dir / "abc.csv").write_text("kyc")
    assert remove_output_file(file_path, output_dir) is FileRemoval.NO_FILE
    assert (output_dir / "abc.csv").exists()


def test_a_file_outside_the_directory_is_kept(output_dir: Path) -> None:
    outside = output_dir.parent / "elsewhere.csv"
    outside.write_text("not ours")
    assert remove_output_file(str(outside), output_dir) is FileRemoval.KEPT
    dotted = output_dir / ".." / "elsewhere.csv"
    assert remove_output_file(str(dotted), output_dir) is FileRemoval.KEPT
    assert outside.exists()


def test_a_link_in_the_directory_is_judged_by_its_target(output_dir: Path) -> None:
    outside = output_dir.parent / "elsewhere.csv"
    outside.write_text("not ours")
    link = output_dir / "abc.csv"
    link.symlink_to(outside)
    assert remove_output_file(str(link), output_dir) is FileRemoval.KEPT
    assert link.is_symlink() and outside.exists()


def test_a_path_through_a_linked_directory_is_in_the_directory(output_dir: Path) -> None:
    # TRACKER_OUTPUT_DIR may itself be a symlink: the rows then record paths through it.
    alias = output_dir.parent / "alias"
    alias.symlink_to(output_dir)
    (output_dir / "abc.csv").write_text("kyc")
    assert remove_output_file(str(alias / "abc.csv"), output_dir) is FileRemoval.DELETED
    assert not (output_dir / "abc.csv").exists()


def test_a_link_outside_the_directory_pointing_into_it_is_kept(output_dir: Path) -> None:
    # unlink() removes the entry the recorded path names, not its target: a link outside
    # the directory that leads into it must not be deleted (it is not ours to touch).
    (output_dir / "abc.csv").write_text("kyc")
    link = output_dir.parent / "elsewhere.csv"
    link.symlink_to(output_dir / "abc.csv")
    assert remove_output_file(str(link), output_dir) is FileRemoval.KEPT
    assert link.is_symlink() and (output_dir / "abc.csv").exists()
