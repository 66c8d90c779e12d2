"""Settings from the environment and a TOML file, with one clear error per bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from tracker.settings import Settings, SettingsError, load_settings


def test_defaults() -> None:
    settings = load_settings({})
    assert settings.database_url == "sqlite:///tracker.db"
    assert settings.output_dir == Path("downloads")
    assert settings.api_base_url == "https://production.deepvue.tech"
    assert (settings.rate_per_second, settings.rate_per_minute, settings.rate_per_day) == (
        1,
        30,
        1000,
    )
    assert settings.download_allowed_hosts == ("*.amazonaws.com",)
    assert settings.file_mode == 0o640


def test_plan_presets_and_explicit_rates() -> None:
    settings = load_settings({"TRACKER_PLAN": "Growth", "TRACKER_RATE_PER_DAY": "5000"})
    assert (settings.rate_per_second, settings.rate_per_minute, settings.rate_per_day) == (
        5,
        500,
        5000,
    )


def test_environment_wins_over_the_file(tmp_path: Path) -> None:
    config = tmp_path / "tracker.toml"
    config.write_text(
        'database_url = "sqlite:///from-file.db"\nsweep_interval = 2.5\n'
        'download_allowed_hosts = ["127.0.0.1", "*.example.com"]\n'
    )
    settings = load_settings({"TRACKER_DATABASE_URL": "sqlite:///from-env.db"}, config)
    assert settings.database_url == "sqlite:///from-env.db"
    assert settings.sweep_interval == 2.5
    assert settings.download_allowed_hosts == ("127.0.0.1", "*.example.com")


def test_config_file_from_environment(tmp_path: Path) -> None:
    config = tmp_path / "tracker.toml"
    config.write_text("concurrency = 3\n")
    assert load_settings({"TRACKER_CONFIG": str(config)}).concurrency == 3


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"TRACKER_SWEEP_INTERVAL": "soon"}, "TRACKER_SWEEP_INTERVAL"),
        ({"TRACKER_SWEEP_INTERVAL": "-1"}, "TRACKER_SWEEP_INTERVAL"),
        ({"TRACKER_CONCURRENCY": "0"}, "TRACKER_CONCURRENCY"),
        ({"TRACKER_PLAN": "platinum"}, "TRACKER_PLAN"),
        ({"TRACKER_DATABASE_URL": "mysql://x"}, "TRACKER_DATABASE_URL"),
        ({"TRACKER_FILE_MODE": "644"}, "TRACKER_FILE_MODE"),
        ({"TRACKER_LOG_FORMAT": "xml"}, "TRACKER_LOG_FORMAT"),
        (
            {"TRACKER_POLL_MIN_INTERVAL": "100", "TRACKER_POLL_MAX_INTERVAL": "10"},
            "TRACKER_POLL_MIN_INTERVAL",
        ),
    ],
)
def test_invalid_values_name_the_setting(env: dict[str, str], names: str) -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings(env)
    message = str(raised.value)
    assert names in message
    assert "\n" not in message


def test_fractional_durations() -> None:
    assert load_settings({"TRACKER_POLL_MIN_INTERVAL": "0.25"}).poll_min_interval == 0.25


def test_bad_toml_and_unknown_keys(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("this is = = not toml")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings({}, broken)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("colour = 'blue'\n")
    with pytest.raises(SettingsError, match="unknown setting 'colour'"):
        load_settings({}, unknown)
    with pytest.raises(SettingsError, match=r"missing\.toml"):
        load_settings({}, tmp_path / "missing.toml")


def test_credentials_required_only_when_asked() -> None:
    settings = load_settings({})
    with pytest.raises(SettingsError, match="TRACKER_CLIENT_ID"):
        settings.require_credentials()
    with pytest.raises(SettingsError, match="TRACKER_CLIENT_SECRET"):
        load_settings({"TRACKER_CLIENT_ID": "me"}).require_credentials()


def test_secret_file_is_read_at_every_call(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("first\n")
    settings = load_settings(
        {"TRACKER_CLIENT_ID": "me", "TRACKER_CLIENT_SECRET_FILE": str(secret_file)}
    )
    settings.require_credentials()
    assert settings.read_client_secret() == "first"
    secret_file.write_text("second")
    assert settings.read_client_secret() == "second"
    secret_file.unlink()
    with pytest.raises(SettingsError, match="cannot read"):
        settings.read_client_secret()


def test_secret_is_not_in_repr() -> None:
    assert "hunter22" not in repr(Settings(client_secret="hunter22"))


def test_systemd_credential_is_the_default_secret_file(tmp_path: Path) -> None:
    (tmp_path / "client_secret").write_text("from-systemd\n")
    settings = load_settings({"CREDENTIALS_DIRECTORY": str(tmp_path), "TRACKER_CLIENT_ID": "me"})
    assert settings.read_client_secret() == "from-systemd"
    explicit = load_settings(
        {"CREDENTIALS_DIRECTORY": str(tmp_path), "TRACKER_CLIENT_SECRET": "explicit"}
    )
    assert explicit.read_client_secret() == "explicit"


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4096", 4096),
        ("512k", 512 << 10),
        ("100M", 100 << 20),
        ("10G", 10 << 30),
        ("1TiB", 1 << 40),
    ],
)
def test_max_file_size_takes_bytes_or_binary_units(text: str, size: int) -> None:
    assert load_settings({"TRACKER_MAX_FILE_SIZE": text}).max_file_size == size


@pytest.mark.parametrize("text", ["0", "-1", "1.5G", "ten", "10X", "G"])
def test_max_file_size_refuses_what_is_not_a_positive_size(text: str) -> None:
    with pytest.raises(SettingsError, match="TRACKER_MAX_FILE_SIZE"):
        load_settings({"TRACKER_MAX_FILE_SIZE": text})


def test_heartbeat_timeout_has_a_floor_and_max_retry_after_is_a_duration() -> None:
    settings = load_settings({"TRACKER_HEARTBEAT_TIMEOUT": "1m", "TRACKER_MAX_RETRY_AFTER": "2h"})
    assert (settings.heartbeat_timeout, settings.max_retry_after) == (60.0, 7200.0)
    with pytest.raises(SettingsError, match="TRACKER_HEARTBEAT_TIMEOUT"):
        load_settings({"TRACKER_HEARTBEAT_TIMEOUT": "2"})


def test_on_final_env_is_a_list_of_variable_names() -> None:
    names = load_settings({"TRACKER_ON_FINAL_ENV": "PGSERVICE, MY_APP_TOKEN"}).on_final_env
    assert names == ("PGSERVICE", "MY_APP_TOKEN")
    for bad in ("1ABC", "A-B", "A=B"):
        with pytest.raises(SettingsError, match="TRACKER_ON_FINAL_ENV"):
            load_settings({"TRACKER_ON_FINAL_ENV": bad})


@pytest.mark.parametrize("text", ["600", "640", "400", "440", "0640", "0o640"])
def test_file_mode_accepts_owner_read_write_and_group_read(text: str) -> None:
    assert load_settings({"TRACKER_FILE_MODE": text}).file_mode == int(text.removeprefix("0o"), 8)


@pytest.mark.parametrize(
    "text", ["4770", "7640", "2640", "1640", "4640", "660", "670", "700", "740", "750", "200"]
)
def test_file_mode_refuses_setuid_setgid_sticky_execute_and_group_write(text: str) -> None:
    with pytest.raises(SettingsError, match="TRACKER_FILE_MODE") as refused:
        load_settings({"TRACKER_FILE_MODE": text})
    assert "\n" not in str(refused.value)


WEBHOOK_SECRET = "wh-secret-0123456789abcdef"


def test_webhooks_are_off_by_default() -> None:
    settings = load_settings({})
    assert settings.webhook_addr is None
    assert not settings.webhooks_on
    assert settings.poll_policy.webhook_share == 0.0


def test_webhooks_on_with_an_address_and_a_secret() -> None:
    settings = load_settings(
        {
            "TRACKER_WEBHOOK_ADDR": "127.0.0.1:8081",
            "TRACKER_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "TRACKER_WEBHOOK_PUBLIC_URL": "https://hooks.example.com/tracker/",
        }
    )
    assert settings.webhooks_on
    assert settings.read_webhook_secret() == WEBHOOK_SECRET
    assert settings.webhook_public_url == "https://hooks.example.com/tracker"
    assert settings.poll_policy.webhook_share == 0.9
    assert WEBHOOK_SECRET not in repr(settings)


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"TRACKER_WEBHOOK_ADDR": "nowhere"}, "TRACKER_WEBHOOK_ADDR"),
        ({"TRACKER_WEBHOOK_SECRET": "short"}, "TRACKER_WEBHOOK_SECRET"),
        ({"TRACKER_WEBHOOK_SECRET": "sixteen-chars/ab"}, "TRACKER_WEBHOOK_SECRET"),
        ({"TRACKER_WEBHOOK_PUBLIC_URL": "ftp://example.com"}, "TRACKER_WEBHOOK_PUBLIC_URL"),
        ({"TRACKER_WEBHOOK_PUBLIC_URL": "https://x.example/?a=1"}, "TRACKER_WEBHOOK_PUBLIC_URL"),
    ],
)
def test_bad_webhook_settings_name_the_setting(env: dict[str, str], name: str) -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings(env)
    message = str(raised.value)
    assert name in message
    assert "\n" not in message
    assert "short" not in message  # a secret, even a bad one, is never shown


def test_webhook_secret_file_and_systemd_credential(tmp_path: Path) -> None:
    secret_file = tmp_path / "hook"
    secret_file.write_text(WEBHOOK_SECRET + "\n")
    settings = load_settings(
        {"TRACKER_WEBHOOK_ADDR": "127.0.0.1:0", "TRACKER_WEBHOOK_SECRET_FILE": str(secret_file)}
    )
    assert settings.webhooks_on
    assert settings.read_webhook_secret() == WEBHOOK_SECRET

    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "webhook_secret").write_text(WEBHOOK_SECRET)
    settings = load_settings(
        {"TRACKER_WEBHOOK_ADDR": "127.0.0.1:0", "CREDENTIALS_DIRECTORY": str(credentials)}
    )
    assert settings.webhook_secret_file == credentials / "webhook_secret"
    assert settings.read_webhook_secret() == WEBHOOK_SECRET


def test_a_short_secret_in_a_file_is_refused_in_one_line(tmp_path: Path) -> None:
    secret_file = tmp_path / "hook"
    secret_file.write_text("tooshort")
    settings = load_settings({"TRACKER_WEBHOOK_SECRET_FILE": str(secret_file)})
    with pytest.raises(SettingsError) as raised:
        settings.read_webhook_secret()
    assert "16" in str(raised.value)
    assert "tooshort" not in str(raised.value)
    assert "\n" not in str(raised.value)


def test_a_webhook_address_without_a_secret_is_refused_at_start() -> None:
    settings = load_settings({"TRACKER_WEBHOOK_ADDR": "127.0.0.1:8081"})
    assert not settings.webhooks_on
    with pytest.raises(SettingsError, match="TRACKER_WEBHOOK_ADDR needs TRACKER_WEBHOOK_SECRET"):
        settings.require_webhook_secret()
    load_settings({}).require_webhook_secret()  # webhooks off: nothing to check


CONSOLE_TOKEN = "console-0123456789abcdef"


def test_the_console_listens_on_loopback_and_needs_a_token() -> None:
    settings = load_settings({})
    assert settings.console_addr == "127.0.0.1:8465"
    with pytest.raises(SettingsError, match="TRACKER_CONSOLE_TOKEN or TRACKER_CONSOLE_TOKEN_FILE"):
        settings.read_console_token()
    given = load_settings({"TRACKER_CONSOLE_TOKEN": f"  {CONSOLE_TOKEN}\n"})
    assert given.read_console_token() == CONSOLE_TOKEN
    assert CONSOLE_TOKEN not in repr(given)


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"TRACKER_CONSOLE_ADDR": "0.0.0.0"}, "TRACKER_CONSOLE_ADDR"),
        ({"TRACKER_CONSOLE_ADDR": "http://127.0.0.1:8465"}, "TRACKER_CONSOLE_ADDR"),
        ({"TRACKER_CONSOLE_TOKEN": "short-token"}, "TRACKER_CONSOLE_TOKEN"),
        ({"TRACKER_CONSOLE_TOKEN": "sixteen chars ab"}, "TRACKER_CONSOLE_TOKEN"),
        ({"TRACKER_CONSOLE_TOKEN": "sixteen-chârs-ab"}, "TRACKER_CONSOLE_TOKEN"),
    ],
)
def test_bad_console_settings_name_the_setting_and_never_show_the_token(
    env: dict[str, str], name: str
) -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings(env)
    message = str(raised.value)
    assert message.startswith(name)
    assert "\n" not in message
    for value in env.values():
        if "TOKEN" in name:
            assert value not in message


def test_console_token_file_and_systemd_credential(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(CONSOLE_TOKEN + "\n")
    settings = load_settings({"TRACKER_CONSOLE_TOKEN_FILE": str(token_file)})
    assert settings.read_console_token() == CONSOLE_TOKEN

    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "console_token").write_text(CONSOLE_TOKEN)
    settings = load_settings({"CREDENTIALS_DIRECTORY": str(credentials)})
    assert settings.console_token_file == credentials / "console_token"
    assert settings.read_console_token() == CONSOLE_TOKEN

    token_file.write_text("tooshort")
    with pytest.raises(SettingsError) as raised:
        load_settings({"TRACKER_CONSOLE_TOKEN_FILE": str(token_file)}).read_console_token()
    assert "16" in str(raised.value) and "tooshort" not in str(raised.value)
    missing = load_settings({"TRACKER_CONSOLE_TOKEN_FILE": str(tmp_path / "none")})
    with pytest.raises(SettingsError, match="cannot read"):
        missing.read_console_token()
