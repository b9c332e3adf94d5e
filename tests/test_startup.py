"""Starting `python bot.py`: --help, old interpreters, and every start-up failure an operator can fix.

Each failure must end the process with one plain log line naming the variable to check, an exit status
(2: configuration, 1: a service that may come back) and no traceback. The bot runs as a real process
against the local stand-ins, or against ports where nothing listens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import discord
import pytest
from aiohttp import web

import bot
from devtools.launcher import BotLauncher, bot_command
from services.segmind import RequestBudget, SegmindClient
from tests.conftest import BOT_TOKEN, SEGMIND_KEY, StackFactory, database_url
from tests.processes import bot_processes

__all__ = ["bot_processes"]

ROOT = Path(__file__).resolve().parent.parent
# discord.py colours its log lines inside containers even when they go to a pipe.
ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class Finished:
    status: int
    output: str

    def error_lines(self) -> list[str]:
        return [line for line in self.output.splitlines() if " ERROR " in line or " CRITICAL " in line]


async def run_bot_py(env: dict[str, str], cwd: Path, *args: str, timeout: float = 45) -> Finished:
    process = await asyncio.create_subprocess_exec(
        *bot_command(*args),
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        output, _ = await process.communicate()
        raise AssertionError(
            f"bot.py still running after {timeout} s; its output:\n{output.decode(errors='replace')}"
        ) from None
    assert process.returncode is not None
    return Finished(process.returncode, ANSI_COLOUR.sub("", output.decode(errors="replace")))


def assert_stopped_plainly(finished: Finished, status: int, variable: str) -> str:
    """One error line naming `variable`, the exit status, no traceback, no secret; returns that line."""
    assert finished.status == status, finished.output
    errors = finished.error_lines()
    assert len(errors) == 1, finished.output
    assert variable in errors[0], finished.output
    for noise in ("Traceback", "Unclosed", "never retrieved", "never awaited"):
        assert noise not in finished.output, finished.output
    for secret in (BOT_TOKEN, SEGMIND_KEY):
        assert secret not in finished.output
    return errors[0]


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A port that refuses connections: bound, never listening, so nothing else can take it meanwhile."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def nothing_reached_the_stand_ins(processes: BotLauncher) -> None:
    assert processes.discord.requests == [], processes.discord.requests
    assert processes.segmind.stats.requests == [], processes.segmind.stats.requests


# --- --help ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_explains_usage_and_starts_nothing(tmp_path: Path, flag: str) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bot.py"), flag],
        check=False,
        cwd=tmp_path,
        env={"PATH": os.environ["PATH"]},  # no DISCORD_TOKEN or any other variable
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("usage: bot.py"), done.stdout
    text = " ".join(done.stdout.split())
    assert "Dreamshaper" in text
    assert "environment" in text
    assert ".env.example" in text
    assert "DISCORD_TOKEN" in text
    assert done.stderr == ""
    assert list(tmp_path.iterdir()) == [], "--help created files (a store?)"


# --- the Python version ---------------------------------------------------------------------------------


def test_python_too_old_names_the_version_needed_and_the_one_found() -> None:
    message = bot.python_too_old((3, 10, 4))
    assert message is not None
    assert "needs Python 3.11 or newer" in message
    assert "3.10.4" in message
    assert bot.python_too_old((2, 7, 18)) is not None
    assert bot.python_too_old((3, 11, 0)) is None
    assert bot.python_too_old((3, 13, 1)) is None


def test_the_check_passes_and_bot_imports_cleanly_on_this_python() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, bot; assert bot.python_too_old(tuple(sys.version_info[:3])) is None",
        ],
        check=False,
        cwd=ROOT,
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


def older_pythons() -> list[object]:
    """Real interpreters from 3.7 (the oldest that parses `from __future__ import annotations`) to 3.10."""
    candidates = {shutil.which(f"python3.{minor}") for minor in range(7, 11)}
    versions = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates |= {str(path) for path in versions.glob("3.*/bin/python3")}
    found: dict[tuple[int, int], str] = {}
    for path in sorted(filter(None, candidates)):
        try:
            done = subprocess.run(
                [path, "-c", "import sys; print('%d %d' % sys.version_info[:2])"],
                check=False,
                capture_output=True,
                text=True,
                timeout=10,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        parts = done.stdout.split()
        if done.returncode != 0 or len(parts) != 2:
            continue  # e.g. a pyenv shim for a version that is not selected
        version = (int(parts[0]), int(parts[1]))
        if (3, 7) <= version < (3, 11):
            found.setdefault(version, path)
    if not found:
        return [pytest.param(None, marks=pytest.mark.skip(reason="no Python 3.7 to 3.10 on this machine"))]
    return [pytest.param(path, id=f"python{major}.{minor}") for (major, minor), path in sorted(found.items())]


@pytest.mark.parametrize("python", older_pythons())
def test_an_older_python_is_told_to_upgrade(tmp_path: Path, python: str) -> None:
    done = subprocess.run(
        [python, str(ROOT / "bot.py")],
        check=False,
        cwd=tmp_path,
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "needs Python 3.11 or newer" in done.stderr
    for noise in ("Traceback", "SyntaxError", "ImportError", "ModuleNotFoundError"):
        assert noise not in done.stderr, done.stderr


# --- Discord --------------------------------------------------------------------------------------------


async def test_the_versioned_api_base_from_proxy_guides_logs_in(
    bot_processes: BotLauncher, tmp_path: Path
) -> None:
    database = await database_url("sqlite", tmp_path)
    started = await bot_processes.start(
        database, ready_count=1, DISCORD_API_BASE=f"{bot_processes.discord.api_base}/api/v10"
    )
    await bot_processes.discord.wait_for(
        lambda: bool(bot_processes.discord.synced_commands.get(bot_processes.discord.guild_id)), timeout=15
    )
    assert all("/api/v10/api/" not in request.path for request in bot_processes.discord.requests)
    assert "Traceback" not in started.log()


@pytest.mark.parametrize(
    "api_base",
    ["http://127.0.0.1:{closed}", "http://discord-proxy.invalid:8080/api/v10"],
    ids=["connection-refused", "unknown-host"],
)
async def test_unreachable_discord_is_one_line_naming_discord_api_base(
    bot_processes: BotLauncher, tmp_path: Path, api_base: str
) -> None:
    with closed_port() as port:
        env = bot_processes.env(
            await database_url("sqlite", tmp_path), DISCORD_API_BASE=api_base.format(closed=port)
        )
        finished = await run_bot_py(env, tmp_path)
    line = assert_stopped_plainly(finished, 1, "DISCORD_API_BASE")
    assert "cannot reach Discord" in line


async def test_an_api_base_that_is_not_discords_api_is_a_404_naming_discord_api_base(
    bot_processes: BotLauncher, tmp_path: Path
) -> None:
    env = bot_processes.env(
        await database_url("sqlite", tmp_path), DISCORD_API_BASE=f"{bot_processes.discord.api_base}/elsewhere"
    )
    line = assert_stopped_plainly(await run_bot_py(env, tmp_path), 2, "DISCORD_API_BASE")
    assert "404" in line


async def test_a_refused_bot_token_names_discord_token(bot_processes: BotLauncher, tmp_path: Path) -> None:
    wrong = "wrong.bot.token-5521"
    env = bot_processes.env(await database_url("sqlite", tmp_path), DISCORD_TOKEN=wrong)
    finished = await run_bot_py(env, tmp_path)
    assert_stopped_plainly(finished, 2, "DISCORD_TOKEN")
    assert wrong not in finished.output


async def test_a_guild_the_bot_is_not_in_names_discord_guild_ids(
    bot_processes: BotLauncher, tmp_path: Path
) -> None:
    env = bot_processes.env(await database_url("sqlite", tmp_path), DISCORD_GUILD_IDS="123456789012345678")
    line = assert_stopped_plainly(await run_bot_py(env, tmp_path), 2, "DISCORD_GUILD_IDS")
    assert "123456789012345678" in line


# --- the store, opened before anything is sent to Discord or Segmind -----------------------------------


def under_a_regular_file(tmp_path: Path) -> str:
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    return f"sqlite:///{tmp_path}/notes.txt/bot.sqlite3"


def a_folder(tmp_path: Path) -> str:
    (tmp_path / "store").mkdir()
    return f"sqlite:///{tmp_path}/store"


def not_a_database(tmp_path: Path) -> str:
    (tmp_path / "bot.sqlite3").write_bytes(b"this is not a SQLite database, just some bytes " * 100)
    return f"sqlite:///{tmp_path}/bot.sqlite3"


@pytest.mark.parametrize(
    ("make_url", "status", "says"),
    [
        (under_a_regular_file, 2, "not a folder"),
        (a_folder, 2, "a folder, not a database file"),
        (not_a_database, 2, "not a SQLite database"),
        (lambda _: "redis://127.0.0.1:{closed}/0", 1, "cannot reach Redis at 127.0.0.1"),
    ],
    ids=["sqlite-under-a-file", "sqlite-a-folder", "sqlite-not-a-database", "redis-down"],
)
async def test_an_unusable_store_stops_the_start_before_discord_or_segmind_is_contacted(
    bot_processes: BotLauncher, tmp_path: Path, make_url: object, status: int, says: str
) -> None:
    with closed_port() as port:
        url = make_url(tmp_path).format(closed=port)  # type: ignore[operator]
        finished = await run_bot_py(bot_processes.env(url), tmp_path)
    line = assert_stopped_plainly(finished, status, "DATABASE_URL")
    assert says in line
    nothing_reached_the_stand_ins(bot_processes)


# --- the Segmind key, checked before the Discord login --------------------------------------------------


async def test_a_refused_segmind_key_stops_the_start_before_discord_is_contacted(
    bot_processes: BotLauncher, tmp_path: Path
) -> None:
    wrong = "sg_not_the_right_key_8812"
    env = bot_processes.env(await database_url("sqlite", tmp_path), SEGMIND_API_KEY=wrong)
    finished = await run_bot_py(env, tmp_path)
    line = assert_stopped_plainly(finished, 2, "SEGMIND_API_KEY")
    assert "401" in line
    assert wrong not in finished.output
    assert bot_processes.discord.requests == []
    assert len(bot_processes.segmind.stats.requests) == 1


async def test_a_key_that_cannot_be_verified_is_logged_and_the_bot_starts(
    bot_processes: BotLauncher, tmp_path: Path
) -> None:
    with closed_port() as port:
        started = await bot_processes.start(
            await database_url("sqlite", tmp_path), ready_count=1, SEGMIND_BASE_URL=f"http://127.0.0.1:{port}"
        )
    log = ANSI_COLOUR.sub("", started.log())
    assert "could not verify" in log
    assert "Traceback" not in log


async def test_a_forbidden_segmind_key_stops_the_start_with_status_2() -> None:
    """The stand-in only knows 401; a key without access to the model gets 403 from the real Segmind."""

    async def forbidden(request: web.Request) -> web.Response:
        return web.json_response({"error": "Forbidden: this key may not use the model"}, status=403)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forbidden)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as session:
            client = SegmindClient(
                session, api_key=SEGMIND_KEY, base_url=f"http://127.0.0.1:{port}", budget=RequestBudget(60)
            )
            with pytest.raises(bot.StartupError) as caught:
                await bot.verify_segmind_key(client)
    finally:
        await runner.cleanup()
    assert caught.value.exit_status == 2
    assert "403" in str(caught.value) and "SEGMIND_API_KEY" in str(caught.value)
    assert SEGMIND_KEY not in str(caught.value)


# --- LOG_LEVEL=DEBUG ------------------------------------------------------------------------------------


async def test_debug_logging_never_shows_an_interaction_token_or_the_bot_token(
    bot_processes: BotLauncher, tmp_path: Path
) -> None:
    # SQLite: aiosqlite logs every statement with its parameters, and the job record holds the token.
    started = await bot_processes.start(
        await database_url("sqlite", tmp_path), ready_count=1, LOG_LEVEL="DEBUG"
    )
    handle = await bot_processes.discord.send_slash_command(
        "imagine", {"prompt": "a lighthouse in the fog", "steps": 20, "width": 512, "height": 512}
    )
    await bot_processes.discord.wait_for(
        lambda: handle.original is not None and bool(handle.original.attachments), timeout=40
    )
    started.terminate()
    assert await started.wait(15) == 0
    log = ANSI_COLOUR.sub("", started.log())
    assert " DEBUG " in log, "LOG_LEVEL=DEBUG logged nothing at DEBUG"
    for secret, what in ((handle.token, "the interaction token"), (BOT_TOKEN, "the bot token")):
        assert secret not in log, f"{what} is in the DEBUG log"
    assert SEGMIND_KEY not in log


# --- --env-file -----------------------------------------------------------------------------------------


def run_config_check(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """bot.py from `tmp_path` (a link to the real one, so the .env "beside bot.py" is tmp_path's), with
    nothing in the environment; every run here stops at the configuration check."""
    linked = tmp_path / "bot.py"
    if not linked.exists():
        linked.symlink_to(ROOT / "bot.py")
    return subprocess.run(
        [sys.executable, str(linked), *args],
        check=False,
        cwd=tmp_path,
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_env_file_chooses_which_env_is_read(tmp_path: Path) -> None:
    settings = "DISCORD_TOKEN=t\nSEGMIND_API_KEY=k\nDATABASE_URL={url}\n"
    (tmp_path / ".env").write_text(settings.format(url="not-a-url-beside"))
    (tmp_path / "other.env").write_text(settings.format(url="not-a-url-other"))

    beside = run_config_check(tmp_path)
    assert beside.returncode == 2 and "not-a-url-beside" in beside.stderr, beside.stderr
    assert "DISCORD_TOKEN" not in beside.stderr

    named = run_config_check(tmp_path, "--env-file", str(tmp_path / "other.env"))
    assert named.returncode == 2 and "not-a-url-other" in named.stderr, named.stderr
    assert "not-a-url-beside" not in named.stderr

    nothing = run_config_check(tmp_path, "--env-file", "none")
    assert nothing.returncode == 2 and "DISCORD_TOKEN is required" in nothing.stderr, nothing.stderr
    assert "not-a-url" not in nothing.stderr


def test_a_missing_env_file_is_one_line_and_status_2(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / ".env"
    done = run_config_check(tmp_path, "--env-file", str(missing))
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"bot.py: --env-file {missing}: no such file"], done.stderr
    assert done.stdout == ""


def test_help_documents_env_file() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bot.py"), "--help"],
        check=True,
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=60,
    )
    text = " ".join(done.stdout.split())
    assert "--env-file PATH" in text and "none reads no file" in text


# --- discord.py's voice warnings ------------------------------------------------------------------------

VOICE_WARNINGS = ("voice will NOT be supported", "PyNaCl", "davey")


async def test_a_started_bot_logs_no_voice_warnings(bot_processes: BotLauncher, tmp_path: Path) -> None:
    started = await bot_processes.start(await database_url("sqlite", tmp_path), ready_count=1)
    started.terminate()
    assert await started.wait(15) == 0
    log = ANSI_COLOUR.sub("", started.log())
    assert "synced 4 command(s)" in log, log  # the whole start ran, past the Discord client's construction
    for warning in VOICE_WARNINGS:
        assert warning not in log, log


async def test_a_bot_built_without_main_logs_no_voice_warnings(
    make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # As at the first construction in a fresh process: discord.py warns once, then clears the flags.
    monkeypatch.setattr(discord.VoiceClient, "warn_nacl", True)
    monkeypatch.setattr(discord.VoiceClient, "warn_dave", True)
    with caplog.at_level(logging.WARNING):
        await make_stack()
    for warning in VOICE_WARNINGS:
        assert not [r for r in caplog.records if warning in r.getMessage()], caplog.text
