from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from devtools.launcher import bot_command
from services.config import Config, ConfigError

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = {"DISCORD_TOKEN": "token-value-123", "SEGMIND_API_KEY": "sg_key_value_456"}


def test_defaults_when_only_the_secrets_are_set() -> None:
    config = Config.from_env(REQUIRED)
    assert config.segmind_base_url == "https://api.segmind.com"
    assert config.segmind_model == "sdxl1.0-dreamshaper"
    assert config.database_url == "sqlite:///data/bot.sqlite3"
    assert config.discord_guild_ids == ()
    assert config.mod_log_channel_id is None
    assert config.allow_direct_messages is False
    assert config.log_level == "INFO"


@pytest.mark.parametrize(
    ("raw", "allowed"), [("true", True), ("YES", True), ("1", True), ("false", False), ("off", False)]
)
def test_direct_messages_are_allowed_only_when_said(raw: str, allowed: bool) -> None:
    assert Config.from_env({**REQUIRED, "ALLOW_DIRECT_MESSAGES": raw}).allow_direct_messages is allowed


def test_a_word_that_is_not_true_or_false_is_named() -> None:
    with pytest.raises(ConfigError, match=r"ALLOW_DIRECT_MESSAGES.*true or false"):
        Config.from_env({**REQUIRED, "ALLOW_DIRECT_MESSAGES": "sometimes"})


def test_every_variable_is_parsed() -> None:
    config = Config.from_env(
        {
            **REQUIRED,
            "SEGMIND_BASE_URL": "http://127.0.0.1:8700/",
            "SEGMIND_MODEL": "other-model",
            "SEGMIND_REQUESTS_PER_MINUTE": "5",
            "SEGMIND_MAX_POLL_SECONDS": "2.5",
            "DATABASE_URL": "redis://127.0.0.1:6379/0",
            "QUOTA_DAILY_IMAGES": "10",
            "QUOTA_MAX_CONCURRENT": "3",
            "QUOTA_EXEMPT_ROLE_IDS": "11, 12",
            "DISCORD_GUILD_IDS": "123,456",
            "MOD_LOG_CHANNEL_ID": "789",
            "LOG_LEVEL": "debug",
        }
    )
    assert config.segmind_base_url == "http://127.0.0.1:8700"
    assert config.segmind_requests_per_minute == 5
    assert config.segmind_max_poll_seconds == 2.5
    assert config.quota_daily_images == 10
    assert config.quota_max_concurrent == 3
    assert config.quota_exempt_role_ids == frozenset({11, 12})
    assert config.discord_guild_ids == (123, 456)
    assert config.mod_log_channel_id == 789
    assert config.log_level == "DEBUG"


def test_every_bad_variable_is_named_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        Config.from_env(
            {
                "SEGMIND_REQUESTS_PER_MINUTE": "0",
                "DISCORD_GUILD_IDS": "123,abc",
                "LOG_LEVEL": "LOUD",
                "DATABASE_URL": "postgres://x",
                "SEGMIND_MAX_POLL_SECONDS": "0.1",
            }
        )
    text = str(caught.value)
    for name in (
        "DISCORD_TOKEN",
        "SEGMIND_API_KEY",
        "SEGMIND_REQUESTS_PER_MINUTE",
        "DISCORD_GUILD_IDS",
        "LOG_LEVEL",
        "DATABASE_URL",
        "SEGMIND_MAX_POLL_SECONDS",
    ):
        assert name in text
    assert len(caught.value.problems) == 7
    assert ".env.example" in text


def test_secrets_stay_out_of_repr() -> None:
    text = repr(Config.from_env(REQUIRED))
    assert "token-value-123" not in text
    assert "sg_key_value_456" not in text


def test_env_example_lists_every_variable_the_config_reads() -> None:
    example = (ROOT / ".env.example").read_text()
    source = (ROOT / "services" / "config.py").read_text()

    read = set(re.findall(r'reader\.(?:get|required)\(\s*"([A-Z_]+)"', source))
    assert read, "the config reads no variables?"
    for name in read:
        assert re.search(rf"^{name}=", example, re.MULTILINE), f"{name} missing from .env.example"


def test_bot_exits_2_with_one_message_and_no_traceback(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "SEGMIND_API_KEY": "k", "QUOTA_MAX_CONCURRENT": "none"}
    done = subprocess.run(
        bot_command(),  # reads no .env: a developer's would fill in the missing DISCORD_TOKEN
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "DISCORD_TOKEN" in done.stderr
    assert "QUOTA_MAX_CONCURRENT" in done.stderr
    assert ".env.example" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("api_base", "root"),
    [
        ("http://proxy:8080/api/v10", "http://proxy:8080"),
        ("http://proxy:8080/api/v10/", "http://proxy:8080"),
        ("http://proxy:8080/api", "http://proxy:8080"),
        ("http://proxy:8080/api/v9", "http://proxy:8080"),
        ("https://proxy.example/API/V10", "https://proxy.example"),
        ("https://proxy.example/discord/api/v10", "https://proxy.example/discord"),
    ],
)
def test_discord_api_base_takes_the_versioned_base_as_well_as_the_root(
    api_base: str, root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from discord.gateway import DiscordWebSocket
    from discord.http import Route

    from cogs.app import point_discord_py_at

    config = Config.from_env({**REQUIRED, "DISCORD_API_BASE": api_base})
    assert config.discord_api_base == root
    monkeypatch.setattr(Route, "BASE", Route.BASE)
    monkeypatch.setattr(DiscordWebSocket, "DEFAULT_GATEWAY", DiscordWebSocket.DEFAULT_GATEWAY)
    # Either form, given straight to point_discord_py_at, ends in the one versioned base discord.py uses.
    for given in (api_base, root):
        point_discord_py_at(given, None)
        used = Route.BASE
        assert used == f"{root}/api/v10"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("sqlite://", "names no database file: use sqlite:///data/bot.sqlite3"),
        ("sqlite:", "names no database file: use sqlite:///data/bot.sqlite3"),
        ("sqlite:///", "names no database file"),
        ("sqlite:///data/", "names a folder, not a database file"),
        ("sqlite://data/bot.sqlite3", "reads 'data' as a host name: use three slashes"),
        ("sqlite:data/bot.sqlite3", "needs three slashes after sqlite:"),
        ("redis://", "names no Redis host"),
        ("redis:", "names no Redis host"),
        ("redis://127.0.0.1:port/0", "port is not a number"),
        ("redis://127.0.0.1:6379/zero", "the database 'zero' is not a number"),
        ("postgres://db/bot", "the scheme postgres: is not supported"),
        ("data/bot.sqlite3", "it is not a URL"),
    ],
)
def test_a_malformed_database_url_is_told_what_is_wrong(url: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Config.from_env({**REQUIRED, "DATABASE_URL": url})
    (problem,) = caught.value.problems
    assert problem.startswith(f"DATABASE_URL={url!r} is invalid: ")
    assert says in problem
    assert "expected a URL starting with" not in problem


def test_a_database_url_problem_never_repeats_the_password() -> None:
    with pytest.raises(ConfigError) as caught:
        Config.from_env({**REQUIRED, "DATABASE_URL": "redis://:hunter2@127.0.0.1:port/0"})
    assert "port is not a number" in str(caught.value)
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize(
    ("name", "url", "says"),
    [
        ("DISCORD_API_BASE", "http://", "names no host after http://"),
        ("DISCORD_API_BASE", "http://proxy:port", "port is not a number"),
        ("SEGMIND_BASE_URL", "https://:443", "names no host after https://"),
        ("DISCORD_GATEWAY_URL", "ws://proxy:gateway", "port is not a number"),
    ],
)
def test_a_url_without_a_host_or_with_a_bad_port_is_refused_at_start(name: str, url: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Config.from_env({**REQUIRED, name: url})
    (problem,) = caught.value.problems
    assert problem.startswith(f"{name}=") and says in problem
