"""The systemd deployment in deploy/: checked with systemd's own tools.

The unit must pass `systemd-analyze verify` without a word and score an exposure of 2.0 or
lower in `systemd-analyze security`; the sysusers.d and tmpfiles.d snippets must create, in a
scratch root, the user and the directories the unit relies on; the env file example must
name every setting the daemon has, with values the daemon accepts.

The tools are part of systemd, not of this project: without them a check is skipped, except
under CI (CI=true), where a missing tool is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from tracker.domain.addresses import parse_listen_address
from tracker.settings import (
    CONSOLE_CREDENTIAL_NAME,
    CREDENTIAL_NAME,
    ENV_PREFIX,
    Settings,
    load_settings,
)

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNIT = DEPLOY / "tracker.service"
CONSOLE_UNIT = DEPLOY / "tracker-console.service"
SYSUSERS = DEPLOY / "sysusers.d" / "tracker.conf"
TMPFILES = DEPLOY / "tmpfiles.d" / "tracker.conf"
ENV_EXAMPLE = DEPLOY / "tracker.env.example"

INSTALLED_EXEC_START = "ExecStart=/opt/deepvue-tracker/bin/tracker run"
CONSOLE_EXEC_START = "ExecStart=/opt/deepvue-tracker/bin/tracker web"
MAX_EXPOSURE = 2.0
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
# Plain output whatever the terminal: no colours, no pager.
TOOL_ENV = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "SYSTEMD_LESS": ""}
# Settings that are not Settings fields but are still read from the environment.
NON_FIELD_SETTINGS = {"TRACKER_CONFIG"}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (part of systemd)"
        if IN_CI:
            pytest.fail(f"{message}; CI must be able to check the deployment files")
        pytest.skip(message)
    return path


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, capture_output=True, text=True, env=TOOL_ENV, timeout=60, check=False
    )


def _service_settings(unit_text: str) -> dict[str, list[str]]:
    """Key -> values of the [Service] section, in order (keys may repeat)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in unit_text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def _runnable_copy(
    directory: Path, unit: Path = UNIT, exec_start: str = INSTALLED_EXEC_START
) -> Path:
    """The unit with ExecStart pointing at this venv's `tracker`, everything else untouched.

    verify checks that ExecStart's binary exists and is executable, and on a test machine
    /opt/deepvue-tracker does not: only that path is swapped for the same console script in
    the venv running the tests. User=tracker stays: verify does not resolve users (systemd
    252), so the copy keeps the very identity and sandbox that ship. If a later systemd
    starts to check users, this test will fail with verify's message rather than quietly
    test a weaker unit.
    """
    tracker = Path(sys.executable).parent / "tracker"
    assert tracker.is_file(), f"the tracker console script is not installed at {tracker}"
    original = unit.read_text(encoding="utf-8")
    assert original.count(exec_start) == 1
    command = exec_start.rsplit(" ", 1)[1]
    copy = directory / unit.name
    copy.write_text(
        original.replace(exec_start, f"ExecStart={tracker} {command}"), encoding="utf-8"
    )
    return copy


def _verify_problems(unit: Path) -> list[str]:
    """Every line verify printed about this unit, plus its exit status if non-zero.

    verify exits 0 even for unknown or misspelt directives, so its output is what counts.
    """
    result = _run(_tool("systemd-analyze"), "verify", str(unit))
    lines = (result.stdout + result.stderr).splitlines()
    problems = [line for line in lines if unit.name in line or str(unit) in line]
    if result.returncode != 0:
        problems.append(f"exit status {result.returncode}: {result.stderr.strip()}")
    return problems


def test_unit_verifies_without_errors_or_warnings(tmp_path: Path) -> None:
    copy = _runnable_copy(tmp_path)
    changed = [
        (shipped, checked)
        for shipped, checked in zip(
            UNIT.read_text(encoding="utf-8").splitlines(),
            copy.read_text(encoding="utf-8").splitlines(),
            strict=True,
        )
        if shipped != checked
    ]
    assert len(changed) == 1 and changed[0][0] == INSTALLED_EXEC_START
    assert _verify_problems(copy) == []


def test_verify_check_catches_a_misspelt_directive(tmp_path: Path) -> None:
    # Guards the test above: an empty problem list must mean verify had nothing to say.
    copy = _runnable_copy(tmp_path)
    copy.write_text(
        copy.read_text(encoding="utf-8").replace("ProtectHome=yes", "ProtectHomes=yes"),
        encoding="utf-8",
    )
    problems = _verify_problems(copy)
    assert any("ProtectHomes" in line for line in problems), problems


@pytest.mark.parametrize("unit", [UNIT, CONSOLE_UNIT], ids=lambda unit: unit.name)
def test_unit_exposure_is_at_most_two(unit: Path) -> None:
    result = _run(_tool("systemd-analyze"), "security", "--offline=yes", str(unit))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", output)
    assert match is not None, f"no overall exposure line in:\n{output}"
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, f"exposure {exposure} > {MAX_EXPOSURE}:\n{output}"


def test_unit_agrees_with_the_daemon() -> None:
    service = _service_settings(UNIT.read_text(encoding="utf-8"))
    assert service["Type"] == ["notify"]
    assert service["User"] == ["tracker"] and service["Group"] == ["tracker"]
    assert "DynamicUser" not in service

    # The daemon finds the secret under the credential name it knows.
    credentials = [value.partition(":")[0] for value in service["LoadCredential"]]
    assert credentials == [CREDENTIAL_NAME]

    # Environment= names must be real settings: a typo would be silently ignored.
    known = {ENV_PREFIX + field.name.upper() for field in fields(Settings)}
    names = {value.partition("=")[0] for value in service["Environment"]}
    assert names <= known, names - known

    # systemd must not SIGKILL before the daemon's own shutdown bound (grace + 10 s).
    stop = re.fullmatch(r"(\d+)s", service["TimeoutStopSec"][0])
    assert stop is not None
    assert int(stop.group(1)) > Settings().shutdown_grace + 10

    # Where the output goes must be writable in the sandbox.
    environment = dict(value.split("=", 1) for value in service["Environment"])
    assert environment["TRACKER_OUTPUT_DIR"] in service["ReadWritePaths"][0].split()


def test_console_unit_verifies_without_errors_or_warnings(tmp_path: Path) -> None:
    copy = _runnable_copy(tmp_path, CONSOLE_UNIT, CONSOLE_EXEC_START)
    assert _verify_problems(copy) == []


# What the console unit may set differently from the daemon's: how it starts and stops, and
# the output directory it has no business reading.
_CONSOLE_OWN = {
    "Type",
    "ExecStart",
    "TimeoutStartSec",
    "WatchdogSec",
    "TimeoutStopSec",
    "Environment",
    "LoadCredential",
    "ReadWritePaths",
    "InaccessiblePaths",
}


def test_console_unit_agrees_with_the_console_and_is_sandboxed_like_the_daemon() -> None:
    console = _service_settings(CONSOLE_UNIT.read_text(encoding="utf-8"))
    daemon = _service_settings(UNIT.read_text(encoding="utf-8"))
    assert console["ExecStart"] == [CONSOLE_EXEC_START.partition("=")[2]]
    assert console["User"] == daemon["User"] and console["Group"] == daemon["Group"]
    credentials = [value.partition(":")[0] for value in console["LoadCredential"]]
    assert credentials == [CONSOLE_CREDENTIAL_NAME]

    known = {ENV_PREFIX + field.name.upper() for field in fields(Settings)}
    environment = dict(value.split("=", 1) for value in console["Environment"])
    assert set(environment) <= known, set(environment) - known
    host, _port = parse_listen_address(environment["TRACKER_CONSOLE_ADDR"])
    assert host == "127.0.0.1", "loopback by default"
    daemon_environment = dict(value.split("=", 1) for value in daemon["Environment"])
    assert environment["TRACKER_DATABASE_URL"] == daemon_environment["TRACKER_DATABASE_URL"]

    # Every hardening directive of the daemon holds for the console too, unweakened.
    for key, values in daemon.items():
        if key not in _CONSOLE_OWN:
            assert console.get(key) == values, key
    assert "ReadWritePaths" not in console
    assert daemon_environment["TRACKER_OUTPUT_DIR"] in console["InaccessiblePaths"][0]
    assert "--allow-actions" not in console["ExecStart"][0], "read-only unless an operator asks"


def _scratch_root_with_user(root: Path) -> tuple[int, int]:
    """Run sysusers into `root`; the tracker user's uid and gid there."""
    (root / "etc").mkdir()
    result = _run(_tool("systemd-sysusers"), f"--root={root}", str(SYSUSERS))
    assert result.returncode == 0, result.stderr
    entries = {
        line.split(":")[0]: line.split(":")
        for line in (root / "etc" / "passwd").read_text(encoding="utf-8").splitlines()
    }
    groups = {
        line.split(":")[0]: line.split(":")
        for line in (root / "etc" / "group").read_text(encoding="utf-8").splitlines()
    }
    _, _, uid, gid, _, home, shell = entries["tracker"]
    assert groups["tracker"][2] == gid, "the user's primary group is the tracker group"
    assert home == "/var/lib/tracker"
    assert shell.endswith("/nologin")
    assert 0 < int(uid) < 1000, "a system user"
    return int(uid), int(gid)


def test_sysusers_creates_the_static_tracker_user(tmp_path: Path) -> None:
    _scratch_root_with_user(tmp_path)


def test_tmpfiles_create_the_directories_the_unit_needs(tmp_path: Path) -> None:
    if os.geteuid() != 0 and not IN_CI:
        pytest.skip("creating directories owned by another user needs root")
    uid, gid = _scratch_root_with_user(tmp_path)
    result = _run(_tool("systemd-tmpfiles"), "--create", f"--root={tmp_path}", str(TMPFILES))
    assert result.returncode == 0, result.stderr

    expected = {
        "/srv/deepvue-results": (0o750, uid, gid),
        "/etc/tracker": (0o750, 0, gid),
    }
    for path, (mode, owner, group) in expected.items():
        created = (tmp_path / path.lstrip("/")).stat()
        assert (created.st_mode & 0o7777, created.st_uid, created.st_gid) == (
            mode,
            owner,
            group,
        ), path

    # Every ReadWritePaths= entry is created here: a missing one fails the service's start.
    service = _service_settings(UNIT.read_text(encoding="utf-8"))
    for path in " ".join(service["ReadWritePaths"]).split():
        assert (tmp_path / path.lstrip("-").lstrip("/")).is_dir(), path


def _env_example_lines() -> list[tuple[bool, str, str]]:
    """(active, name, value) for each TRACKER_* assignment, commented out or not."""
    lines = []
    for raw in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        match = re.fullmatch(r"(#?)(TRACKER_[A-Z0-9_]+)=(.*)", raw)
        if match:
            lines.append((not match.group(1), match.group(2), match.group(3)))
    return lines


def test_env_example_documents_every_setting() -> None:
    named = {name for _, name, _ in _env_example_lines()}
    known = {ENV_PREFIX + field.name.upper() for field in fields(Settings)}
    assert known - named == set(), "settings missing from the example"
    assert named - known - NON_FIELD_SETTINGS == set(), "names the daemon does not read"


def test_env_example_values_are_accepted_and_hold_no_secret() -> None:
    active = {}
    for is_active, name, value in _env_example_lines():
        # systemd and sh (used for `tracker check`) read such values the same way.
        assert re.fullmatch(r"[^\s'\"\\$`]*", value), f"{name}: {value!r}"
        if "SECRET" in name:
            assert value == "", f"{name} must not carry a value in the example"
        if name in NON_FIELD_SETTINGS:
            continue
        load_settings({name: value})  # raises SettingsError naming the setting
        if is_active:
            active[name] = value
    settings = load_settings(active)
    assert settings.database_url == "sqlite:////var/lib/tracker/tracker.db"
    assert str(settings.output_dir) == "/srv/deepvue-results"
    assert settings.client_id is None, "the client id is left for the operator to fill in"
