"""Running `python bot.py` as a real process against the in-test stand-ins, with a store of either kind."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from devtools.discord_server import DiscordStandIn
from devtools.segmind_server import SegmindServer
from tests.conftest import BOT_TOKEN, SEGMIND_KEY, database_url

__all__ = ["BotProcess", "BotProcesses", "bot_processes", "database_url"]

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class BotProcess:
    name: str
    process: asyncio.subprocess.Process
    log_path: Path
    _log_file: object = field(repr=False, default=None)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    async def wait(self, timeout: float) -> int:
        try:
            return await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"{self.name} still running after {timeout} s; its log:\n{self.log()}"
            ) from None


class BotProcesses:
    def __init__(self, discord: DiscordStandIn, segmind: SegmindServer, tmp_path: Path) -> None:
        self.discord = discord
        self.segmind = segmind
        self.tmp_path = tmp_path
        self.started: list[BotProcess] = []

    def env(self, database: str, **extra: str) -> dict[str, str]:
        return {
            "PATH": os.environ["PATH"],
            "PYTHONUNBUFFERED": "1",
            "DISCORD_TOKEN": BOT_TOKEN,
            "SEGMIND_API_KEY": SEGMIND_KEY,
            "SEGMIND_BASE_URL": self.segmind.base_url,
            "SEGMIND_REQUESTS_PER_MINUTE": "600",
            "DATABASE_URL": database,
            "DISCORD_GUILD_IDS": str(self.discord.guild_id),
            "DISCORD_API_BASE": self.discord.api_base,
            "DISCORD_GATEWAY_URL": self.discord.gateway_url,
            "QUOTA_DAILY_IMAGES": "20",
            "QUOTA_MAX_CONCURRENT": "10",
            "JOB_LEASE_SECONDS": "2",
            "LOG_LEVEL": "INFO",
            **extra,
        }

    async def start(self, database: str, *, ready_count: int, **extra: str) -> BotProcess:
        name = f"bot-{len(self.started) + 1}"
        log_path = self.tmp_path / f"{name}.log"
        log_file = log_path.open("wb")
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(ROOT / "bot.py"),
            cwd=self.tmp_path,
            env=self.env(database, **extra),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        bot = BotProcess(name, process, log_path, log_file)
        self.started.append(bot)
        try:
            await self.discord.wait_until_ready(timeout=30, count=ready_count)
        except TimeoutError:
            raise AssertionError(f"{name} did not connect; its log:\n{bot.log()}") from None
        return bot

    async def stop_all(self) -> None:
        for bot in self.started:
            if bot.process.returncode is None:
                bot.kill()
                await bot.process.wait()


@pytest.fixture
async def bot_processes(tmp_path: Path) -> AsyncIterator[BotProcesses]:
    from devtools.segmind_server import SegmindServerSettings

    segmind = SegmindServer(
        SegmindServerSettings(api_keys=frozenset({SEGMIND_KEY}), queue_seconds=0.5, seconds_per_step=0.15)
    )
    await segmind.start()
    discord = DiscordStandIn(bot_token=BOT_TOKEN, gateway_resume_timeout=0.5)
    await discord.start()
    processes = BotProcesses(discord, segmind, tmp_path)
    yield processes
    await processes.stop_all()
    await discord.stop()
    await segmind.stop()
