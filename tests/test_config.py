from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert config.log_level == "INFO"


def test_every_variable_is_parsed() -> None:
    config = Config.from_env(
        {
            **REQUIRED,
            "SEGMIND_BASE_URL": "http://127.0.0.1:8700/",
            "SEGMIND_MODEL": "other-model",
            "SEGMIND_REQUESTS_PER_MINUTE": "5",
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
    ):
        assert name in text
    assert len(caught.value.problems) == 6
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
        [sys.executable, str(ROOT / "bot.py")],
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
