"""The bot as a real process (`python bot.py`) pointed at the local stand-ins, for the fault suite.

Kept apart from tests/processes.py so the suite runs from the command line without pytest.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from devtools.discord_server import DiscordStandIn
from devtools.segmind_server import SegmindServer

ROOT = Path(__file__).resolve().parent.parent
BOT_TOKEN = "bot.fault-suite.token-5d21"
SEGMIND_KEY = "sg_fault_suite_key_0c7e"


@dataclass
class BotRun:
    """One run of the bot process, from start to its exit."""

    name: str
    process: asyncio.subprocess.Process
    log_path: Path
    started_at: float  # seconds since the suite started
    ready_at: float | None = None
    ended_at: float | None = None
    exit_code: int | None = None
    how_ended: str = "running"  # "killed" (SIGKILL), "terminated" (SIGTERM) or "exited"
    _log_file: IO[bytes] | None = field(default=None, repr=False)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class BotLauncher:
    """Starts the bot, SIGKILLs it and starts it again on the same store, one process at a time."""

    def __init__(
        self,
        discord: DiscordStandIn,
        segmind: SegmindServer,
        workdir: Path,
        database_url: str,
        *,
        lease_seconds: float = 2.0,
        clock_zero: float | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.discord = discord
        self.segmind = segmind
        self.workdir = workdir
        self.database_url = database_url
        self.lease_seconds = lease_seconds
        self.extra_env = extra_env or {}
        self.runs: list[BotRun] = []
        self._zero = time.monotonic() if clock_zero is None else clock_zero

    def env(self) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", ""),
            "PYTHONUNBUFFERED": "1",
            "DISCORD_TOKEN": BOT_TOKEN,
            "SEGMIND_API_KEY": SEGMIND_KEY,
            "SEGMIND_BASE_URL": self.segmind.base_url,
            # Far above what the suite sends, so the suite measures faults, not the request budget.
            "SEGMIND_REQUESTS_PER_MINUTE": "600",
            "DATABASE_URL": self.database_url,
            "DISCORD_GUILD_IDS": str(self.discord.guild_id),
            "DISCORD_API_BASE": self.discord.api_base,
            "DISCORD_GATEWAY_URL": self.discord.gateway_url,
            # The quota must never refuse a command: a refusal is not a job.
            "QUOTA_DAILY_IMAGES": "100000",
            "QUOTA_MAX_CONCURRENT": "1000",
            "JOB_LEASE_SECONDS": f"{self.lease_seconds:g}",
            "LOG_LEVEL": "INFO",
            **self.extra_env,
        }

    @property
    def current(self) -> BotRun | None:
        run = self.runs[-1] if self.runs else None
        return run if run is not None and run.exit_code is None else None

    def _now(self) -> float:
        return time.monotonic() - self._zero

    async def start(self, ready_timeout: float = 40.0) -> BotRun:
        """Starts a process and waits until it is connected to the gateway with its commands synced."""
        if self.current is not None:
            raise RuntimeError("a bot process is already running")
        name = f"bot-{len(self.runs) + 1}"
        log_path = self.workdir / f"{name}.log"
        log_file = log_path.open("wb")
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(ROOT / "bot.py"),
            cwd=self.workdir,
            env=self.env(),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        run = BotRun(name, process, log_path, self._now(), _log_file=log_file)
        self.runs.append(run)
        try:
            await self.discord.wait_until_ready(timeout=ready_timeout, count=len(self.runs))
        except TimeoutError:
            await self._end(run, signal.SIGKILL, "killed")
            raise RuntimeError(f"{name} did not connect within {ready_timeout} s; see {log_path}") from None
        run.ready_at = self._now()
        return run

    async def kill(self) -> BotRun:
        """SIGKILL: no shutdown code runs, leases stay held until they lapse, in-flight requests die."""
        run = self._require_current()
        await self._end(run, signal.SIGKILL, "killed")
        return run

    async def terminate(self, timeout: float = 15.0) -> BotRun:
        """SIGTERM, the clean stop; SIGKILL if it is still running after `timeout`."""
        run = self._require_current()
        await self._end(run, signal.SIGTERM, "terminated", timeout)
        return run

    async def stop_all(self) -> None:
        for run in self.runs:
            if run.exit_code is None:
                await self._end(run, signal.SIGKILL, "killed")

    def _require_current(self) -> BotRun:
        run = self.current
        if run is None:
            raise RuntimeError("no bot process is running")
        return run

    async def _end(self, run: BotRun, signum: signal.Signals, how: str, timeout: float = 10.0) -> None:
        if run.process.returncode is None:
            run.process.send_signal(signum)
        try:
            code = await asyncio.wait_for(run.process.wait(), timeout)
        except TimeoutError:
            run.process.send_signal(signal.SIGKILL)
            code = await run.process.wait()
            how = f"{how}, then killed after {timeout:g} s"
        # The process may have died on its own before the signal arrived.
        run.how_ended = how if code in (0, -signum) else f"exited ({code})"
        run.exit_code = code
        run.ended_at = self._now()
        if run._log_file is not None:
            run._log_file.close()
            run._log_file = None
