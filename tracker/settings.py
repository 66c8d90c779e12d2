"""The one Settings object: environment variables `TRACKER_*`, optionally a TOML file.

The environment wins over the file. Every problem is reported as one SettingsError that
names the setting, so the CLI can print a single clear line instead of a traceback.
"""

from __future__ import annotations

import os
import sys
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from tracker.domain.addresses import parse_listen_address
from tracker.domain.durations import parse_duration
from tracker.domain.model import PollPolicy
from tracker.domain.quota import PLANS

ENV_PREFIX = "TRACKER_"
# The name of the systemd credential holding the client secret (LoadCredential=).
CREDENTIAL_NAME = "client_secret"
# The systemd credential holding the webhook secret.
WEBHOOK_CREDENTIAL_NAME = "webhook_secret"
# A webhook secret is the only thing guarding the listener: shorter is guessable.
MIN_WEBHOOK_SECRET_LENGTH = 16
# The systemd credential holding the console's access token.
CONSOLE_CREDENTIAL_NAME = "console_token"
# The console token is all that stands between the network and the batches: shorter is
# guessable.
MIN_CONSOLE_TOKEN_LENGTH = 16
# Loopback: the console is reached through an SSH tunnel or a reverse proxy, never directly.
DEFAULT_CONSOLE_ADDR = "127.0.0.1:8465"
# With webhooks on, the share of batches the schedule expects their webhook to find
# (PollPolicy.webhook_share; docs/polling.md, "With webhooks on").
WEBHOOK_SHARE = 0.9


class SettingsError(ValueError):
    """A setting is missing or invalid; the message names it."""


def _duration(text: str) -> float:
    value = parse_duration(text)
    if value <= 0:
        raise ValueError("must be a positive duration (e.g. 30, 0.5, 90s, 15m, 1h30m, 7d)")
    return value


# Heartbeats go out three times per timeout; below this, a busy host could miss them all.
MIN_HEARTBEAT_TIMEOUT = 3.0


def _heartbeat_timeout(text: str) -> float:
    value = _duration(text)
    if value < MIN_HEARTBEAT_TIMEOUT:
        raise ValueError(f"must be at least {MIN_HEARTBEAT_TIMEOUT:g} s")
    return value


_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def _size(text: str) -> int:
    """Bytes, or with a binary unit: 512k, 100M, 10G, 1T (K = 1024)."""
    value = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = value[-1:] if value[-1:] in _SIZE_UNITS else ""
    number = value[: len(value) - len(unit)].strip()
    if not number.isdigit():
        raise ValueError("must be a whole number of bytes, optionally with K, M, G or T (e.g. 10G)")
    size = int(number) * _SIZE_UNITS[unit]
    if size <= 0:
        raise ValueError("must be positive")
    return size


def _env_names(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    for name in names:
        if not (name.replace("_", "a").isalnum() and name.isascii()) or name[0].isdigit():
            raise ValueError(f"{name!r} is not an environment variable name")
    return names


def _count(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError("must be a positive whole number")
    return value


def _choice(*options: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return value

    return parse


def _host_patterns(text: str) -> tuple[str, ...]:
    patterns = tuple(p.strip().lower() for p in text.split(",") if p.strip())
    if not patterns:
        raise ValueError("needs at least one host pattern")
    return patterns


def _base_url(text: str) -> str:
    url = text.strip().rstrip("/")
    if not url.startswith(("https://", "http://")):
        raise ValueError("must be an http(s) URL")
    return url


def _public_url(text: str) -> str:
    url = _base_url(text)
    if "?" in url or "#" in url:
        raise ValueError("must have no query string or fragment")
    if len(url.split("//", 1)[1]) == 0:
        raise ValueError("needs a host")
    return url


def _webhook_secret(text: str) -> str:
    secret = text.strip()
    _check_webhook_secret(secret)
    return secret


def _check_webhook_secret(secret: str) -> None:
    if len(secret) < MIN_WEBHOOK_SECRET_LENGTH:
        raise ValueError(f"must be at least {MIN_WEBHOOK_SECRET_LENGTH} characters")
    # It is one path segment, compared as the listener receives it (percent-decoded).
    if any(not char.isprintable() or char.isspace() or char in "/?#%" for char in secret):
        raise ValueError("must be printable, without spaces, '/', '?', '#' or '%'")


def _console_token(text: str) -> str:
    token = text.strip()
    _check_console_token(token)
    return token


def _check_console_token(token: str) -> None:
    if len(token) < MIN_CONSOLE_TOKEN_LENGTH:
        raise ValueError(f"must be at least {MIN_CONSOLE_TOKEN_LENGTH} characters")
    # It travels in an Authorization header and a form field: printable ASCII, one word.
    if not token.isascii() or any(not char.isprintable() or char.isspace() for char in token):
        raise ValueError("must be printable ASCII without spaces")


def _database_url(text: str) -> str:
    url = text.strip()
    if not url.startswith(("sqlite:", "postgresql")):
        raise ValueError("must be a sqlite:/// or postgresql+psycopg:// URL")
    return url


def _log_level(text: str) -> str:
    value = text.strip().upper()
    if value not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ValueError("must be one of debug, info, warning, error")
    return value


def _text(text: str) -> str:
    return text.strip()


def _command(text: str) -> str:
    import shlex

    words = shlex.split(text)
    if not words:
        raise ValueError("needs a command")
    return text.strip()


def _listen_address(text: str) -> str:
    parse_listen_address(text)
    return text.strip()


def _mode(text: str) -> int:
    value = int(text, 8)
    # Owner read (and write), group read: nothing else. No world bits, no execute, no group
    # write, no setuid/setgid/sticky. A read-only mode is fine: the downloader writes and
    # fchmods through the descriptor it created, and publishes with a rename.
    if value not in _FILE_MODES:
        raise ValueError("must be 600, 640, 400 or 440 (owner read/write, group read)")
    return value


_FILE_MODES = frozenset({0o600, 0o640, 0o400, 0o440})


@dataclass(frozen=True)
class Settings:
    database_url: str = "sqlite:///tracker.db"
    output_dir: Path = Path("./downloads")
    api_base_url: str = "https://production.deepvue.tech"
    client_id: str | None = None
    client_secret: str | None = field(default=None, repr=False)
    client_secret_file: Path | None = None
    sweep_interval: float = 5.0
    poll_min_interval: float = 30.0
    poll_max_interval: float = 900.0
    max_age: float = 7 * 86400.0
    plan: str = "starter"
    rate_per_second: int = PLANS["starter"][0]
    rate_per_minute: int = PLANS["starter"][1]
    rate_per_day: int = PLANS["starter"][2]
    concurrency: int = 8
    # None: as many as TRACKER_CONCURRENCY.
    download_concurrency: int | None = None
    http_timeout: float = 30.0
    download_allowed_hosts: tuple[str, ...] = ("*.amazonaws.com",)
    download_deadline: float = 3600.0
    # The largest output file accepted; a larger one (announced or sent) is refused.
    max_file_size: int = 10 << 30
    file_mode: int = 0o640
    lease_duration: float = 300.0
    # An instance whose heartbeat is older than this is presumed dead: its leases are freed.
    heartbeat_timeout: float = 30.0
    # The longest pause a 429's Retry-After may impose; a longer one is clamped and logged.
    max_retry_after: float = 3600.0
    shutdown_grace: float = 20.0
    log_format: str = "json"
    log_level: str = "INFO"
    on_final: str | None = None
    on_final_timeout: float = 60.0
    # Extra variables of the daemon's environment passed on to the on-final hook.
    on_final_env: tuple[str, ...] = ()
    metrics_addr: str | None = None
    webhook_addr: str | None = None
    webhook_secret: str | None = field(default=None, repr=False)
    webhook_secret_file: Path | None = None
    webhook_public_url: str | None = None
    console_addr: str = DEFAULT_CONSOLE_ADDR
    console_token: str | None = field(default=None, repr=False)
    console_token_file: Path | None = None

    @property
    def webhooks_on(self) -> bool:
        """The listener runs: an address and a secret (given or in a file) are set."""
        has_secret = bool(self.webhook_secret) or self.webhook_secret_file is not None
        return bool(self.webhook_addr) and has_secret

    @property
    def poll_policy(self) -> PollPolicy:
        return PollPolicy(
            min_interval=self.poll_min_interval,
            max_interval=self.poll_max_interval,
            max_age=self.max_age,
            max_retry_after=self.max_retry_after,
            webhook_share=WEBHOOK_SHARE if self.webhooks_on else 0.0,
        )

    def read_webhook_secret(self) -> str:
        """The webhook secret: from its file (read at each call) or as given."""
        if self.webhook_secret_file is not None:
            try:
                secret = self.webhook_secret_file.read_text(encoding="utf-8").strip()
            except OSError as error:
                raise SettingsError(
                    f"TRACKER_WEBHOOK_SECRET_FILE: cannot read {self.webhook_secret_file}: "
                    f"{error.strerror}"
                ) from None
            try:
                _check_webhook_secret(secret)
            except ValueError as error:
                raise SettingsError(
                    f"TRACKER_WEBHOOK_SECRET_FILE: the secret in {self.webhook_secret_file} {error}"
                ) from None
            return secret
        if self.webhook_secret:
            return self.webhook_secret
        raise SettingsError("TRACKER_WEBHOOK_SECRET or TRACKER_WEBHOOK_SECRET_FILE must be set")

    def read_console_token(self) -> str:
        """The console's access token: from its file or as given; `tracker web` needs one."""
        if self.console_token_file is not None:
            try:
                token = self.console_token_file.read_text(encoding="utf-8").strip()
            except OSError as error:
                raise SettingsError(
                    f"TRACKER_CONSOLE_TOKEN_FILE: cannot read {self.console_token_file}: "
                    f"{error.strerror}"
                ) from None
            try:
                _check_console_token(token)
            except ValueError as error:
                raise SettingsError(
                    f"TRACKER_CONSOLE_TOKEN_FILE: the token in {self.console_token_file} {error}"
                ) from None
            return token
        if self.console_token:
            return self.console_token
        raise SettingsError(
            "TRACKER_CONSOLE_TOKEN or TRACKER_CONSOLE_TOKEN_FILE must be set for the console"
        )

    def read_client_secret(self) -> str:
        """The secret as of now: a secret file is re-read at every call, so it can be rotated."""
        if self.client_secret_file is not None:
            try:
                secret = self.client_secret_file.read_text(encoding="utf-8").strip()
            except OSError as error:
                raise SettingsError(
                    f"TRACKER_CLIENT_SECRET_FILE: cannot read {self.client_secret_file}: "
                    f"{error.strerror}"
                ) from None
            if not secret:
                raise SettingsError(
                    f"TRACKER_CLIENT_SECRET_FILE: {self.client_secret_file} is empty"
                )
            return secret
        if self.client_secret:
            return self.client_secret
        raise SettingsError("TRACKER_CLIENT_SECRET or TRACKER_CLIENT_SECRET_FILE must be set")

    def require_webhook_secret(self) -> None:
        """Fail at start, not at the first delivery: an address without a usable secret."""
        if self.webhook_addr:
            if not (self.webhook_secret or self.webhook_secret_file is not None):
                raise SettingsError(
                    "TRACKER_WEBHOOK_ADDR needs TRACKER_WEBHOOK_SECRET or TRACKER_WEBHOOK_SECRET_FILE"
                )
            self.read_webhook_secret()

    def require_credentials(self) -> None:
        """Fail now, not at the first status call, when the API credentials are missing."""
        if not self.client_id:
            raise SettingsError("TRACKER_CLIENT_ID must be set")
        self.read_client_secret()


# name -> parser; the name is the TOML key and, upper-cased with the prefix, the variable.
_PARSERS: dict[str, Callable[[str], Any]] = {
    "database_url": _database_url,
    "output_dir": lambda text: Path(text.strip()),
    "api_base_url": _base_url,
    "client_id": _text,
    "client_secret": _text,
    "client_secret_file": lambda text: Path(text.strip()),
    "sweep_interval": _duration,
    "poll_min_interval": _duration,
    "poll_max_interval": _duration,
    "max_age": _duration,
    "plan": _choice(*PLANS),
    "rate_per_second": _count,
    "rate_per_minute": _count,
    "rate_per_day": _count,
    "concurrency": _count,
    "download_concurrency": _count,
    "http_timeout": _duration,
    "download_allowed_hosts": _host_patterns,
    "download_deadline": _duration,
    "max_file_size": _size,
    "file_mode": _mode,
    "lease_duration": _duration,
    "heartbeat_timeout": _heartbeat_timeout,
    "max_retry_after": _duration,
    "shutdown_grace": _duration,
    "log_format": _choice("json", "console"),
    "log_level": _log_level,
    "on_final": _command,
    "on_final_timeout": _duration,
    "on_final_env": _env_names,
    "metrics_addr": _listen_address,
    "webhook_addr": _listen_address,
    "webhook_secret": _webhook_secret,
    "webhook_secret_file": lambda text: Path(text.strip()),
    "webhook_public_url": _public_url,
    "console_addr": _listen_address,
    "console_token": _console_token,
    "console_token_file": lambda text: Path(text.strip()),
}
assert set(_PARSERS) == {f.name for f in fields(Settings)}


def _read_toml(path: Path) -> dict[str, str]:
    try:
        with path.open("rb") as handle:
            document = tomllib.load(handle)
    except OSError as error:
        raise SettingsError(f"config file {path}: {error.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise SettingsError(f"config file {path}: not valid TOML ({error})") from None
    except ValueError as error:  # a NUL in the path, from a caller's own mapping
        raise SettingsError(f"config file {path!r}: {error}") from None
    values: dict[str, str] = {}
    for key, value in document.items():
        name = key.lower().removeprefix("tracker_")
        if name not in _PARSERS:
            raise SettingsError(f"config file {path}: unknown setting {key!r}")
        if isinstance(value, list):
            value = ",".join(str(item) for item in value)
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise SettingsError(f"config file {path}: {key} must be a string or a number")
        values[name] = str(value)
    return values


def load_settings(
    environ: Mapping[str, str] | None = None, config_file: Path | None = None
) -> Settings:
    """Settings from a TOML file (if named) overlaid with the `TRACKER_*` environment."""
    environ = os.environ if environ is None else environ
    if config_file is None and environ.get("TRACKER_CONFIG"):
        config_file = Path(environ["TRACKER_CONFIG"])
    raw: dict[str, str] = _read_toml(config_file) if config_file is not None else {}
    for name in _PARSERS:
        value = environ.get(ENV_PREFIX + name.upper())
        if value is not None and value != "":
            raw[name] = value

    parsed: dict[str, Any] = {}
    for name, text in raw.items():
        try:
            parsed[name] = _PARSERS[name](text)
        except ValueError as error:
            reason = str(error) if "invalid literal" not in str(error) else "not a number"
            shown = "***" if "secret" in name or name == "console_token" else repr(text)
            raise SettingsError(f"{ENV_PREFIX}{name.upper()}={shown}: {reason}") from None

    # Under systemd, LoadCredential=client_secret:... puts the secret in this directory.
    credentials = environ.get("CREDENTIALS_DIRECTORY")
    if credentials and "client_secret" not in parsed and "client_secret_file" not in parsed:
        candidate = Path(credentials) / CREDENTIAL_NAME
        if candidate.is_file():
            parsed["client_secret_file"] = candidate
    if credentials and "webhook_secret" not in parsed and "webhook_secret_file" not in parsed:
        candidate = Path(credentials) / WEBHOOK_CREDENTIAL_NAME
        if candidate.is_file():
            parsed["webhook_secret_file"] = candidate

    if credentials and "console_token" not in parsed and "console_token_file" not in parsed:
        candidate = Path(credentials) / CONSOLE_CREDENTIAL_NAME
        if candidate.is_file():
            parsed["console_token_file"] = candidate

    # A plan fills in the three rates unless they are given one by one.
    plan = parsed.get("plan", Settings.plan)
    for name, preset in zip(
        ("rate_per_second", "rate_per_minute", "rate_per_day"), PLANS[plan], strict=True
    ):
        parsed.setdefault(name, preset)
    if "log_format" not in parsed:
        parsed["log_format"] = "json" if not sys.stdout.isatty() else "console"

    settings = Settings(**parsed)
    if settings.poll_min_interval > settings.poll_max_interval:
        raise SettingsError(
            "TRACKER_POLL_MIN_INTERVAL must not exceed TRACKER_POLL_MAX_INTERVAL "
            f"({settings.poll_min_interval} > {settings.poll_max_interval})"
        )
    return settings
