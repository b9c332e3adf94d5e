"""The bot processes the tests start (`devtools.launcher`) see only the configuration the test gives them.

Neither a `.env` beside bot.py (a developer's checkout has one, with real credentials) nor a variable
in the environment pytest runs in may reach them: either could change what a test checks, and a bad
value would make it wait for a bot that never connects.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest

from devtools.launcher import BOT_PY, NO_ENV_FILE, BotLauncher
from tests.conftest import database_url
from tests.processes import bot_processes

__all__ = ["bot_processes"]

# A value bot.py refuses at once (exit status 2), naming the variable; the launcher never sets it.
BAD_SETTING = ("CREDITS_COOLOFF_SECONDS", "soon")


def checkout_with_env_file(tmp_path: Path) -> Path:
    """A copy of bot.py beside a `.env` holding a bad value, importing the real cogs and services."""
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    shutil.copy(BOT_PY, checkout / "bot.py")
    for package in ("cogs", "services"):
        (checkout / package).symlink_to(BOT_PY.parent / package, target_is_directory=True)
    name, value = BAD_SETTING
    (checkout / ".env").write_text(f"{name}={value}\n")
    return checkout / "bot.py"


async def test_a_env_file_beside_bot_py_is_not_read(bot_processes: BotLauncher, tmp_path: Path) -> None:
    bot_py = checkout_with_env_file(tmp_path)
    launcher = BotLauncher(bot_processes.stand_ins, tmp_path, env=bot_processes.defaults, bot_py=bot_py)
    database = await database_url("sqlite", tmp_path)

    # Started without the launcher's option, that bot.py reads the .env and stops at the bad value...
    command = [arg for arg in launcher.command() if arg not in NO_ENV_FILE]
    plain = await asyncio.create_subprocess_exec(
        *command,
        cwd=tmp_path,
        env=launcher.env(database),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(plain.communicate(), 60)
    assert plain.returncode == 2, output.decode(errors="replace")
    assert BAD_SETTING[0] in output.decode(errors="replace")

    # ...and started by the launcher, it never sees it.
    started = await launcher.start(database)
    try:
        assert BAD_SETTING[0] not in started.log()
    finally:
        await launcher.stop_all()


def test_the_environment_is_built_from_scratch(
    bot_processes: BotLauncher, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISCORD_TOKEN", "a-developers-real-token")
    monkeypatch.setenv("SEGMIND_MODEL", "stray-model")
    monkeypatch.setenv(*BAD_SETTING)
    monkeypatch.setenv("HOME", "/home/someone")
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")

    env = bot_processes.env("sqlite:///bot.sqlite3", LOG_LEVEL="DEBUG")

    assert env["DISCORD_TOKEN"] == bot_processes.stand_ins.credentials.bot_token
    assert env["SEGMIND_BASE_URL"] == bot_processes.segmind.base_url
    assert env["LOG_LEVEL"] == "DEBUG"
    for stray in ("SEGMIND_MODEL", BAD_SETTING[0], "HOME"):
        assert stray not in env
    # What Python needs to run is kept.
    assert env["PATH"] and env["PYTHONDONTWRITEBYTECODE"] == "1"
    configured = set(bot_processes.stand_ins.bot_env("sqlite:///bot.sqlite3")) | set(bot_processes.defaults)
    assert set(env) - configured - {"LOG_LEVEL"} == {
        name for name in env if name == "PATH" or name.startswith("PYTHON")
    }


async def test_a_stray_variable_in_the_test_environment_does_not_reach_the_bot(
    bot_processes: BotLauncher, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(*BAD_SETTING)
    started = await bot_processes.start(await database_url("sqlite", tmp_path))
    assert BAD_SETTING[0] not in started.log()
