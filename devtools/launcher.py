"""The bot as a real process (`python bot.py`) pointed at the stand-ins: for the tests, the fault suite
and the shutdown benchmark.

Each process gets an environment built from scratch (PATH and the PYTHON* variables this interpreter
runs with, then the configuration `StandIns.bot_env` builds) and is told to read no `.env` file, so
neither the developer's shell nor a `.env` in the checkout (a real DISCORD_TOKEN, a stray
SEGMIND_BASE_URL) changes what it does. Its output goes to a log file of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from devtools.fakes.discord.server import DiscordStandIn
from devtools.fakes.segmind.server import SegmindServer
from devtools.stack import StandIns

BOT_PY = Path(__file__).resolve().parent.parent / "bot.py"
# bot.py's option to read no `.env` at all (by default it reads the one beside it).
NO_ENV_FILE: tuple[str, ...] = ("--env-file", "none")
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
SIGNAL_NAMES = {signal.SIGKILL: "killed", signal.SIGTERM: "terminated"}


def bot_command(*args: str, bot_py: Path = BOT_PY) -> list[str]:
    """The command line that runs bot.py with this interpreter, reading no `.env`."""
    return [sys.executable, str(bot_py), *NO_ENV_FILE, *args]


def inherited_env() -> dict[str, str]:
    """What a bot process takes from this one's environment: PATH and PYTHON*, nothing else."""
    return {name: value for name, value in os.environ.items() if name == "PATH" or name.startswith("PYTHON")}


class BotDidNotStart(RuntimeError):
    """The process did not connect to the gateway in time; it has been killed."""


class BotStillRunning(TimeoutError):
    """The process had not exited when the wait for it ended; the message holds its log."""


@dataclass
class BotProcess:
    """One run of `python bot.py`, from its start to its exit; times are seconds on the launcher's clock."""

    name: str
    process: asyncio.subprocess.Process
    log_path: Path
    started_at: float
    clock: Callable[[], float] = field(repr=False)
    ready_at: float | None = None
    ended_at: float | None = None
    exit_code: int | None = None
    how_ended: str = "running"  # "killed" (SIGKILL), "terminated" (SIGTERM) or "exited (code)"
    _log_file: IO[bytes] | None = field(default=None, repr=False)
    _signals: list[signal.Signals] = field(default_factory=list, repr=False)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, leases stay held until they lapse, in-flight requests die."""
        self._send(signal.SIGKILL)

    def terminate(self) -> None:
        """SIGTERM, the clean stop."""
        self._send(signal.SIGTERM)

    async def wait(self, timeout: float) -> int:
        """The exit status, once the process has exited; BotStillRunning after `timeout`."""
        try:
            code = await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            raise BotStillRunning(
                f"{self.name} still running after {timeout:g} s; its log:\n{self.log()}"
            ) from None
        self._exited(code)
        return code

    async def end(self, signum: signal.Signals = signal.SIGKILL, timeout: float = STOP_TIMEOUT) -> int:
        """Sends `signum` and waits for the exit; SIGKILL if the process still runs after `timeout`."""
        self._send(signum)
        try:
            return await self.wait(timeout)
        except BotStillRunning:
            self._send(signal.SIGKILL)
            code = await self.process.wait()
            self._exited(code)
            self.how_ended = f"{SIGNAL_NAMES[signum]}, then killed after {timeout:g} s"
            return code

    def _send(self, signum: signal.Signals) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signum)
            self._signals.append(signum)

    def _exited(self, code: int) -> None:
        if self.exit_code is not None:
            return
        self.exit_code = code
        self.ended_at = self.clock()
        # The process may have died on its own before a signal arrived.
        last = self._signals[-1] if self._signals else None
        self.how_ended = SIGNAL_NAMES[last] if last is not None and code in (0, -last) else f"exited ({code})"
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


class BotLauncher:
    """Starts bot processes against the stand-ins, one log file each in `workdir`.

    `env` is configuration every process gets on top of `StandIns.bot_env`; each start may add more.
    Several processes may run at once (shards); `current` is the one started last, until it ends.
    """

    def __init__(
        self,
        stand_ins: StandIns,
        workdir: Path,
        *,
        env: Mapping[str, str] | None = None,
        clock_zero: float | None = None,
        bot_py: Path = BOT_PY,
    ) -> None:
        self.stand_ins = stand_ins
        self.workdir = workdir
        self.defaults = dict(env or {})
        self.bot_py = bot_py
        self.started: list[BotProcess] = []
        self._zero = time.monotonic() if clock_zero is None else clock_zero

    @property
    def discord(self) -> DiscordStandIn:
        return self.stand_ins.discord

    @property
    def segmind(self) -> SegmindServer:
        return self.stand_ins.segmind

    @property
    def current(self) -> BotProcess | None:
        last = self.started[-1] if self.started else None
        return last if last is not None and last.exit_code is None else None

    def env(self, database_url: str, **overrides: str) -> dict[str, str]:
        """The whole environment of a bot process on the store at `database_url`."""
        config = self.stand_ins.bot_env(database_url, **{**self.defaults, **overrides})
        return {**inherited_env(), "PYTHONUNBUFFERED": "1", **config}

    def command(self, *args: str) -> list[str]:
        return bot_command(*args, bot_py=self.bot_py)

    def now(self) -> float:
        return time.monotonic() - self._zero

    async def start(
        self,
        database_url: str,
        *,
        ready_count: int | None = None,
        ready_timeout: float = READY_TIMEOUT,
        **overrides: str,
    ) -> BotProcess:
        """Starts a process and waits until the gateway has sent `ready_count` READYs in all (by default
        one per process this launcher started); BotDidNotStart, with its log, if the process exits first
        or that takes longer than `ready_timeout`."""
        name = f"bot-{len(self.started) + 1}"
        log_path = self.workdir / f"{name}.log"
        log_file = log_path.open("wb")
        process = await asyncio.create_subprocess_exec(
            *self.command(),
            cwd=self.workdir,
            env=self.env(database_url, **overrides),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        bot = BotProcess(name, process, log_path, self.now(), self.now, _log_file=log_file)
        self.started.append(bot)
        count = len(self.started) if ready_count is None else ready_count

        def ready() -> bool:
            return self.discord.gateway.ready_count >= count

        with contextlib.suppress(TimeoutError):
            await self.discord.wait_for(lambda: ready() or process.returncode is not None, ready_timeout)
        if not ready():
            exited = process.returncode is not None
            code = await bot.end(signal.SIGKILL)
            why = f"exited ({code})" if exited else f"did not connect within {ready_timeout:g} s"
            raise BotDidNotStart(f"{name} {why}; its log ({log_path}):\n{bot.log()}")
        bot.ready_at = self.now()
        return bot

    async def stop_all(self) -> None:
        """SIGKILLs every process still running."""
        for bot in self.started:
            if bot.exit_code is None:
                await bot.end(signal.SIGKILL)
