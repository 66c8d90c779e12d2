"""The systemd deployment in deploy/: checked with systemd's own tools.

The unit must pass `systemd-analyze verify` without a word and score an exposure of 2.0 or
lower in `systemd-analyze security`; the sysusers.d and tmpfiles.d snippets must create, in a
scratch root, the user and the directories the unit relies on; the env file example must
name every setting the daemon has, with values the daemon accepts. The reverse-proxy examples
in deploy/proxy/ must forward only the webhook path to the documented listener, cap bodies
at the listener's cap and keep the path (it holds the secret) out of every log line: read
statically, checked by `nginx -t` and `caddy validate`, and run in front of the real
listener. The webhook drop-in must leave the unit verifying and as well sandboxed.

The tools are part of systemd, nginx and Caddy, not of this project: without them a check is
skipped, except under CI (CI=true), where a missing tool is a failure.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from tests.e2e.support import free_port
from tracker.daemon import WEBHOOK_MAX_BODY
from tracker.domain.addresses import parse_listen_address
from tracker.http_listener import start_listener
from tracker.settings import (
    CONSOLE_CREDENTIAL_NAME,
    CREDENTIAL_NAME,
    ENV_PREFIX,
    WEBHOOK_CREDENTIAL_NAME,
    Settings,
    load_settings,
)
from tracker.webhook import webhook_app

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNIT = DEPLOY / "tracker.service"
CONSOLE_UNIT = DEPLOY / "tracker-console.service"
SYSUSERS = DEPLOY / "sysusers.d" / "tracker.conf"
TMPFILES = DEPLOY / "tmpfiles.d" / "tracker.conf"
ENV_EXAMPLE = DEPLOY / "tracker.env.example"
PROXY = DEPLOY / "proxy"
NGINX_SITE = PROXY / "nginx.conf"
CADDYFILE = PROXY / "Caddyfile"
WEBHOOK_DROP_IN = PROXY / "tracker-webhooks.conf"
README = DEPLOY.parent / "README.md"

INSTALLED_EXEC_START = "ExecStart=/opt/deepvue-tracker/bin/tracker run"
CONSOLE_EXEC_START = "ExecStart=/opt/deepvue-tracker/bin/tracker web"
MAX_EXPOSURE = 2.0
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
# Plain output whatever the terminal: no colours, no pager.
TOOL_ENV = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "SYSTEMD_LESS": ""}
# Settings that are not Settings fields but are still read from the environment.
NON_FIELD_SETTINGS = {"TRACKER_CONFIG"}


def _tool(name: str, package: str = "systemd") -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (part of {package})"
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


# --------------------------------------------------------------------------- webhooks


def _documented_webhook_address() -> str:
    """TRACKER_WEBHOOK_ADDR as the env example shows it: what the proxies must forward to."""
    values = [value for _, name, value in _env_example_lines() if name == "TRACKER_WEBHOOK_ADDR"]
    assert len(values) == 1, values
    return values[0]


def _drop_in_settings() -> dict[str, list[str]]:
    # A drop-in has the unit file's syntax; its [Service] lines add to the unit's.
    return _service_settings(WEBHOOK_DROP_IN.read_text(encoding="utf-8"))


def test_the_webhook_address_is_documented_alike_everywhere() -> None:
    address = _documented_webhook_address()
    host, _ = parse_listen_address(address)
    assert host == "127.0.0.1", "the listener is for a proxy on the same host"
    assert f"TRACKER_WEBHOOK_ADDR={address}" in README.read_text(encoding="utf-8")
    environment = dict(value.split("=", 1) for value in _drop_in_settings()["Environment"])
    assert environment == {"TRACKER_WEBHOOK_ADDR": address}


def test_the_webhook_drop_in_keeps_the_sandbox() -> None:
    unit = _service_settings(UNIT.read_text(encoding="utf-8"))
    drop_in = _drop_in_settings()
    # It only adds the listener and its secret; it loosens nothing.
    assert set(drop_in) == {"Environment", "LoadCredential"}
    credentials = [value.partition(":")[0] for value in drop_in["LoadCredential"]]
    assert credentials == [WEBHOOK_CREDENTIAL_NAME]
    settings = load_settings(dict(value.split("=", 1) for value in drop_in["Environment"]))
    _, port = parse_listen_address(settings.webhook_addr or "")

    # A TCP listener on loopback is allowed by the unit as it ships: the address families
    # include IPv4 and IPv6, no address or bind filter and no private network keeps the
    # proxy out, and without capabilities the port must not be a privileged one.
    families = " ".join(unit["RestrictAddressFamilies"]).split()
    assert {"AF_INET", "AF_INET6"} <= set(families)
    for closed in ("IPAddressDeny", "IPAddressAllow", "SocketBindDeny", "PrivateNetwork"):
        assert closed not in unit, closed
    assert unit["CapabilityBoundingSet"] == [""]
    assert port >= 1024
    assert unit["SystemCallFilter"][0] == "@system-service"  # holds bind, listen, accept


def _unit_with_webhook_drop_in(directory: Path) -> Path:
    copy = _runnable_copy(directory)
    # verify and security read drop-ins from <unit>.d/ beside the unit they are given.
    drop_ins = directory / f"{UNIT.name}.d"
    drop_ins.mkdir()
    shutil.copyfile(WEBHOOK_DROP_IN, drop_ins / "webhooks.conf")
    return copy


def test_the_unit_with_the_webhook_drop_in_verifies_and_scores_the_same(tmp_path: Path) -> None:
    copy = _unit_with_webhook_drop_in(tmp_path)
    assert _verify_problems(copy) == []

    def exposure(unit: Path) -> float:
        result = _run(_tool("systemd-analyze"), "security", "--offline=yes", str(unit))
        match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
        assert match is not None, result.stdout + result.stderr
        return float(match.group(1))

    assert exposure(copy) == exposure(UNIT) <= MAX_EXPOSURE


def test_verify_reads_the_webhook_drop_in(tmp_path: Path) -> None:
    # Guards the test above: the drop-in is read, so a mistake in it would be reported.
    copy = _unit_with_webhook_drop_in(tmp_path)
    drop_in = tmp_path / f"{UNIT.name}.d" / "webhooks.conf"
    drop_in.write_text(
        drop_in.read_text(encoding="utf-8").replace("LoadCredential=", "LoadCredentials="),
        encoding="utf-8",
    )
    problems = _verify_problems(copy)
    assert any("LoadCredentials" in line for line in problems), problems


@dataclass
class Directive:
    """One directive of an nginx or Caddy configuration, with its block if it has one."""

    name: str
    args: list[str]
    block: list[Directive] | None = None

    def children(self, name: str) -> list[Directive]:
        return [child for child in self.block or [] if child.name == name]

    def descendants(self, name: str) -> list[Directive]:
        found = []
        for child in self.block or []:
            if child.name == name:
                found.append(child)
            found += child.descendants(name)
        return found


_NGINX_TOKENS = re.compile(r"#[^\n]*|'[^']*'|\"[^\"]*\"|[{};]|[^\s{};'\"]+")


def _parse_nginx(text: str) -> Directive:
    """The directives of an nginx file, under an unnamed root."""
    root = Directive("", [], [])
    stack = [root]
    words: list[str] = []
    for match in _NGINX_TOKENS.finditer(text):
        token = match.group()
        if token.startswith("#"):
            continue
        if token == ";":
            stack[-1].block.append(Directive(words[0], words[1:]))  # type: ignore[union-attr]
            words = []
        elif token == "{":
            opened = Directive(words[0], words[1:], [])
            stack[-1].block.append(opened)  # type: ignore[union-attr]
            stack.append(opened)
            words = []
        elif token == "}":
            assert not words, f"unterminated directive {words}"
            stack.pop()
        else:
            words.append(token[1:-1] if token[0] in "'\"" else token)
    assert len(stack) == 1 and not words, "unbalanced braces"
    return root


def _parse_caddyfile(text: str) -> Directive:
    """The directives of a Caddyfile (one per line, `{` at a line's end opens a block);
    the global options block is the directive named ""."""
    root = Directive("", [], [])
    stack = [root]
    for raw in text.splitlines():
        words = raw.split(" #")[0].split() if not raw.lstrip().startswith("#") else []
        if not words:
            continue
        if words == ["}"]:
            stack.pop()
        elif words[-1] == "{":
            name, *args = words[:-1] or [""]
            opened = Directive(name, args, [])
            stack[-1].block.append(opened)  # type: ignore[union-attr]
            stack.append(opened)
        else:
            stack[-1].block.append(Directive(words[0], words[1:]))  # type: ignore[union-attr]
    assert len(stack) == 1, "unbalanced braces"
    return root


def _size(text: str) -> int:
    """nginx's 64k and Caddy's 64KiB alike, in bytes (Caddy's KB is 1000)."""
    match = re.fullmatch(r"(\d+)\s*(k|m|KiB|MiB|KB|MB)?", text)
    assert match is not None, text
    units = {None: 1, "k": 1 << 10, "KiB": 1 << 10, "m": 1 << 20, "MiB": 1 << 20}
    units |= {"KB": 1000, "MB": 1000**2}
    return int(match.group(1)) * units[match.group(2)]


def _seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)?", text)
    assert match is not None, text
    return float(match.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[match.group(2)]


# nginx variables holding the request's path (and so the webhook secret).
_PATH_VARIABLES = re.compile(r"\$(request|request_uri|uri|document_uri|args|query_string)\b")


def test_nginx_forwards_only_the_webhook_path() -> None:
    root = _parse_nginx(NGINX_SITE.read_text(encoding="utf-8"))
    (server,) = root.children("server")
    locations = {tuple(location.args): location for location in server.children("location")}
    assert set(locations) == {("/webhook/",), ("=", "/webhook"), ("/",)}
    webhook = locations["/webhook/",]
    for other in (locations["=", "/webhook"], locations["/",]):
        assert [(d.name, d.args) for d in other.block or []] == [("return", ["404"])]

    # One proxy_pass in the whole file, to the documented listener, the path unchanged.
    (proxy_pass,) = root.descendants("proxy_pass")
    assert webhook.children("proxy_pass") == [proxy_pass]
    upstream_name = proxy_pass.args[0].removeprefix("http://")
    assert "/" not in upstream_name, "a URI in proxy_pass would rewrite the path"
    (upstream,) = [u for u in root.children("upstream") if u.args == [upstream_name]]
    assert [s.args[0] for s in upstream.children("server")] == [_documented_webhook_address()]

    # TLS ends here: every listening socket speaks it.
    listens = server.children("listen")
    assert listens and all("ssl" in listen.args for listen in listens)
    assert server.children("ssl_certificate") and server.children("ssl_certificate_key")

    (max_body,) = webhook.children("client_max_body_size")
    assert _size(max_body.args[0]) == WEBHOOK_MAX_BODY

    # The path reaches no log: every access log of the server uses a format without it,
    # and the error log (whose lines quote the request line) keeps only critical lines.
    formats = {f.args[0]: " ".join(f.args[1:]) for f in root.descendants("log_format")}
    assert server.children("access_log"), "the server's own access log, not nginx's default"
    for access_log in server.descendants("access_log"):
        if access_log.args != ["off"]:
            assert len(access_log.args) >= 2 and access_log.args[1] in formats, access_log.args
            assert not _PATH_VARIABLES.search(formats[access_log.args[1]]), access_log.args
    assert server.children("error_log")
    for error_log in server.descendants("error_log"):
        assert error_log.args[-1] in {"crit", "alert", "emerg"}, error_log.args

    for name in ("proxy_connect_timeout", "proxy_read_timeout", "proxy_send_timeout"):
        (timeout,) = webhook.children(name)
        assert _seconds(timeout.args[0]) <= 10, name
    for name in ("client_header_timeout", "client_body_timeout", "send_timeout"):
        (timeout,) = server.children(name)
        assert _seconds(timeout.args[0]) <= 10, name


def test_caddy_forwards_only_the_webhook_path() -> None:
    root = _parse_caddyfile(CADDYFILE.read_text(encoding="utf-8"))
    (global_options,) = root.children("")
    sites = [d for d in root.block or [] if d.name != ""]
    assert len(sites) == 1 and sites[0].block is not None
    site = sites[0]
    assert not site.name.startswith("http://"), "TLS ends at the proxy"
    assert {child.name for child in site.block or []} == {"log", "@webhook", "handle"}

    (matcher,) = site.children("@webhook")
    (path,) = matcher.children("path")
    assert path.args == ["/webhook/*"]
    handles = {tuple(handle.args): handle for handle in site.children("handle")}
    assert set(handles) == {("@webhook",), ()}
    assert [(d.name, d.args) for d in handles[()].block or []] == [("respond", ["404"])]

    # One reverse_proxy in the whole file, to the documented listener, the path unchanged.
    (proxy,) = root.descendants("reverse_proxy")
    assert handles["@webhook",].children("reverse_proxy") == [proxy]
    assert proxy.args == [_documented_webhook_address()]
    assert not root.descendants("uri") and not root.descendants("rewrite")

    (request_body,) = handles["@webhook",].children("request_body")
    (max_size,) = request_body.children("max_size")
    assert _size(max_size.args[0]) == WEBHOOK_MAX_BODY

    # Every log, the site's access log and the default one (where Caddy writes its error
    # lines, with the request), replaces the request URI.
    logs = site.children("log") + global_options.children("log")
    assert [log.args for log in global_options.children("log")] == [["default"]]
    for log in logs:
        (log_format,) = log.children("format")
        assert log_format.args == ["filter"]
        (fields_block,) = log_format.children("fields")
        assert [d.args[0] for d in fields_block.children("request>uri")] == ["replace"]

    (transport,) = proxy.children("transport")
    for name in ("dial_timeout", "response_header_timeout"):
        (timeout,) = transport.children(name)
        assert _seconds(timeout.args[0]) <= 10, name


# --- the proxies run in front of the real listener


SECRET = "proxy-test-" + "s3cr3t" * 4


def _wait_until_serving(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    """Until `url` answers over TLS (Caddy listens before its internal certificate is
    issued)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the proxy exited with {process.returncode}:\n{log.read_text()}")
        try:
            httpx.get(f"{url}/", verify=False, timeout=2)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    pytest.fail(f"the proxy did not answer at {url}:\n{log.read_text()}")


@dataclass
class ListenerInThread:
    """The tracker's webhook listener (webhook_app, start_listener) on its own loop and
    thread, tracking `tracked`; records every path it was asked for and what it brought
    forward."""

    tracked: frozenset[str] = frozenset({"batch-1", "batch-2", "batch-3"})
    port: int = 0
    paths: list[str] = field(default_factory=list)
    brought_forward: list[set[str]] = field(default_factory=list)
    _loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    _thread: threading.Thread | None = None
    _runner: web.AppRunner | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

        async def bring_forward(request_ids: set[str]) -> set[str]:
            moved = request_ids & self.tracked
            self.brought_forward.append(moved)
            return moved

        @web.middleware
        async def record(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            self.paths.append(request.path)
            return await handler(request)

        app = webhook_app(SECRET, bring_forward=bring_forward, max_body=WEBHOOK_MAX_BODY)
        app.middlewares.append(record)
        started = start_listener(app, "127.0.0.1", self.port, event="webhook.listening")
        self._runner = asyncio.run_coroutine_threadsafe(started, self._loop).result(10)
        self.port = int(self._runner.addresses[0][1])

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
            self._runner = None

    def close(self) -> None:
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop.close()


def _nginx_copy(directory: Path, port: int, upstream: int) -> Path:
    """The shipped site on a loopback port, its certificate self-signed, its logs and its
    upstream here; wrapped in the smallest main configuration."""
    openssl = _tool("openssl", "openssl")
    key, cert = directory / "key.pem", directory / "cert.pem"
    made = _run(
        openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert),
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    site = NGINX_SITE.read_text(encoding="utf-8")
    replacements = {
        "/etc/ssl/tracker/fullchain.pem": str(cert),
        "/etc/ssl/tracker/privkey.pem": str(key),
        "/var/log/nginx/": f"{directory}/",
        "listen 443 ssl;": f"listen 127.0.0.1:{port} ssl;",
        "listen [::]:443 ssl;": "",
        f"server {_documented_webhook_address()};": f"server 127.0.0.1:{upstream};",
    }
    for shipped, here in replacements.items():
        assert shipped in site, shipped
        site = site.replace(shipped, here)
    (directory / "site.conf").write_text(site, encoding="utf-8")
    main = directory / "nginx.conf"
    main.write_text(
        f"pid {directory}/nginx.pid;\nerror_log {directory}/main-error.log;\n"
        f"events {{}}\nhttp {{\n    access_log {directory}/access.log;\n"
        f"    include {directory}/site.conf;\n}}\n",
        encoding="utf-8",
    )
    return main


def _nginx_command(main: Path) -> list[str]:
    directory = str(main.parent)
    return [_tool("nginx", "nginx"), "-c", str(main), "-p", directory, "-e", f"{directory}/e.log"]


def _caddy_copy(directory: Path, port: int, upstream: int) -> Path:
    """The shipped Caddyfile on a loopback port with Caddy's internal CA, no admin API, no
    HTTP port, its storage, logs and upstream here."""
    text = CADDYFILE.read_text(encoding="utf-8")
    replacements = {
        "{\n\tlog default": (
            f"{{\n\tadmin off\n\tskip_install_trust\n\tauto_https disable_redirects\n"
            f"\thttp_port {free_port()}\n\tstorage file_system {directory}/storage\n"
            "\tlog default"
        ),
        "tracker.example.com {": f"https://127.0.0.1:{port} {{\n\ttls internal",
        "/var/log/caddy/": f"{directory}/",
        f"reverse_proxy {_documented_webhook_address()}": f"reverse_proxy 127.0.0.1:{upstream}",
    }
    for shipped, here in replacements.items():
        assert shipped in text, shipped
        text = text.replace(shipped, here, 1)
    copy = directory / "Caddyfile"
    copy.write_text(text, encoding="utf-8")
    return copy


def _caddy_env(directory: Path) -> dict[str, str]:
    home = str(directory)
    return {**TOOL_ENV, "HOME": home, "XDG_DATA_HOME": home, "XDG_CONFIG_HOME": home}


def test_nginx_accepts_the_site(tmp_path: Path) -> None:
    main = _nginx_copy(tmp_path, free_port(), free_port())
    result = _run(*_nginx_command(main), "-t")
    assert result.returncode == 0, result.stderr


def test_caddy_validates_the_caddyfile(tmp_path: Path) -> None:
    result = subprocess.run(
        [_tool("caddy", "caddy"), "validate", "--config", str(CADDYFILE), "--adapter", "caddyfile"],
        capture_output=True, text=True, env=_caddy_env(tmp_path), timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Valid configuration" in result.stdout + result.stderr


@contextmanager
def _proxy(kind: str, directory: Path, upstream: int) -> Iterator[str]:
    """nginx or Caddy, as shipped but on loopback, in front of `upstream`; its base URL."""
    port = free_port()
    log = directory / "proxy.out"
    if kind == "nginx":
        command = [*_nginx_command(_nginx_copy(directory, port, upstream)), "-g", "daemon off;"]
        env = TOOL_ENV
    else:
        caddyfile = _caddy_copy(directory, port, upstream)
        command = [_tool("caddy", "caddy"), "run", "--config", str(caddyfile)]
        command += ["--adapter", "caddyfile"]
        env = _caddy_env(directory)
    with log.open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_until_serving(f"https://127.0.0.1:{port}", process, log)
        yield f"https://127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=20)


@pytest.mark.parametrize("kind", ["nginx", "caddy"])
def test_the_proxy_forwards_only_the_webhook_and_logs_no_secret(kind: str, tmp_path: Path) -> None:
    listener = ListenerInThread()
    listener.start()
    try:
        with (
            _proxy(kind, tmp_path, listener.port) as base,
            httpx.Client(base_url=base, verify=False, timeout=15) as client,
        ):
            hook = f"/webhook/{SECRET}"
            answer = client.post(hook, json={"event": "done", "request_id": "batch-1"})
            assert (answer.status_code, answer.json()) == (200, {"matched": 1})
            assert listener.brought_forward == [{"batch-1"}]
            assert client.get(f"{hook}?request_id=batch-2").json() == {"matched": 1}
            assert listener.paths == [hook, hook]

            # Nothing else reaches the listener: not its other paths, nor near misses.
            for path in ("/metrics", "/healthz", "/", "/webhook", f"/x{hook}", "/webhooks/x"):
                assert client.get(path).status_code == 404, path
                assert client.post(path, content=b"{}").status_code == 404, path
            assert listener.paths == [hook, hook]
            assert client.put(hook, content=b"{}").status_code in (403, 404, 405)

            # The listener's cap holds through the proxy, with or without a length given:
            # nothing of a body over it is read. nginx answers 413 itself; Caddy 2.6 streams
            # the body on, and when the listener's 413 (it refuses by the length) meets
            # Caddy still sending, Caddy answers 502 instead.
            padding = "x" * WEBHOOK_MAX_BODY
            too_big = f'{{"request_id": "batch-3", "padding": "{padding}"}}'.encode()
            refused = {413} if kind == "nginx" else {413, 502}
            assert client.post(hook, content=too_big).status_code in refused

            def chunks() -> Iterator[bytes]:
                yield too_big

            assert client.post(hook, content=chunks()).status_code in refused
            assert client.post(hook, content=b"y" * WEBHOOK_MAX_BODY).status_code == 200
            assert listener.brought_forward == [{"batch-1"}, {"batch-2"}]

            # A wrong secret is the listener's 404; with the listener down, the proxy's 502,
            # and the proxy's error lines (which name the request) show no secret either.
            assert client.post(f"/webhook/{SECRET[:-1]}x", json={}).status_code == 404
            listener.stop()
            assert client.post(hook, json={"request_id": "batch-3"}).status_code == 502
            time.sleep(0.5)  # Caddy writes its access log asynchronously
    finally:
        listener.close()

    logs = {path.name: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    written = [name for name, text in logs.items() if name.endswith((".log", ".out")) and text]
    assert written, f"the proxy wrote no log at all: {sorted(logs)}"
    assert [name for name, text in logs.items() if SECRET.encode() in text] == []
